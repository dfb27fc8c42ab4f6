import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lorydata.dataset import ShardDataset
from lorydata.errors import MismatchError
from lorydata.shards import read_shard
from tests.lorydata.shardkit import build_shards, make_documents


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    manifest = build_shards(folder, make_documents(60), seq_len=16, rows_per_shard=7)
    assert manifest.num_rows % 4 == 0 or manifest.num_rows > 40
    return folder, manifest


def loader_seq_ids(ds, batch_size, workers, limit=None):
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=ShardDataset.collate)
    ids, positions = [], []
    for batch in itertools.islice(dl, limit):
        ids += batch["seq_id"].tolist()
        positions += batch["position"].tolist()
    return ids, positions


def test_two_ranks_two_workers_disjoint_and_complete(shards):
    folder, manifest = shards
    row_seq_ids = np.concatenate([read_shard(folder / s.file).column("seq_id").to_numpy() for s in manifest.shards])
    seen = []
    for rank in range(2):
        ds = ShardDataset(folder, seed=3, rank=rank, world_size=2, epochs=1, even=False, batch_size=3)
        ids, positions = loader_seq_ids(ds, batch_size=3, workers=2)
        assert positions == list(range(len(ids))), "loader output must follow the rank's stream order"
        assert ids == [row_seq_ids[row] for row in ds.rank_order(0)]
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(manifest.num_rows))


def test_even_split_gives_every_rank_the_same_count(shards):
    folder, manifest = shards
    counts = [ShardDataset(folder, rank=r, world_size=3, epochs=1).samples_per_epoch for r in range(3)]
    assert counts == [manifest.num_rows // 3] * 3


def test_order_is_deterministic_and_changes_per_epoch_and_seed(shards):
    folder, _ = shards
    a = ShardDataset(folder, seed=1)
    assert (a.epoch_order(0) == ShardDataset(folder, seed=1).epoch_order(0)).all()
    assert not (a.epoch_order(0) == a.epoch_order(1)).all()
    assert not (a.epoch_order(0) == ShardDataset(folder, seed=2).epoch_order(0)).all()
    assert sorted(a.epoch_order(0)) == list(range(a.num_rows))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_remaining_stream(shards, workers):
    folder, manifest = shards
    epochs, batch = 2, 4
    full = ShardDataset(folder, seed=5, epochs=epochs, batch_size=batch)
    expected, _ = loader_seq_ids(full, batch, workers)
    assert len(expected) == epochs * manifest.num_rows

    first = ShardDataset(folder, seed=5, epochs=epochs, batch_size=batch)
    dl = DataLoader(first, batch_size=batch, num_workers=workers, collate_fn=ShardDataset.collate)
    head = []
    for batch_data in itertools.islice(dl, 5):  # stop after 20 samples, then resume
        head += batch_data["seq_id"].tolist()
        state = first.state_dict(position=ShardDataset.next_position(batch_data))
    assert state["position"] == 20
    if workers == 0:  # iterated in this process: the dataset itself knows where it stopped
        assert first.state_dict()["position"] == 20
    resumed = ShardDataset(folder, seed=5, epochs=epochs, batch_size=batch)
    resumed.load_state_dict(state)
    tail, _ = loader_seq_ids(resumed, batch, workers)
    assert head + tail == expected


def test_state_from_another_stream_is_refused(shards):
    folder, _ = shards
    state = ShardDataset(folder, seed=1).state_dict()
    with pytest.raises(MismatchError, match="seed"):
        ShardDataset(folder, seed=2).load_state_dict(state)


def test_mismatched_tokenizer_or_seq_len_is_refused(shards):
    folder, _ = shards
    with pytest.raises(MismatchError, match="16 tokens, but 32"):
        ShardDataset(folder, expected_seq_len=32)
    with pytest.raises(MismatchError, match="tokenizer"):
        ShardDataset(folder, expected_tokenizer="0" * 64)


def test_metadata_and_tensor_types(shards):
    folder, _ = shards
    sample = next(iter(ShardDataset(folder, with_metadata=True)))
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (16,)
    assert sample["doc_starts"][0] == 0 and len(sample["domains"]) == len(sample["doc_starts"])
