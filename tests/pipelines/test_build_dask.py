"""`lory build-corpus --runner dask` end to end on a 2-worker LocalCluster: the same shards
byte for byte as the default in-process runner, and the same counts and dead letters."""

import json

import pytest

from lorydata.manifest import Manifest
from tests.lorydata.badcorpus import MAX_CHARS, write_bad_corpus
from tests.pipelines.test_build_random import _jsonl_lines, run_cli

DOCS, CHARS = 100, 1500  # a cut of the bundled sample: every domain, seconds per build


@pytest.fixture(scope="module")
def sample_cut(sample_corpus, tmp_path_factory):
    lines = [json.loads(line) for _, line in zip(range(DOCS), _jsonl_lines(sample_corpus), strict=False)]
    path = tmp_path_factory.mktemp("sample") / "cut.jsonl"
    path.write_text("".join(json.dumps({**d, "text": d["text"][:CHARS]}) + "\n" for d in lines))
    return path


def build_both(tmp_path, capsys, cluster, args):
    """Build with the default runner into `local/` and on the cluster into `dask/`."""
    code, _, err = run_cli([*args, "--out", tmp_path / "local"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--out", tmp_path / "dask", "--runner", "dask", "--dask-address",
                            cluster.scheduler_address], capsys)
    assert code == 0, err
    return tmp_path / "local", tmp_path / "dask"


def assert_same_shards(local, dask, splits=("train", "heldout")):
    for split in splits:
        a, b = Manifest.read(local / split), Manifest.read(dask / split)
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards], f"{split} shards differ"
        assert a.counts == b.counts and a.order == b.order


@pytest.mark.slow
@pytest.mark.parametrize("order", ["random", "similarity"])
def test_sample_corpus_gives_byte_identical_shards(order, dask_cluster, sample_cut, tmp_path, capsys):
    args = ["build-corpus", sample_cut, "--order", order, "--seq-len", 128, "--domain-field", "domain",
            "--heldout-fraction", 0.2, "--rows-per-shard", 50, "--seed", 5, "--k", 5, "--embed-max-tokens", 64]
    local, dask = build_both(tmp_path, capsys, dask_cluster, args)
    assert_same_shards(local, dask)
    assert Manifest.read(dask / "train").counts["pipeline"]["documents_kept"] == DOCS


def dead_letters(out):
    letters = [json.loads(line) for f in (out / "dead_letters").glob("*.jsonl") for line in f.read_text().splitlines()]
    return sorted((d["source"].rsplit("/", 1)[-1], d["line"], d["reason"], d["detail"]) for d in letters)


def test_dirty_corpus_gives_the_same_counts_and_dead_letters_with_workers_option(tmp_path, capsys):
    """Also the README's `--workers 2`: lory starts a local cluster for the build and closes it."""
    expected = write_bad_corpus(tmp_path)
    args = ["build-corpus", tmp_path / "bad.jsonl", "--order", "random", "--seq-len", 16, "--tail", "pad",
            "--domain-field", "domain", "--id-field", "id", "--max-chars", MAX_CHARS, "--rows-per-shard", 4]
    code, _, err = run_cli([*args, "--out", tmp_path / "local"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--out", tmp_path / "dask", "--runner", "dask", "--workers", 2], capsys)
    assert code == 0, err
    local, dask = tmp_path / "local", tmp_path / "dask"
    assert dead_letters(dask) == dead_letters(local)
    assert {(line, reason) for _, line, reason, _ in dead_letters(dask)} == expected["dead"]
    assert_same_shards(local, dask, splits=("train",))
    assert Manifest.read(dask / "train").counts["pipeline"]["documents_kept"] == len(expected["good_ids"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", 2], "error: --workers needs --runner dask"),
    (["--runner", "dask", "--dask-address", "tcp://127.0.0.1:9", "--workers", 2], "error: give --dask-address"),
])
def test_runner_option_mistakes_are_one_line(flags, message, tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    code, _, err = run_cli(["build-corpus", tmp_path / "x.jsonl", "--out", tmp_path / "o", *flags], capsys)
    assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err
