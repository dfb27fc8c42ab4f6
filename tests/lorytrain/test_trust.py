"""Run folders and corpora from elsewhere: resuming never runs code a folder holds, reads
nothing outside it, refuses hostile configs and another corpus, keeps one writer per run, and
every failure (a full disk, Ctrl-C) is one line."""

import dataclasses
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main as lory_main
from lorydata.errors import ShardError
from lorydata.lock import LOCK_NAME
from lorydata.tokenizer import DEFAULT_TOKENIZER
from lorytrain.errors import LoryTrainError
from lorytrain.runs import find_checkpoint, load_run
from lorytrain.training import checkpoint as checkpoint_module
from lorytrain.training.checkpoint import verify_checkpoint
from lorytrain.training.trainer import Trainer
from tests.lorydata.trustkit import edit_manifest, set_token
from tests.lorytrain.runkit import sample_documents, wait_for_steps, write_shards
from tests.lorytrain.test_training import REPO, _overrides, config, losses, run

STEP = "step-{:08d}".format
QUIET = {"log": lambda *a, **k: None}


class _Payload:
    """Unpickling this creates `marker`: what a hostile folder's code would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli(args: list[str], timeout: float = 300, preexec_fn=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, env={**os.environ, "LORY_PROGRESS": "0", **env})


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--ffn", "dense", "--batch-size", "4", *_overrides(),
            *extra]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = _errors(result.stderr)
    assert result.returncode == code and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _rehash(checkpoint: Path) -> None:
    """Record the current files' sizes and sha256 in state.json, as an attacker can."""
    state = json.loads((checkpoint / "state.json").read_text())
    state["files"] = checkpoint_module._file_records(checkpoint)
    (checkpoint / "state.json").write_text(json.dumps(state))


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


# ---- item 1: nothing a run folder holds is unpickled -------------------------------------------
def _poison_metadata(checkpoint: Path, marker: Path) -> None:
    (checkpoint / "optimizer" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))


def _poison_optimizer_item(checkpoint: Path, marker: Path) -> None:
    """Point the optimizer's `param_groups.0.lr` item at a pickled payload appended to its shard
    (DCP reads non-tensor items with full unpickling)."""
    metadata_file = checkpoint / "optimizer" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own file: the test may unpickle it
    key = next(k for k in metadata.storage_data if k.fqn == "param_groups.0.lr")
    info = metadata.storage_data[key]
    shard = checkpoint / "optimizer" / info.relative_path
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[key] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    metadata_file.write_bytes(pickle.dumps(metadata))


def _poison_rng(checkpoint: Path, marker: Path) -> None:
    torch.save(_Payload(marker), checkpoint / "rng" / "rank-00000.pt")


@pytest.mark.parametrize(("poison", "hashes"), [(_poison_metadata, "rehashed"), (_poison_metadata, "dropped"),
                                                (_poison_optimizer_item, "rehashed"), (_poison_rng, "rehashed")])
def test_resume_never_runs_a_pickled_payload(text_shards, tmp_path, poison, hashes):
    """A `__reduce__` payload in the optimizer metadata, in an optimizer item or in the RNG
    state, with matching hashes in state.json (or none): `lory train --resume` refuses it in
    one line and the payload never runs."""
    train, _ = text_shards
    out, marker = tmp_path / "run", tmp_path / "pwned"
    run(train, out, steps=2, ffn="dense")
    checkpoint = out / "checkpoints" / STEP(2)
    poison(checkpoint, marker)
    if hashes == "rehashed":
        _rehash(checkpoint)
    else:  # without a files record only presence is checked
        state = json.loads((checkpoint / "state.json").read_text())
        del state["files"]
        (checkpoint / "state.json").write_text(json.dumps(state))
    result = _cli(_train_args(train, out, "--steps", "4", "--resume"))
    assert not marker.exists(), "the payload ran"
    line = _one_error_line(result)
    assert "refusing" in line and str(checkpoint) in line, line


def test_restricted_reader_still_loads_real_optimizer_state_exactly(text_shards, tmp_path):
    """The restricted metadata reader loads what DCP wrote: a resumed MoE run (sharded expert
    state, upcycled) repeats the uninterrupted run's losses."""
    train, _ = text_shards
    options = {"steps": 8, "dense_warmup": 0.25, "save_every": 4, "keep_last": 3, "experts": 4}
    run(train, tmp_path / "straight", **options)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / STEP(4), tmp_path / "resumed" / "checkpoints" / STEP(4))
    run(train, tmp_path / "resumed", resume=True, **options)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]


