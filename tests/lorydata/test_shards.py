import json

import numpy as np
import pyarrow as pa
import pytest

from lorydata.dataset import ShardDataset
from lorydata.errors import ShardError
from lorydata.manifest import MANIFEST_NAME, Manifest
from lorydata.shards import read_shard, shard_schema
from lorydata.tokenizer import Tokenizer
from lorydata.verify import inspect_folder, verify_folder
from tests.lorydata.shardkit import build_shards, make_documents, run_cli


def test_round_trip_documents_to_text(tmp_path):
    documents = make_documents(23)
    manifest = build_shards(tmp_path, documents, seq_len=32, tail="pad")
    tok = Tokenizer()
    rows = list(ShardDataset(tmp_path, shuffle=False, epochs=1, expected_seq_len=32, expected_tokenizer=tok))
    assert len(rows) == manifest.num_rows == manifest.counts["sequences"]
    ids = np.concatenate([r["input_ids"].numpy() for r in sorted(rows, key=lambda r: r["seq_id"])])
    ids = ids[: len(ids) - manifest.counts["pad_tokens"]]
    assert tok.decode(ids) == "".join(text + "<|endoftext|>" for _, text in documents)


def test_shards_follow_the_v1_schema_and_any_arrow_reader_opens_them(tmp_path):
    manifest = build_shards(tmp_path, make_documents(20), seq_len=16, rows_per_shard=4)
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / manifest.shards[0].file))).read_all()
    assert table.schema.equals(shard_schema(16), check_metadata=False)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32(), 16)
    assert [s.rows for s in manifest.shards[:-1]] == [4] * (len(manifest.shards) - 1)
    hidden = {p.name for p in tmp_path.glob(".*")}
    assert hidden == {MANIFEST_NAME}, "no temp or staging files may remain"
    seq_ids = np.concatenate([read_shard(tmp_path / s.file).column("seq_id").to_numpy() for s in manifest.shards])
    assert sorted(seq_ids) == list(range(manifest.num_rows))
    assert not np.array_equal(seq_ids, np.arange(manifest.num_rows)), "rows must be shuffled"


def test_same_input_and_seed_give_byte_identical_shards(tmp_path):
    docs = make_documents(30)
    a = build_shards(tmp_path / "a", docs, seed=7)
    b = build_shards(tmp_path / "b", docs, seed=7)
    c = build_shards(tmp_path / "c", docs, seed=8)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupted_shard_is_reported_by_name(tmp_path, damage, capsys):
    manifest = build_shards(tmp_path, make_documents(30), rows_per_shard=4)
    victim = tmp_path / manifest.shards[1].file
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 3]))
    else:
        victim.unlink()
    _, report = verify_folder(tmp_path)
    assert [c.file for c in report.failed] == [victim.name]
    code, out, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 1 and victim.name in err and "Traceback" not in err
    code, out, _ = run_cli(["inspect", str(tmp_path), "--json"], capsys)
    parsed = json.loads(out)
    assert code == 1 and parsed["verification"]["ok"] is False
    assert parsed["verification"]["failed"] == [victim.name]
    assert parsed["summary"]["sequences"] == manifest.num_rows


def test_truncated_shard_read_directly_names_the_file(tmp_path):
    manifest = build_shards(tmp_path, make_documents(10))
    path = tmp_path / manifest.shards[0].file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShardError, match=path.name):
        read_shard(path)


def test_inspect_decodes_a_sequence(tmp_path, capsys):
    build_shards(tmp_path, make_documents(12), seq_len=64)
    report = inspect_folder(tmp_path, show=0)
    assert report["verification"]["ok"]
    assert "<|endoftext|>" in report["sequence"]["text"] or len(report["sequence"]["doc_starts"]) == 1
    code, out, err = run_cli(["inspect", str(tmp_path), "--show", "0"], capsys)
    assert code == 0 and report["sequence"]["text"] in out
    code, _, err = run_cli(["inspect", str(tmp_path), "--show", "999"], capsys)
    assert code == 2 and "out of range" in err


def test_manifest_problems_are_clear_errors(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        Manifest.read(tmp_path / "missing")
    with pytest.raises(ShardError, match=r"no \.manifest\.json"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="unreadable manifest"):
        Manifest.read(tmp_path)
