"""`lory train`, `lory eval` and `lory inspect` on a corpus in a bucket (moto's S3 server on
127.0.0.1): the same losses, evaluation and resume as from the local copy, and the
tokenizer the corpus carries copied into the run folder. Every run is the TINY model of
`tests.lorytrain.runkit` (through `run` and `_overrides`)."""

from __future__ import annotations

import json
import shutil

import pytest

from lorydata.manifest import Manifest
from lorydata.tokenizer import DEFAULT_TOKENIZER
from lorytrain.training.metrics_log import read_metrics
from tests.lorydata.test_stream import upload_folder
from tests.lorytrain.runkit import make_corpus
from tests.lorytrain.test_training import _cli, _overrides, losses, run

OPTIONS = {"steps": 6, "batch_size": 4, "lr": 1e-2, "dense_warmup": 0.5, "experts": 4, "save_every": 3,
           "num_workers": 2, "eval_batches": 2, "keep_last": 5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(train, heldout) local folders that carry their tokenizer.json, as built corpora do."""
    train, heldout = make_corpus(tmp_path_factory.mktemp("streamed"))
    for folder in (train, heldout):
        shutil.copy(DEFAULT_TOKENIZER, folder / "tokenizer.json")
        manifest = Manifest.read(folder)
        manifest.tokenizer["file"] = "tokenizer.json"
        manifest.write(folder)
    return train, heldout


@pytest.fixture(scope="module")
def urls(s3, corpus):
    train, heldout = corpus
    return upload_folder(s3, train, "corpus/train"), upload_folder(s3, heldout, "corpus/heldout")


def _flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _evals(out) -> list[dict]:
    return [r["eval"] for r in read_metrics(out) if "eval" in r]


@pytest.mark.slow
def test_train_eval_and_resume_from_a_bucket_repeat_the_local_run(corpus, urls, tmp_path):
    (train, heldout), (train_url, heldout_url) = corpus, urls
    local = tmp_path / "local"
    run(train, local, eval_data=str(heldout), **OPTIONS)

    streamed = tmp_path / "streamed"
    result = _cli("train", "--data", train_url, "--eval-data", heldout_url, "--out", str(streamed), "--cache-dir",
                  str(tmp_path / "cache"), "--cache-limit", "10MB", *_flags(OPTIONS), "--warmup", "2",
                  "--log-every", "1", *_overrides())
    assert result.returncode == 0, result.stderr
    assert losses(streamed) == losses(local) and len(losses(local)) == 6
    assert _evals(streamed) == _evals(local)
    assert (streamed / "tokenizer.json").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    assert any(p.name.endswith(".arrow") for p in (tmp_path / "cache").iterdir())

    # a checkpoint of the local run resumes on the bucket's copy at the same sample
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(local / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    (resumed / "checkpoints" / "latest").write_text("step-00000003")
    run(train_url, resumed, resume=True, eval_data=heldout_url, cache_dir=str(tmp_path / "cache"), **OPTIONS)
    assert losses(resumed) == {step: loss for step, loss in losses(local).items() if step > 3}

    def evaluate(data: str) -> dict:
        done = _cli("eval", str(streamed), "--data", data, "--batch-size", "4", "--json", "--cache-dir",
                    str(tmp_path / "cache"))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert evaluate(heldout_url) == evaluate(str(heldout))


def test_inspect_a_bucket_folder(corpus, urls, tmp_path):
    (train, _), (train_url, _) = corpus, urls

    def inspect(folder: str) -> dict:
        done = _cli("inspect", folder, "--show", "5", "--json", "--cache-dir", str(tmp_path / "cache"))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    here, there = inspect(str(train)), inspect(train_url)
    assert there["folder"] == train_url and there["verification"]["ok"]
    assert [c["file"] for c in there["verification"]["shards"]] == [c["file"] for c in here["verification"]["shards"]]
    assert there["summary"] == here["summary"] and there["sequence"] == here["sequence"]


def test_a_bucket_without_a_corpus_is_one_line(s3, tmp_path):
    result = _cli("train", "--data", s3.url("nowhere/train"), "--out", str(tmp_path / "run"), "--steps", "1",
                  *_overrides())
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --data: no .manifest.json at {s3.url('nowhere/train')}: not a finished lory shard "
                     "folder"], result.stderr
    bad = _cli("train", "--data", s3.url("nowhere/train"), "--out", str(tmp_path / "run"), "--steps", "1",
               "--cache-limit", "lots")
    assert bad.returncode == 2 and "--cache-limit: cache limit 'lots' is not a size" in bad.stderr