# ---- item 3: paths read from state.json and the manifest stay inside their folder ---------------
def test_state_json_file_entries_outside_the_checkpoint_are_refused(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    run(train, out, steps=4, ffn="dense", save_every=2, keep_last=3)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 100)
    newest = out / "checkpoints" / STEP(4)
    state = json.loads((newest / "state.json").read_text())
    state["files"]["../../../secret.bin"] = {"bytes": 100, "sha256": checkpoint_module.file_sha256(secret)}
    (newest / "state.json").write_text(json.dumps(state))
    problem = verify_checkpoint(newest)
    assert "'../../../secret.bin'" in problem and "state.json" in problem and "\n" not in problem
    with pytest.raises(LoryTrainError, match=r"secret\.bin"):
        find_checkpoint(out, STEP(4))  # `lory eval --checkpoint` refuses it
    messages = []
    trainer = Trainer(config(train, out, steps=6, ffn="dense", save_every=2, keep_last=3, resume=True),
                      log=messages.append)
    assert trainer.step == 2 and any("secret.bin" in m and "damaged" in m for m in messages), messages
    trainer.close()


def test_tokenizer_is_copied_only_from_the_corpus_folder(text_shards, tmp_path):
    """The manifest's absolute `path` is never read: a corpus naming a secret file there gets the
    bundled tokenizer (the one that made it) copied, a `file` beside the manifest is copied
    verified, and a `file` outside the folder is refused in one line."""
    train = _copy(text_shards[0], tmp_path / "corpus")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    edit_manifest(train, lambda data: data["tokenizer"].update(path=str(secret)))
    run(train, tmp_path / "a", steps=1, ffn="dense")
    copied = tmp_path / "a" / "tokenizer.json"
    assert copied.read_bytes() == DEFAULT_TOKENIZER.read_bytes()

    shutil.copyfile(DEFAULT_TOKENIZER, train / "tokenizer.json")
    edit_manifest(train, lambda data: data["tokenizer"].update(file="tokenizer.json"))
    run(train, tmp_path / "b", steps=1, ffn="dense")
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (train / "tokenizer.json").read_bytes()

    edit_manifest(train, lambda data: data["tokenizer"].update(file="../secret.txt"))
    with pytest.raises(LoryTrainError, match=r"manifest\.json: tokenizer file '\.\./secret\.txt'.*refused"):
        Trainer(config(train, tmp_path / "c", steps=1, ffn="dense"), **QUIET)
    assert not (tmp_path / "c" / "tokenizer.json").exists()


# ---- item 6: token ids against the vocabulary -------------------------------------------------
def test_training_on_out_of_range_ids_names_the_shard_and_row(text_shards, tmp_path):
    """Before: an IndexError deep in the embedding. Now: one line naming shard and row, also
    when the shard is read in a DataLoader worker."""
    train = tmp_path / "corpus"
    write_shards(train, sample_documents(lambda i: i % 10 == 0), seq_len=64, rows_per_shard=10_000)  # one shard
    set_token(train, shard=0, row=3, position=7, value=10**6)
    with pytest.raises(ShardError, match=r"shard-00000\.arrow: row 3 holds token id 1000000"):
        run(train, tmp_path / "run", steps=40, ffn="dense")
    result = _cli(_train_args(train, tmp_path / "cli", "--steps", "40", "--num-workers", "1"))
    line = _one_error_line(result)
    assert "shard-00000.arrow: row 3 holds token id 1000000" in line, line


# ---- item 7: model configs read from state.json ----------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"n_layers": 1_000_000}, "n_layers must be a positive integer up to 1,024"),
    ({"d_model": 2**40}, "d_model must be a positive integer up to"),
    ({"norm_eps": "tiny"}, "norm_eps must be a finite number"),
    ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ({"n_layers": 1024, "d_model": 65536, "ffn_dim": 262144}, "more than the 1,000,000,000,000 lory builds"),
    ({"n_layers": 3}, "does not hold the model its config describes"),
    (None, "records no model_config"),
])
def test_hostile_model_config_is_one_line_before_any_allocation(text_shards, tmp_path, change, message):
    train, heldout = text_shards
    out = tmp_path / "run"
    run(train, out, steps=1, ffn="dense")
    state_file = out / "checkpoints" / STEP(1) / "state.json"
    state = json.loads(state_file.read_text())
    if change is None:
        del state["model_config"]
    else:
        state["model_config"].update(change)
    state_file.write_text(json.dumps(state))
    with pytest.raises(LoryTrainError) as info:
        load_run(out)
    assert message in str(info.value) and "\n" not in str(info.value)
    if change == {"n_layers": 1_000_000}:
        result = _cli(["eval", str(out), "--data", str(heldout), "--device", "cpu"], timeout=120)
        assert message in _one_error_line(result)


