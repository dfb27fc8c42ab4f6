"""`lory build-corpus --order random` end to end on the Beam in-process runner."""

import json

import numpy as np
import pytest

from lorydata.dataset import ShardDataset
from lorydata.manifest import Manifest
from lorydata.tokenizer import Tokenizer
from tests.lorydata.badcorpus import GOOD, MAX_CHARS, write_bad_corpus
from tests.lorydata.shardkit import run_cli


def all_text(folder):
    """Every shard row of `folder` decoded, in seq_id (= packing) order, padding removed."""
    manifest = Manifest.read(folder)
    rows = sorted(ShardDataset(folder, shuffle=False, epochs=1), key=lambda r: r["seq_id"])
    ids = np.concatenate([r["input_ids"].numpy() for r in rows])
    ids = ids[ids != manifest.tokenizer["pad_id"]]
    return Tokenizer().decode(ids)


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    expected = write_bad_corpus(src)
    out = tmp_path_factory.mktemp("out") / "corpus"
    args = ["build-corpus", src / "bad.jsonl", "--out", out, "--order", "random", "--seq-len", 16,
            "--tail", "pad", "--domain-field", "domain", "--id-field", "id", "--max-chars", MAX_CHARS,
            "--rows-per-shard", 4, "--json"]
    return src, out, expected, args


def test_bad_input_gives_dead_letters_counts_and_every_good_document(bad_build, capsys):
    _, out, expected, args = bad_build
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    files = sorted((out / "dead_letters").glob("*.jsonl"))
    letters = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert {(d["line"], d["reason"]) for d in letters} == expected["dead"]
    assert all(d["source"].endswith("bad.jsonl") for d in letters)
    manifest = Manifest.read(out / "train")
    pipeline = manifest.counts["pipeline"]
    reasons = [r for _, r in expected["dead"]]
    assert pipeline["dropped"] == {r: reasons.count(r) for r in set(reasons)}
    assert pipeline["documents_kept"] == len(expected["good_ids"])
    assert pipeline["utf8_replacements"] == expected["replacements"]
    text = all_text(out / "train")
    for doc in GOOD:
        assert text.count(doc["text"] + "<|endoftext|>") == 1
    assert text.count("crème is a fine dessert") == 0 and text.count("caf\ufffd cr\ufffdme") == 1
    summary = json.loads(stdout)
    assert summary["documents"]["records_read"] == 13
    work = out / "_work" / "documents"
    assert (work / "_DONE.json").is_file() and not (work / "raw").exists() and not (work / "_commits").exists(), \
        "a finished stage keeps no scratch"


def test_rerun_skips_finished_stages_and_refuses_other_options(bad_build, capsys):
    _, out, _, args = bad_build
    before = Manifest.read(out / "train")
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    assert all(s["status"].startswith("skipped") for s in json.loads(stdout)["stages"].values())
    changed = [*args, "--seq-len", 8]
    code, _, err = run_cli(changed, capsys)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert Manifest.read(out / "train").shards == before.shards, "a refused rerun must not touch outputs"
    code, stdout, _ = run_cli([*changed, "--overwrite"], capsys)
    stages = json.loads(stdout)["stages"]
    assert code == 0 and stages["documents"]["status"].startswith("skipped") and stages["shards/train"]["status"] == "ran"
    assert Manifest.read(out / "train").seq_len == 8


def test_same_input_and_seed_give_identical_shards_with_two_workers(tmp_path, sample_corpus, capsys, monkeypatch):
    # Several buckets, packing units and shards, so that every step has work to spread.
    monkeypatch.setattr("pipelines.order.random_keys.UNIT_TOKENS", 50_000)
    common = ["build-corpus", sample_corpus, "--order", "random", "--seq-len", 256, "--domain-field", "domain",
              "--heldout-fraction", 0.2, "--rows-per-shard", 300, "--seed", 3, "--buckets", 3]
    assert run_cli([*common, "--out", tmp_path / "a"], capsys)[0] == 0
    code, _, err = run_cli([*common, "--out", tmp_path / "b", "--direct_num_workers=2",
                            "--direct_running_mode=multi_processing"], capsys)
    assert code == 0, err
    for split in ("train", "heldout"):
        a, b = Manifest.read(tmp_path / "a" / split), Manifest.read(tmp_path / "b" / split)
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    train = Manifest.read(tmp_path / "a" / "train")
    assert train.counts["packing_units"] > 2 and len(train.shards) > 2
    assert [s.rows for s in train.shards[:-1]] == [300] * (len(train.shards) - 1)
    assert train.counts["sequences"] == train.num_rows
    train, heldout = all_text(tmp_path / "a" / "train"), all_text(tmp_path / "a" / "heldout")
    docs = [json.loads(line) for line in _jsonl_lines(sample_corpus)]
    held = [d for d in docs if d["text"][:200] in heldout]
    assert 0.1 < len(held) / len(docs) < 0.3
    assert not any(d["text"][:200] in train for d in held), "held-out documents leaked into training shards"


def _jsonl_lines(path):
    import io

    import zstandard

    with open(path, "rb") as f:
        yield from io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")


def test_user_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(["build-corpus", tmp_path / "nothing.jsonl", "--out", tmp_path / "o", "--order", "random"],
                           capsys)
    assert code == 2 and err.strip() == f"error: input not found: {tmp_path / 'nothing.jsonl'}"
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    code, _, err = run_cli(["build-corpus", tmp_path / "x.jsonl", "--out", tmp_path / "o", "--tokenizer",
                            tmp_path / "missing-tok"], capsys)
    assert code == 2 and "tokenizer not found" in err and "Traceback" not in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("user file")
    code, _, err = run_cli(["build-corpus", tmp_path / "x.jsonl", "--out", tmp_path / "busy"], capsys)
    assert code == 2 and "not empty" in err


@pytest.mark.slow
def test_rerun_after_a_kill_during_the_shards_stage_finishes_like_an_uninterrupted_run(tmp_path, sample_corpus):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipelines.build_corpus import build_corpus
    from pipelines.options import BuildOptions

    root = Path(__file__).resolve().parents[2]
    common = {"inputs": [str(sample_corpus)], "order": "random", "seq_len": 64, "rows_per_shard": 50, "seed": 5,
              "tail": "pad", "domain_field": "domain"}
    build_corpus(BuildOptions(out=str(tmp_path / "ref"), **common), log=lambda *_: None)
    killed = tmp_path / "killed"
    script = ("import json, sys; from pipelines.build_corpus import build_corpus; from pipelines.options import "
              "BuildOptions; build_corpus(BuildOptions(**json.loads(sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps({**common, "out": str(killed)})], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "train" / "_commits").glob("*/*.json")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the shards pipeline has committed its first partition
    finally:
        proc.wait()
    assert (killed / "_work" / "order" / "train" / "_DONE.json").is_file() and \
        not (killed / "train" / "_DONE.json").exists(), "the kill did not land inside the shards stage"
    summary = build_corpus(BuildOptions(out=str(killed), **common), log=lambda *_: None)
    assert summary.stages["order/train"]["status"].startswith("skipped") and summary.stages["shards/train"]["status"] == "ran"
    resumed = sum(v["done_before"] for k, v in summary.partitions.items() if k.startswith("train/"))
    assert resumed >= 1, summary.partitions  # committed partitions were kept, not redone
    assert not (killed / "train" / "_commits").exists() and not (killed / "train" / "_STARTED.json").exists()
    assert [s.sha256 for s in Manifest.read(killed / "train").shards] == \
        [s.sha256 for s in Manifest.read(tmp_path / "ref" / "train").shards]
