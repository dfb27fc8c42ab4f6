"""What a user sees when a build cannot go on: one line and an exit code, never a traceback,
and a rerun that resumes — Ctrl-C, a write that fails (full disk), an `--out` that cannot be
written, two builds on one `--out`, an `--out` inside an input folder."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from lorydata.lock import LockOwner
from lorydata.manifest import Manifest
from tests.pipelines.test_build_random import run_cli

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--order", "random", "--seq-len", "64", "--domain-field", "domain", "--rows-per-shard", "40", "--seed", "3"]


def lory(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORY_DEBUG": ""}
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_ctrl_c_exits_130_in_one_line_and_the_rerun_resumes(sample_corpus, tmp_path):
    out = tmp_path / "corpus"
    proc = lory(["build-corpus", sample_corpus, "--out", out, "--buckets", 4, *ARGS])
    deadline = time.monotonic() + 180
    while not list((out / "_work" / "documents" / "_commits").glob("*/*.json")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    after = [line for line in err.split("documents: running", 1)[-1].splitlines() if line.strip()]
    assert len(after) == 1 and "Traceback" not in err, err  # after the progress lines, one line: "aborted"
    assert not (out / "lory.lock").exists(), "the interrupted build released its lock"
    done = lory(["build-corpus", sample_corpus, "--out", out, "--buckets", 4, *ARGS])
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "partitions done by an earlier run" in err, err
    assert Manifest.read(out / "train").num_rows > 0


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing


@pytest.mark.slow
def test_a_write_that_fails_is_one_line_and_the_rerun_finishes(sample_corpus, tmp_path, capsys):
    out = tmp_path / "corpus"
    proc = lory(["build-corpus", sample_corpus, "--out", out, *ARGS], preexec_fn=_limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rerun" in last and "Traceback" not in err, err
    code, _, err = run_cli(["build-corpus", sample_corpus, "--out", out, *ARGS], capsys)
    assert code == 0, err
    assert Manifest.read(out / "train").num_rows > 0


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_stage(where, sample_corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "corpus" if where == "under a file" else Path("/proc/lory-test/corpus")
    code, _, err = run_cli(["build-corpus", sample_corpus, "--out", out, *ARGS], capsys)
    assert code == 2 and err.startswith(f"error: cannot write to --out {out}") and len(err.strip().splitlines()) == 1
    assert "documents: running" not in err


def test_a_second_build_on_a_busy_out_is_refused_naming_the_owner(sample_corpus, tmp_path, capsys):
    out = tmp_path / "corpus"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = LockOwner.me("lory build-corpus")
        (out / "lory.lock").write_text(json.dumps({**asdict(owner), "pid": sleeper.pid, "started": None}))
        code, _, err = run_cli(["build-corpus", sample_corpus, "--out", out, *ARGS], capsys)
        assert code == 2 and f"pid {sleeper.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    code, _, err = run_cli(["build-corpus", sample_corpus, "--out", out, *ARGS], capsys)  # the owner is gone
    assert code == 0, err


def test_an_out_inside_an_input_folder_is_left_out_of_the_inputs(sample_corpus, tmp_path, capsys):
    inputs = tmp_path / "dumps"
    inputs.mkdir()
    (inputs / "sample.jsonl.zst").write_bytes(sample_corpus.read_bytes())
    out = inputs / "corpus"
    code, _, err = run_cli(["build-corpus", inputs, "--out", out, *ARGS, "--json"], capsys)
    assert code == 0, err
    first = Manifest.read(out / "train").counts["pipeline"]["records_read"]
    code, stdout, err = run_cli(["build-corpus", inputs, "--out", out, *ARGS, "--json", "--overwrite"], capsys)
    assert code == 0 and "skipped 1: 1 output" in err, err
    assert json.loads(stdout)["documents"]["records_read"] == first, "lory read its own outputs as input"
