"""A shard folder opens as one dataset in pyarrow.dataset, Hugging Face datasets and polars."""

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from datasets import load_dataset

from lorydata.dataset import ShardDataset
from lorydata.manifest import LEGACY_MANIFEST_NAME, MANIFEST_NAME, Manifest
from lorydata.shards import read_shard
from tests.lorydata.shardkit import build_shards, make_documents

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A build-like root: train/ and heldout/ shard folders."""
    root = tmp_path_factory.mktemp("corpus")
    build_shards(root / "train", make_documents(60), seq_len=SEQ_LEN, rows_per_shard=7)
    build_shards(root / "heldout", make_documents(12), seq_len=SEQ_LEN, rows_per_shard=7, seed=1)
    return root


def rows_by_seq_id(folder) -> dict[int, list[int]]:
    """What the shards hold, read with lory's own reader."""
    manifest = Manifest.read(folder)
    out = {}
    for entry in manifest.shards:
        table = read_shard(folder / entry.file)
        for seq_id, ids in zip(table.column("seq_id").to_pylist(), table.column("input_ids").to_pylist(), strict=True):
            out[seq_id] = ids
    return out


def assert_same_rows(seq_ids, input_ids, expected):
    assert sorted(seq_ids) == sorted(expected)
    for seq_id, ids in zip(seq_ids, input_ids, strict=True):
        assert list(ids) == expected[seq_id]


def test_the_manifest_is_hidden_from_folder_readers(corpus):
    names = os.listdir(corpus / "train")
    assert MANIFEST_NAME in names and LEGACY_MANIFEST_NAME not in names
    assert all(n.endswith(".arrow") for n in names if not n.startswith("."))


def test_pyarrow_dataset_reads_the_folder(corpus):
    folder = corpus / "train"
    table = pads.dataset(folder, format="arrow").to_table()
    assert table.schema.field("input_ids").type == pa.list_(pa.int32(), SEQ_LEN)
    assert_same_rows(table.column("seq_id").to_pylist(), table.column("input_ids").to_pylist(), rows_by_seq_id(folder))


@pytest.mark.parametrize("how", ["folder", "arrow-data-dir"])
def test_hugging_face_load_dataset_reads_the_folder(corpus, tmp_path, how):
    folder = corpus / "train"
    if how == "folder":
        ds = load_dataset(str(folder), split="train", cache_dir=str(tmp_path))
    else:
        ds = load_dataset("arrow", data_dir=str(folder), split="train", cache_dir=str(tmp_path))
    assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["input_ids"].length == SEQ_LEN
    assert_same_rows(ds["seq_id"], ds["input_ids"], rows_by_seq_id(folder))
    # HF's torch formatter makes every integer int64 unless told otherwise
    assert ds.with_format("torch")[0]["input_ids"].dtype == torch.int64
    kept = ds.with_format("torch", columns=["input_ids"], dtype=torch.int32)[:4]["input_ids"]
    assert kept.dtype == torch.int32 and kept.shape == (4, SEQ_LEN)


def test_hugging_face_reads_both_splits_of_a_build(corpus, tmp_path):
    splits = load_dataset("arrow", data_files={"train": str(corpus / "train" / "*.arrow"),
                                               "heldout": str(corpus / "heldout" / "*.arrow")}, cache_dir=str(tmp_path))
    assert {k: v.num_rows for k, v in splits.items()} == {
        "train": Manifest.read(corpus / "train").num_rows, "heldout": Manifest.read(corpus / "heldout").num_rows}


def test_polars_scans_the_folder(corpus):
    folder = corpus / "train"
    frame = pl.scan_ipc(str(folder / "*.arrow")).collect()
    assert frame.schema["input_ids"] == pl.Array(pl.Int32, SEQ_LEN)
    assert_same_rows(frame["seq_id"].to_list(), frame["input_ids"].to_list(), rows_by_seq_id(folder))


def test_a_folder_with_the_legacy_manifest_name_still_reads(tmp_path):
    build_shards(tmp_path, make_documents(20), seq_len=SEQ_LEN, rows_per_shard=7)
    (tmp_path / MANIFEST_NAME).rename(tmp_path / LEGACY_MANIFEST_NAME)
    manifest = Manifest.read(tmp_path)
    rows = list(ShardDataset(tmp_path, shuffle=False, epochs=1))
    assert len(rows) == manifest.num_rows
    ids = np.stack([r["input_ids"].numpy() for r in sorted(rows, key=lambda r: r["seq_id"])])
    assert ids.tolist() == [v for _, v in sorted(rows_by_seq_id(tmp_path).items())]
    manifest.write(tmp_path)  # rewriting it leaves one manifest, under the new name
    assert (tmp_path / MANIFEST_NAME).is_file() and not (tmp_path / LEGACY_MANIFEST_NAME).exists()
