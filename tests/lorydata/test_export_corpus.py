"""`lory export-corpus`: every format read back by its own reader gives the lory sequences, in
seq_id order, with their document boundaries."""

import gzip
import hashlib
import json
import sys
import warnings

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lorydata.errors import ShardError
from lorydata.export import EXPORT_INFO_NAME, export_corpus
from lorydata.masks import block_causal_mask, position_ids
from lorydata.shards import read_shard, write_shard
from tests.lorydata.shardkit import build_shards, make_documents, run_cli

SEQ_LEN = 16

with warnings.catch_warnings():  # megatron.core warns at import that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split
    from megatron.core.tokenizers import MegatronTokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A shard folder (shuffled rows over 12 shards) and its rows in seq_id order."""
    folder = tmp_path_factory.mktemp("export") / "train"
    manifest = build_shards(folder, make_documents(60), seq_len=SEQ_LEN, rows_per_shard=7)
    rows = {}
    for entry in manifest.shards:
        for row in read_shard(folder / entry.file).to_pylist():
            rows[row["seq_id"]] = row
    ordered = [rows[i] for i in range(manifest.num_rows)]
    return folder, manifest, ordered


# ---- megatron ------------------------------------------------------------------------------
def test_megatron_indexed_dataset_reads_the_sequences_in_order(corpus, tmp_path, capsys):
    folder, manifest, ordered = corpus
    code, out, _ = run_cli(["export-corpus", str(folder), str(tmp_path / "mg"), "--format", "megatron"], capsys)
    assert code == 0 and f"wrote {manifest.num_rows} sequences" in out
    dataset = IndexedDataset(str(tmp_path / "mg" / "train_text_document"))
    tokenizer = MegatronTokenizer.from_pretrained(str(tmp_path / "mg" / "tokenizer"), metadata_path={"library": "huggingface"})
    assert (tokenizer.eod, tokenizer.pad) == (manifest.tokenizer["eos_id"], manifest.tokenizer["pad_id"])
    assert len(dataset) == manifest.num_rows and dataset.index.dtype == np.uint16
    assert [dataset[i].tolist() for i in range(len(dataset))] == [r["input_ids"] for r in ordered]
    assert dataset.document_indices.tolist() == list(range(manifest.num_rows + 1))  # a document per sequence


@pytest.mark.parametrize("extra_token", [False, True])
def test_megatron_gpt_samples_are_whole_lory_sequences_with_their_documents(corpus, tmp_path, extra_token):
    folder, manifest, ordered = corpus
    export_corpus(folder, tmp_path / "mg", "megatron")
    prefix = str(tmp_path / "mg" / "train_text_document")
    tokenizer = MegatronTokenizer.from_pretrained(str(tmp_path / "mg" / "tokenizer"), metadata_path={"library": "huggingface"})
    config = GPTDatasetConfig(random_seed=1, sequence_length=SEQ_LEN, tokenizer=tokenizer,
                              reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False,
                              add_extra_token_to_sequence=extra_token, path_to_cache=str(tmp_path / "cache"))
    gpt = GPTDataset(IndexedDataset(prefix), prefix, np.arange(manifest.num_rows), None, Split.train, config)
    pad = manifest.tokenizer["pad_id"]
    # GPTDataset turns pad ids into 0 in its inputs (and masks their loss)
    by_tokens = {tuple(0 if t == pad else t for t in r["input_ids"]): r for r in ordered}
    inputs = []
    for i in range(len(gpt)):
        sample = gpt[i]
        row = by_tokens[tuple(sample["tokens"].tolist())]  # the sample's input is one whole lory sequence
        inputs.append(row["seq_id"])
        if row["input_ids"][-1] != pad:
            # Megatron's own document masks (from EOD tokens) agree with lorydata.masks (from doc_starts)
            assert sample["position_ids"].tolist() == position_ids([row["doc_starts"]], SEQ_LEN)[0].tolist()
            expected_mask = ~block_causal_mask([row["doc_starts"]], SEQ_LEN, torch.bool)[0]  # Megatron: True = masked
            assert torch.equal(sample["attention_mask"], expected_mask)
    # one extra label token per sample costs Megatron the last sequence of the epoch
    assert len(set(inputs)) == len(inputs) == manifest.num_rows - extra_token


# ---- olmo ----------------------------------------------------------------------------------
def olmo_instances(out, seq_len, dtype):
    """OLMo-core's NumpyFSLDataset layout: raw token files in order, instance i = tokens [i*L, (i+1)*L)."""
    arrays = [np.memmap(path, dtype=dtype, mode="r") for path in sorted(out.glob("*.npy"))]
    return np.concatenate([a[: len(a) // seq_len * seq_len] for a in arrays]).reshape(-1, seq_len)


def olmo_eos_document_lengths(tokens, eos_id):
    """OLMo-core's `get_document_lengths` (no BOS): documents end at every EOS, plus the tail."""
    ends = [i + 1 for i in np.flatnonzero(tokens == eos_id)]
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    return np.diff([0, *ends]).tolist()


def test_olmo_arrays_and_document_metadata_round_trip(corpus, tmp_path, capsys):
    folder, manifest, ordered = corpus
    out = tmp_path / "olmo"
    code, _, _ = run_cli(["export-corpus", str(folder), str(out), "--format", "olmo", "--rows-per-file", "10"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.glob("*.npy")) == [f"part-{i:05d}.npy" for i in range(8)]  # 78 rows / 10
    instances = olmo_instances(out, SEQ_LEN, np.uint16)
    assert instances.tolist() == [r["input_ids"] for r in ordered]

    pieces = []  # (seq_id, start in sequence, end, domain) from the Dolma-style metadata
    for index, path in enumerate(sorted(out.glob("*.csv.gz"))):
        with gzip.open(path, "rt") as f:
            for line in f:
                start, end, seq_id, domain = line.rstrip("\n").split(",")
                offset = (int(seq_id) - index * 10) * SEQ_LEN
                pieces.append((int(seq_id), int(start) - offset, int(end) - offset, domain))
    expected = [(r["seq_id"], s, e, d) for r in ordered
                for s, e, d in zip(r["doc_starts"], [*r["doc_starts"][1:], SEQ_LEN], r["domains"], strict=True)]
    assert pieces == expected
    eos = manifest.tokenizer["eos_id"]
    unpadded = [r for r in ordered if r["input_ids"][-1] != manifest.tokenizer["pad_id"]]
    for row in unpadded:  # OLMo's EOS-derived document lengths equal lory's documents
        starts = row["doc_starts"]
        assert olmo_eos_document_lengths(np.array(row["input_ids"]), eos) == np.diff([*starts, SEQ_LEN]).tolist()


def test_exports_are_deterministic(corpus, tmp_path):
    folder, _, _ = corpus
    digests = []
    for name in ("a", "b"):
        export_corpus(folder, tmp_path / name, "olmo")
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / name).iterdir()})
    assert digests[0] == digests[1]


# ---- parquet -------------------------------------------------------------------------------
def test_parquet_is_zstd_in_seq_id_order_and_duckdb_reads_it(corpus, tmp_path):
    folder, _, ordered = corpus
    out = tmp_path / "pq"
    summary = export_corpus(folder, out, "parquet", rows_per_file=20)
    assert summary.files == [f"part-{i:05d}.parquet" for i in range(4)]
    table = pq.read_table(out)  # pyarrow skips the hidden .lory-export.json
    assert table.to_pylist() == ordered
    meta = pq.ParquetFile(out / summary.files[0]).metadata
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    files = sorted(str(p) for p in out.glob("*.parquet"))
    rows = duckdb.sql(f"SELECT seq_id, input_ids, doc_starts, domains FROM read_parquet({files}) ORDER BY seq_id").fetchall()
    assert [list(r) for r in rows] == [[r["seq_id"], r["input_ids"], r["doc_starts"], r["domains"]] for r in ordered]
    first_ids = [pq.read_table(out / f).column("seq_id")[0].as_py() for f in summary.files]
    assert first_ids == [0, 20, 40, 60]


# ---- errors and bookkeeping ----------------------------------------------------------------
def test_export_info_records_the_source(corpus, tmp_path):
    folder, manifest, _ = corpus
    export_corpus(folder, tmp_path / "pq", "parquet")
    info = json.loads((tmp_path / "pq" / EXPORT_INFO_NAME).read_text())
    assert info["format"] == "parquet" and info["order"] == "seq_id" and info["sequences"] == manifest.num_rows
    assert info["source"]["tokenizer"]["sha256"] == manifest.tokenizer["sha256"]


def test_user_errors_are_one_line_and_leave_nothing_behind(corpus, tmp_path, capsys, monkeypatch):
    folder, _, _ = corpus
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(["export-corpus", str(folder), str(tmp_path / "taken"), "--format", "parquet"], capsys)
    assert code == 2 and "already exists" in err and "Traceback" not in err
    code, _, err = run_cli(["export-corpus", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--format", "olmo"], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run_cli(["export-corpus", str(folder), str(tmp_path / "x"), "--format", "mds"], capsys)
    assert code == 2 and "mds" in err

    for name in ("megatron", "megatron.core", "megatron.core.datasets"):  # as if megatron-core were not installed
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run_cli(["export-corpus", str(folder), str(tmp_path / "x"), "--format", "megatron"], capsys)
    assert code == 2 and err.strip() == "error: export format 'megatron' needs megatron-core: pip install 'lory[megatron]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "no output or partial folder remains"


def test_a_folder_with_broken_seq_ids_is_refused(tmp_path):
    folder = tmp_path / "train"
    manifest = build_shards(folder, make_documents(20), seq_len=SEQ_LEN, rows_per_shard=50)
    assert len(manifest.shards) == 1
    table = read_shard(folder / manifest.shards[0].file)
    gaps = pa.array(table.column("seq_id").to_numpy() * 2)  # seq_ids with gaps: no seq_id order to keep
    manifest.shards = [write_shard(table.set_column(3, table.schema.field("seq_id"), gaps), folder, manifest.shards[0].file)]
    manifest.write(folder)
    with pytest.raises(ShardError, match="seq_ids are not"):
        export_corpus(folder, tmp_path / "out", "parquet")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_megatron_export_without_the_tokenizer_file_says_so(tmp_path):
    folder = tmp_path / "train"
    manifest = build_shards(folder, make_documents(10), seq_len=SEQ_LEN)
    manifest.tokenizer = {**manifest.tokenizer, "sha256": "0" * 64}  # no tokenizer file of this sha256 is known
    manifest.write(folder)
    summary = export_corpus(folder, tmp_path / "mg", "megatron")
    assert not (tmp_path / "mg" / "tokenizer").exists()
    assert summary.details["tokenizer"].startswith("not written") and summary.details["eod_id"] == 0
