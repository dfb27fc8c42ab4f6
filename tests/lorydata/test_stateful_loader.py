"""Resume that cannot be done wrong: torchdata's StatefulDataLoader, and the plain DataLoader path."""

import importlib.util
import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lorydata.dataset import ShardDataset
from lorydata.errors import LoryDataError, MismatchError
from tests.lorydata.shardkit import build_shards, make_documents

BATCH = 4
EXAMPLE = Path(__file__).resolve().parents[2] / "benchmarks" / "examples" / "train_hf_llama.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stateful")
    build_shards(folder, make_documents(60), seq_len=16, rows_per_shard=7)  # 78 sequences in 12 shards
    return folder


def make_dataset(folder):
    return ShardDataset(folder, seed=5, epochs=2, batch_size=BATCH)


def make_loader(folder, workers, loader_cls=StatefulDataLoader):
    return loader_cls(make_dataset(folder), batch_size=BATCH, num_workers=workers, collate_fn=ShardDataset.collate)


def seq_ids(batches):
    return [i for batch in batches for i in batch["seq_id"].tolist()]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [5, 21])  # 21 batches cross the epoch boundary (78 samples per epoch)
def test_stateful_dataloader_resumes_exactly(folder, workers, stop_after):
    expected = seq_ids(make_loader(folder, workers))
    assert len(expected) == 2 * 78

    loader = make_loader(folder, workers)
    head = seq_ids(itertools.islice(loader, stop_after))
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # the state goes through a checkpoint file
    del loader

    resumed = make_loader(folder, workers)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    tail = seq_ids(resumed)
    assert head + tail == expected
    assert len(head) == stop_after * BATCH


def test_plain_loader_with_workers_refuses_a_stale_state(folder):
    dataset = make_dataset(folder)
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=ShardDataset.collate)
    batches = list(itertools.islice(loader, 3))
    with pytest.raises(LoryDataError, match="StatefulDataLoader"):
        dataset.state_dict()  # the workers advanced, this object did not: no silent position 0
    state = dataset.state_dict(position=ShardDataset.next_position(batches[-1]))
    assert state["position"] == 3 * BATCH

    resumed = make_dataset(folder)
    resumed.load_state_dict(state)
    tail = seq_ids(DataLoader(resumed, batch_size=BATCH, num_workers=2, collate_fn=ShardDataset.collate))
    assert seq_ids(batches) + tail == seq_ids(make_loader(folder, 0, DataLoader))

    dataset.position = ShardDataset.next_position(batches[-1])  # what lory's trainer does each step
    assert dataset.state_dict()["position"] == 3 * BATCH


def test_plain_loader_without_workers_knows_its_position(folder):
    dataset = make_dataset(folder)
    list(itertools.islice(DataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=ShardDataset.collate), 2))
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=0, collate_fn=ShardDataset.collate)
    list(itertools.islice(loader, 3))  # read in this process after the workers: its position counts again
    assert dataset.state_dict()["position"] == 3 * BATCH


def test_a_worker_state_is_refused_outside_its_worker(folder):
    loader = make_loader(folder, 2)
    list(itertools.islice(loader, 3))
    worker_states = [s for s in _dicts(loader.state_dict()) if "worker" in s]
    assert {s["worker"] for s in worker_states} == {0, 1}
    with pytest.raises(MismatchError, match="worker"):
        make_dataset(folder).load_state_dict(worker_states[0])


def _dicts(tree):
    """Every dict nested in a state tree."""
    if isinstance(tree, dict):
        yield tree
        for value in tree.values():
            yield from _dicts(value)


def run_example(argv, capsys) -> list[dict]:
    """benchmarks/examples/train_hf_llama.py in this process; its JSON step lines."""
    spec = importlib.util.spec_from_file_location("train_hf_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
def test_the_hf_llama_example_resumes_mid_epoch_exactly(folder, tmp_path, capsys):
    tiny = [str(folder), "--steps", "8", "--batch-size", "4", "--workers", "2", "--hidden", "32"]
    straight = run_example([*tiny, "--out", str(tmp_path / "a")], capsys)
    first = run_example([*tiny, "--out", str(tmp_path / "b"), "--stop-after", "3"], capsys)
    rest = run_example([*tiny, "--out", str(tmp_path / "b"), "--resume"], capsys)
    assert [r["step"] for r in first + rest] == list(range(1, 9))
    assert [r["seq_ids"] for r in first + rest] == [r["seq_ids"] for r in straight]
    assert [r["loss"] for r in first + rest] == pytest.approx([r["loss"] for r in straight], abs=1e-5)
