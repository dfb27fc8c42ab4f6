"""`lory build-corpus` to `--out s3://…` against a real S3 API (moto's server on 127.0.0.1):
the same shards as a local build, resume after a kill, one writer per output, and nothing
of the build on local disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorydata.manifest import MANIFEST_NAME, Manifest
from pipelines.build_corpus import build_corpus
from pipelines.options import BuildOptions
from tests.pipelines.test_build_dask import CHARS, DOCS
from tests.pipelines.test_build_random import _jsonl_lines

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"seq_len": 128, "domain_field": "domain", "heldout_fraction": 0.2, "rows_per_shard": 50, "seed": 5,
          "k": 5, "embed_max_tokens": 64}


@pytest.fixture(scope="module")
def cut(sample_corpus, tmp_path_factory) -> Path:
    lines = [json.loads(line) for _, line in zip(range(DOCS), _jsonl_lines(sample_corpus), strict=False)]
    path = tmp_path_factory.mktemp("sample") / "cut.jsonl"
    path.write_text("".join(json.dumps({**d, "text": d["text"][:CHARS]}) + "\n" for d in lines))
    return path


def quiet(*_):
    pass


def s3_hashes(s3, prefix: str) -> dict[str, list[str]]:
    """Shard sha256 per split of a build on S3, read from its manifests."""
    found = {}
    for split in ("train", "heldout"):
        body = s3.client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{split}/{MANIFEST_NAME}")["Body"].read()
        found[split] = [s["sha256"] for s in json.loads(body)["shards"]]
    return found


def local_hashes(out: Path) -> dict[str, list[str]]:
    return {split: [s.sha256 for s in Manifest.read(out / split).shards] for split in ("train", "heldout")}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["random", "similarity"])
def test_build_to_s3_gives_the_local_shards(order, s3, cut, tmp_path):
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(tmp_path / "local"), order=order, **COMMON), log=quiet)
    prefix = f"{order}/corpus"
    build_corpus(BuildOptions(inputs=[str(cut)], out=s3.url(prefix), order=order, **COMMON), log=quiet)
    assert s3_hashes(s3, prefix) == local_hashes(tmp_path / "local")
    keys = s3.keys(prefix)
    assert f"{prefix}/train/tokenizer.json" in keys and f"{prefix}/dead_letters" not in keys
    assert not [k for k in keys if "/_commits/" in k or k.endswith(("lory.lock", "_STARTED.json", ".inprogress"))]
    again = build_corpus(BuildOptions(inputs=[str(cut)], out=s3.url(prefix), order=order, **COMMON), log=quiet)
    assert all(stage["status"].startswith("skipped") for stage in again.stages.values())


@pytest.mark.slow
def test_a_second_build_on_the_same_s3_out_is_refused(s3, cut):
    from lorydata.errors import LoryDataError

    prefix = "busy/corpus"
    owner = {"host": "another-host", "pid": 4242, "started": None, "pid_namespace": "", "command": "lory build-corpus",
             "since": "2026-12-05T10:00:00Z", "token": "t"}
    s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/lory.lock", Body=json.dumps(owner).encode())
    with pytest.raises(LoryDataError, match=r"being written by pid 4242 on another-host"):
        build_corpus(BuildOptions(inputs=[str(cut)], out=s3.url(prefix), order="random", **COMMON), log=quiet)
    assert s3.keys(prefix) == [f"{prefix}/lory.lock"], "a refused build writes nothing"


@pytest.mark.slow
def test_kill_mid_build_on_s3_and_rerun_gives_the_same_shards(s3, cut, tmp_path):
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(tmp_path / "local"), order="random", **COMMON), log=quiet)
    prefix = "killed/corpus"
    payload = json.dumps({**COMMON, "order": "random", "inputs": [str(cut)], "out": s3.url(prefix)})
    script = ("import json, sys; from pipelines.build_corpus import build_corpus; from pipelines.options import "
              "BuildOptions; build_corpus(BuildOptions(**json.loads(sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", script, payload], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not [k for k in s3.keys(f"{prefix}/train/_commits/")] and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # inside the shards stage of the train split
    finally:
        proc.wait()
    assert f"{prefix}/lory.lock" in s3.keys(prefix), "the killed build left its lock"
    assert f"{prefix}/train/_DONE.json" not in s3.keys(prefix), "the kill did not land inside the shards stage"
    summary = build_corpus(BuildOptions(inputs=[str(cut)], out=s3.url(prefix), order="random", **COMMON), log=quiet)
    assert summary.stages["shards/train"]["status"] == "ran"
    assert sum(v["done_before"] for k, v in summary.partitions.items() if k.startswith("train/")) >= 1
    assert s3_hashes(s3, prefix) == local_hashes(tmp_path / "local")