def test_parameter_count_is_shown_before_the_model_is_built(text_shards, tmp_path, caplog):
    train, _ = text_shards
    messages = []
    Trainer(config(train, tmp_path / "run", steps=1, ffn="lory", experts=4), log=messages.append).close()
    assert any(m.startswith("model: lory × 4 experts, 2 layers, d 32:") and "M parameters" in m for m in messages)
    run(train, tmp_path / "run2", steps=1, ffn="dense")
    with caplog.at_level("INFO", logger="lory"):
        load_run(tmp_path / "run2")
    assert "dense, 2 layers, d 32" in caplog.text and "M parameters" in caplog.text


# ---- item 8: full disk, Ctrl-C, one line ------------------------------------------------------
def _file_size_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # Python ignores SIGXFSZ: writes get EFBIG


@pytest.mark.slow
def test_checkpoint_over_the_file_size_limit_is_one_line_and_leaves_no_temp_folder(text_shards, tmp_path):
    """The real write path, no mocks: a process limited to 1 MiB files (RLIMIT_FSIZE) fails
    to write its step-4 checkpoint with the OS's reason in one line; step 2 stays the latest."""
    train, _ = text_shards
    out = tmp_path / "run"
    first = _cli(_train_args(train, out, "--steps", "2", "--save-every", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    result = _cli(_train_args(train, out, "--steps", "4", "--save-every", "2", "--resume"),
                  preexec_fn=_file_size_limit)
    line = _one_error_line(result)
    assert line.startswith(f"error: cannot write checkpoint {STEP(4)} in {out / 'checkpoints'}: File too large")
    assert "earlier checkpoints are intact" in line
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP(2)]
    assert (root / "latest").read_text() == STEP(2) and verify_checkpoint(root / STEP(2)) is None
    assert not (out / LOCK_NAME).exists()


_FULL_DISK_SCRIPT = """
set -e
mount -t tmpfs -o size=10m tmpfs "$MOUNT"
"$PYTHON" -m cli $FIRST >/dev/null 2>&1
set +e
"$PYTHON" -m cli $SECOND 2>"$MOUNT/../stderr.txt"
echo "rc=$?"
ls -a "$MOUNT/run/checkpoints" | tr '\\n' ' '; echo
cat "$MOUNT/run/checkpoints/latest"; echo
"""


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_is_the_promised_line(text_shards, tmp_path):
    """A real full disk: a 10 MiB tmpfs in a private mount namespace (`unshare -rm`, where the
    kernel allows unprivileged user namespaces) holds the step-2 checkpoint but not step 4's."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare with user and mount namespaces for a private tmpfs")
    train, _ = text_shards
    mount = tmp_path / "disk"
    mount.mkdir()
    common = " ".join(_train_args(train, mount / "run", "--save-every", "2"))
    env = {**os.environ, "LORY_PROGRESS": "0", "MOUNT": str(mount), "PYTHON": sys.executable,
           "FIRST": f"{common} --steps 2", "SECOND": f"{common} --steps 4 --resume"}
    result = subprocess.run(["unshare", "-rm", "bash", "-c", _FULL_DISK_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    rc, listing, latest = result.stdout.strip().splitlines()[-3:]
    stderr = (tmp_path / "stderr.txt").read_text()
    lines = _errors(stderr)
    assert rc == "rc=2" and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write checkpoint {STEP(4)} in ")
    assert "No space left on device (disk full: free space or point --out elsewhere); earlier checkpoints are " \
           "intact" in lines[0]
    assert listing.split() == [".", "..", "latest", STEP(2)] and latest == STEP(2)


def test_ctrl_c_during_a_checkpoint_leaves_no_temp_folder_or_lock(text_shards, tmp_path, monkeypatch):
    train, _ = text_shards
    out = tmp_path / "run"
    trainer = Trainer(config(train, out, steps=4, ffn="dense", save_every=2), **QUIET)
    save_file = checkpoint_module.save_file

    def interrupted(tensors, path, *args, **kwargs):
        if STEP(4) in str(path):
            raise KeyboardInterrupt
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP(2)]
    assert not (out / LOCK_NAME).exists()


def _long_run(train: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *_train_args(train, out, "--steps", "5000")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORY_PROGRESS": "0"})


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    process = _long_run(train, out)
    wait_for_steps(out / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr[-3000:]
    assert "Traceback" not in stderr and not (out / LOCK_NAME).exists()


def test_unexpected_errors_are_one_line_with_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    import lorydata.verify

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(lorydata.verify, "inspect_folder", broken)
    for args, traced in ((["inspect", str(tmp_path)], False), (["--debug", "inspect", str(tmp_path)], True)):
        with pytest.raises(SystemExit) as info:
            lory_main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert info.value.code == 1 and len(lines) == 1 and "something inside broke second line" in lines[0]
        assert ("Traceback" in err) == traced
    with pytest.raises(SystemExit):
        lory_main(["inspect", str(tmp_path / "missing")])
    assert "Traceback" not in capsys.readouterr().err


# ---- item 9: damage at a step that was set aside before --------------------------------------
def test_second_damage_at_the_same_step_gets_a_fresh_set_aside_name(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    options = {"steps": 4, "ffn": "dense", "save_every": 2, "keep_last": 5}
    run(train, out, **options)
    root = out / "checkpoints"
    shutil.copytree(root / STEP(4), root / f"{STEP(4)}.damaged")  # set aside by an earlier resume
    (root / STEP(4) / "model.safetensors").write_bytes(b"garbage")
    messages = []
    trainer = Trainer(config(train, out, resume=True, **options), log=messages.append)
    assert trainer.step == 2
    assert any(f"aside as {STEP(4)}.damaged-2" in m for m in messages), messages
    assert (root / f"{STEP(4)}.damaged" / "model.safetensors").stat().st_size > 100  # the first one untouched
    assert (root / f"{STEP(4)}.damaged-2" / "model.safetensors").read_bytes() == b"garbage"
    trainer.train()
    assert verify_checkpoint(root / STEP(4)) is None


# ---- item 11: resuming on the run's own corpus -----------------------------------------------
def test_resume_refuses_another_corpus_of_the_same_shape(text_shards, tmp_path):
    train, _ = text_shards
    other = _copy(train, tmp_path / "other")
    set_token(other, shard=0, row=0, position=0, value=7)  # same shape, other content
    out = tmp_path / "run"
    run(train, out, steps=2, ffn="dense")
    with pytest.raises(LoryTrainError, match=r"is not the corpus this run trained on.*--allow-data-change"):
        Trainer(config(other, out, steps=4, ffn="dense", resume=True), **QUIET)
    result = _cli(_train_args(other, out, "--steps", "4", "--resume"))
    assert "not the corpus this run trained on" in _one_error_line(result)
    messages = []
    trainer = Trainer(config(other, out, steps=4, ffn="dense", resume=True, allow_data_change=True),
                      log=messages.append)
    assert trainer.step == 2 and any("continuing on it" in m for m in messages)
    trainer.train()
    state = json.loads((out / "checkpoints" / STEP(4) / "state.json").read_text())
    assert state["data_sha256"] == trainer.data_sha256 != json.loads(
        (out / "checkpoints" / STEP(2) / "state.json").read_text())["data_sha256"]  # now the run's corpus


# ---- one writer per run folder ---------------------------------------------------------------
def test_second_trainer_on_the_same_out_is_refused_naming_the_owner(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    first = Trainer(config(train, out, steps=2, ffn="dense"), **QUIET)
    with pytest.raises(LoryTrainError) as info:
        Trainer(config(train, out, steps=2, ffn="dense", resume=True), **QUIET)
    message = str(info.value)
    assert f"is being written by pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    first.train()
    assert not (out / LOCK_NAME).exists()
    run(train, out, steps=3, ffn="dense", resume=True)


def test_stale_lock_of_a_dead_trainer_is_taken_over(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": None,
                                             "pid_namespace": os.readlink("/proc/self/ns/pid"),
                                             "command": "lory train", "since": "x", "token": "t"}))
    messages = []
    Trainer(config(train, out, steps=1, ffn="dense"), log=messages.append).train()
    assert any(f"took over the stale lock of pid {dead.pid}" in m for m in messages), messages


def test_out_that_cannot_be_created_is_one_line(text_shards, tmp_path):
    (tmp_path / "file").write_text("x")
    result = _cli(_train_args(text_shards[0], tmp_path / "file" / "run", "--steps", "1"))
    assert "cannot create" in _one_error_line(result)


@pytest.mark.slow
def test_second_lory_train_exits_at_once_while_the_first_runs(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    first = _long_run(train, out)
    try:
        wait_for_steps(out / "metrics.jsonl", 1, first)
        second = _cli(_train_args(train, out, "--steps", "5000", "--resume"), timeout=120)
        line = _one_error_line(second)
        assert f"is being written by pid {first.pid} on {socket.gethostname()}" in line and "lory train" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75 and not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_the_run_folder_is_locked(text_shards, tmp_path):
    """Only rank 0 takes the lock; it tells the other ranks, so all stop with the same line
    instead of one rank training alone or the others waiting forever."""
    train, _ = text_shards
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({
            "host": socket.gethostname(), "pid": holder.pid, "started": None,
            "pid_namespace": os.readlink("/proc/self/ns/pid"), "command": "lory train", "since": "x", "token": "t"}))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
                   "cli", *_train_args(train, out, "--steps", "4")]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "LORY_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    finally:
        holder.kill()
        holder.wait()
    # rank 0 exits 2 first; torchrun may stop rank 1 before it prints its own copy of the line
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert any(f"being written by pid {holder.pid}" in line for line in _errors(result.stderr))
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()

