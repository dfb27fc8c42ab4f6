"""Checkpoints that survive a cluster: verification and fallback, full disks, preemption
signals, per-rank RNG states and sharded loading."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorytrain.errors import LoryTrainError
from lorytrain.runs import find_checkpoint, load_run
from lorytrain.training import checkpoint as checkpoint_module
from lorytrain.training.checkpoint import find_valid_checkpoint, load_rng_state, verify_checkpoint
from lorytrain.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from lorytrain.training.rng import rng_state, set_rng_state
from lorytrain.training.trainer import Trainer
from tests.lorytrain.runkit import wait_for_steps
from tests.lorytrain.test_training import REPO, _overrides, config, losses, run

STEP = "step-{:08d}".format


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _copy_checkpoints(source: Path, target: Path, steps) -> None:
    (target / "checkpoints").mkdir(parents=True)
    for step in steps:
        shutil.copytree(source / "checkpoints" / STEP(step), target / "checkpoints" / STEP(step))


def test_state_json_records_every_file_and_verification_catches_damage(text_shards, tmp_path):
    run(text_shards[0], tmp_path / "run", steps=2, ffn="dense")
    path = tmp_path / "run" / "checkpoints" / STEP(2)
    files = json.loads((path / "state.json").read_text())["files"]
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "state.json"}
    assert set(files) == on_disk and {"model.safetensors", "rng/rank-00000.pt", "optimizer/.metadata"} <= on_disk
    assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in files.items())
    assert verify_checkpoint(path) is None
    optimizer_shard = next(name for name in files if name.endswith(".distcp"))
    data = bytearray((path / optimizer_shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (path / optimizer_shard).write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(path)
    assert verify_checkpoint(path, only=("model.safetensors",)) is None  # evaluation does not need it
    _truncate(path / "model.safetensors")
    assert "truncated" in verify_checkpoint(path, only=("model.safetensors",))


def test_damaged_newest_checkpoint_falls_back_and_continues_bit_for_bit(text_shards, tmp_path):
    """Steps 1-12 straight; a copy whose newest checkpoint (8) is truncated resumes from 4 with
    a message naming both, and repeats the straight run's losses and final weights exactly."""
    train, _ = text_shards
    options = {"steps": 12, "dense_warmup": 0.5, "save_every": 4, "keep_last": 5}
    run(train, tmp_path / "straight", **options)
    interrupted = tmp_path / "interrupted"
    _copy_checkpoints(tmp_path / "straight", interrupted, (4, 8))
    _truncate(interrupted / "checkpoints" / STEP(8) / "model.safetensors")
    messages = []
    trainer = Trainer(config(train, interrupted, resume=True, **options), log=messages.append)
    assert trainer.step == 4
    assert any("step-00000008 is damaged" in m and "truncated" in m for m in messages), messages
    assert any("falling back to checkpoint step-00000004" in m for m in messages), messages
    trainer.train()
    straight, resumed = losses(tmp_path / "straight"), losses(interrupted)
    assert [resumed[s] for s in range(5, 13)] == [straight[s] for s in range(5, 13)]
    final_a = load_file(str(tmp_path / "straight" / "checkpoints" / STEP(12) / "model.safetensors"))
    final_b = load_file(str(interrupted / "checkpoints" / STEP(12) / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # the damaged checkpoint is kept, renamed out of the way of the resumed run's own step 8
    assert (interrupted / "checkpoints" / "step-00000008.damaged" / "model.safetensors").exists()
    assert verify_checkpoint(interrupted / "checkpoints" / STEP(8)) is None


def test_no_valid_checkpoint_is_a_one_line_error(text_shards, tmp_path):
    train, _ = text_shards
    run(train, tmp_path / "run", steps=4, ffn="dense", save_every=2, keep_last=2)
    _truncate(tmp_path / "run" / "checkpoints" / STEP(4) / "model.safetensors")
    (tmp_path / "run" / "checkpoints" / STEP(2) / "state.json").unlink()
    with pytest.raises(LoryTrainError) as info:
        find_valid_checkpoint(tmp_path / "run", log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message and "no valid checkpoint" in message
    assert "step-00000004: model.safetensors has" in message and "step-00000002: state.json is missing" in message
    result = subprocess.run([sys.executable, "-m", "cli", "train", "--data", str(train), "--out",
                             str(tmp_path / "run"), "--steps", "4", "--ffn", "dense", "--resume", "auto",
                             *_overrides()], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LORY_PROGRESS": "0"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "no valid checkpoint" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_eval_side_loading_verifies_and_falls_back(text_shards, tmp_path, caplog):
    train, _ = text_shards
    run(train, tmp_path / "run", steps=4, ffn="dense", save_every=2, keep_last=2)
    _truncate(tmp_path / "run" / "checkpoints" / STEP(4) / "model.safetensors")
    with pytest.raises(LoryTrainError, match=r"step-00000004 is damaged: model\.safetensors has"):
        find_checkpoint(tmp_path / "run", STEP(4))
    with caplog.at_level("WARNING", logger="lory"):
        loaded = load_run(tmp_path / "run")
    assert loaded.checkpoint.name == STEP(2) and loaded.state["step"] == 2
    assert "step-00000004 is damaged" in caplog.text and "falling back to checkpoint step-00000002" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / STEP(4)).exists()  # reading never renames


@pytest.mark.parametrize("target", ["save_file", "torch.save", "optimizer shards"])
def test_full_disk_fails_clearly_and_keeps_earlier_checkpoints(text_shards, tmp_path, monkeypatch, target):
    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=4, ffn="dense", save_every=2, keep_last=1),
                      log=lambda *a, **k: None)

    def full_disk(original):
        def write(obj, path, *args, **kwargs):
            if STEP(4) in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original(obj, path, *args, **kwargs)
        return write

    if target == "save_file":
        monkeypatch.setattr(checkpoint_module, "save_file", full_disk(checkpoint_module.save_file))
    elif target == "torch.save":
        monkeypatch.setattr(checkpoint_module.torch, "save", full_disk(torch.save))
    else:  # inside torch.distributed.checkpoint, which reports it wrapped in a CheckpointException
        from torch.distributed.checkpoint import filesystem

        write_item = filesystem._write_item

        def dcp_full_disk(*args, **kwargs):
            if trainer.step == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write_item(*args, **kwargs)

        monkeypatch.setattr(filesystem, "_write_item", dcp_full_disk)
    with pytest.raises(LoryTrainError) as info:
        trainer.train()
    message = str(info.value)
    assert "cannot write checkpoint step-00000004" in message and "No space left on device" in message
    assert "disk full" in message and "earlier checkpoints are intact" in message and "\n" not in message
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP(2)]  # no temp folder left
    assert (root / "latest").read_text() == STEP(2) and verify_checkpoint(root / STEP(2)) is None


def test_sigterm_mid_step_checkpoints_the_step_and_resumes_exactly(text_shards, tmp_path, monkeypatch):
    """SIGTERM during step 4 (and again while its checkpoint is written): step 4 completes, is
    saved intact, the run stops with `Preempted`; resuming gives the uninterrupted losses."""
    train, _ = text_shards
    options = {"steps": 8, "dense_warmup": 0.5}
    run(train, tmp_path / "straight", **options)
    trainer = Trainer(config(train, tmp_path / "run", **options), log=lambda *a, **k: None)
    micro_step = trainer._micro_step

    def signalled(ids, last):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(ids, last)

    def signalled_save(tensors, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal in the middle of the save
        return save_file(tensors, path, *args, **kwargs)

    save_file = checkpoint_module.save_file
    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "_micro_step", signalled)
    monkeypatch.setattr(checkpoint_module, "save_file", signalled_save)
    with pytest.raises(Preempted) as info:
        trainer.train()
    assert info.value.step == 4 and info.value.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored
    saved = tmp_path / "run" / "checkpoints"
    assert [p.name for p in saved.glob("step-*")] == [STEP(4)] and verify_checkpoint(saved / STEP(4)) is None
    monkeypatch.undo()
    run(train, tmp_path / "run", resume=True, **options)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [resumed[s] for s in range(1, 9)] == [straight[s] for s in range(1, 9)]


def test_sigterm_to_the_cli_exits_with_the_preemption_code(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli", "train", "--data", str(train), "--out", str(out), "--steps", "5000",
               "--ffn", "dense", "--batch-size", "2", *_overrides()]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LORY_PROGRESS": "0"})
    wait_for_steps(out / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert 2 <= step < 5000 and f"preempted by SIGTERM at step {step}" in stderr
    assert verify_checkpoint(out / "checkpoints" / STEP(step)) is None
    assert max(losses(out)) == step


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def _torchrun(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "cli", "train", *args, *_overrides()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigterm_to_one_torchrun_rank_stops_all_at_one_step_and_resumes_exactly(text_shards, tmp_path):
    """2-process gloo torchrun: SIGTERM to rank 1 alone. Both ranks stop after the same step
    (the flag is all-reduced), write one consistent checkpoint and exit 75; `--resume auto`
    then repeats the uninterrupted run's losses."""
    train, _ = text_shards
    options = ["--data", str(train), "--steps", "40", "--batch-size", "2", "--dense-warmup", "0.25",
               "--record-samples"]
    straight = _torchrun([*options, "--out", str(tmp_path / "straight")])
    out = tmp_path / "run"
    preempted = _torchrun([*options, "--out", str(out)])
    wait_for_steps(out / "samples" / "rank-1.jsonl", 2, preempted)
    workers = {_rank_of(pid): pid for pid in _children(preempted.pid)}
    os.kill(workers[1], signal.SIGTERM)
    _, stderr = preempted.communicate(timeout=300)
    assert preempted.returncode != 0 and stderr.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") == 2, stderr[-3000:]
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert 2 <= step < 40 and f"preempted by a signal to another rank at step {step}" in stderr
    assert verify_checkpoint(out / "checkpoints" / STEP(step)) is None
    for rank in (0, 1):  # both ranks trained exactly `step` steps
        records = (out / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in records] == list(range(1, step + 1))
    _, stderr = straight.communicate(timeout=300)
    assert straight.returncode == 0, stderr[-3000:]
    resumed = _torchrun([*options, "--out", str(out), "--resume", "auto"])
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    a, b = losses(tmp_path / "straight"), losses(out)
    assert [b[s] for s in range(1, 41)] == [a[s] for s in range(1, 41)]


# ---- per-rank RNG states -------------------------------------------------------------------
class _FakeCuda:
    """Records which device generators are set; `count` devices are visible."""

    def __init__(self, monkeypatch, count: int):
        self.set: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), device.index,
                                                                                          dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._set_all)

    def _set(self, state, device="cuda"):
        if device.index >= torch.cuda.device_count():
            raise IndexError(f"no device {device.index}")
        self.set[device.index] = state

    def _set_all(self, states):  # what resuming used to call: one state per saved device
        for index, state in enumerate(states):
            self._set(state, torch.device("cuda", index))


def test_rng_state_of_a_run_saved_on_more_devices_restores_without_crash(monkeypatch):
    """An older checkpoint holds all 8 devices' states; on a machine with 1 visible device the
    process restores the state of its own device only."""
    cuda = _FakeCuda(monkeypatch, count=1)
    saved = rng_state(torch.device("cpu"))
    saved["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]
    with pytest.raises(IndexError):  # the old restore, for reference
        torch.cuda.set_rng_state_all(saved["cuda"])
    cuda.set.clear()
    set_rng_state(saved, torch.device("cuda", 0))
    assert list(cuda.set) == [0] and torch.equal(cuda.set[0], saved["cuda"][0])
    cuda.set.clear()
    set_rng_state({k: v for k, v in saved.items() if k != "cuda"}, torch.device("cuda", 0))
    assert cuda.set == {}  # nothing saved for the device: its generator keeps its seed


def test_each_rank_restores_its_own_rng_and_new_ranks_take_rank_0s(monkeypatch, tmp_path):
    cuda = _FakeCuda(monkeypatch, count=8)
    (tmp_path / "rng").mkdir()
    for rank in range(4):  # a run saved by 4 ranks, rank r on cuda:r
        torch.manual_seed(100 + rank)
        torch.save(rng_state(torch.device("cuda", rank)), tmp_path / "rng" / f"rank-{rank:05d}.pt")
    for rank, source in ((2, 2), (6, 0)):  # rank 6 did not exist when the run was saved
        torch.manual_seed(100 + source)
        expected = torch.rand(3)
        load_rng_state(tmp_path, rank, torch.device("cuda", rank))
        assert torch.equal(torch.rand(3), expected)
        assert int(cuda.set[rank][0]) == source  # the device state saved by rank `source`


# ---- sharded loading -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_load_equals_full_load(tmp_path):
    """A checkpoint written by 2 FSDP2 ranks: each rank loads only its shards of the weights and
    optimizer state, and the result gathers to exactly what a single process loads in full."""
    torch.multiprocessing.spawn(_sharded_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    from lorytrain.model import ModelConfig, build_model
    from lorytrain.training.checkpoint import load_model_weights, load_optimizer_state

    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    model = build_model(ModelConfig.from_dict(gathered["config"]))
    optimizer = torch.optim.AdamW(model.parameters())
    load_model_weights(model, tmp_path / "checkpoint")
    load_optimizer_state(model, optimizer, tmp_path / "checkpoint")  # resharded: 2 ranks → 1
    full = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert gathered["weights"].keys() == full.keys()
    assert all(torch.equal(gathered["weights"][k], full[k]) and torch.equal(model.state_dict()[k], full[k])
               for k in full)
    names = dict(model.named_parameters())
    for name, moments in gathered["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(optimizer.state[names[name]][key], value), (name, key)


def _sharded_worker(rank: int, folder: str, port: int) -> None:
    import torch.distributed as dist

    from lorytrain.model import ModelConfig, build_model
    from lorytrain.training.checkpoint import load_model_weights, load_optimizer_state, save_checkpoint
    from lorytrain.training.distributed import DistEnv, full_optimizer_state, full_state_dict, wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        env = DistEnv(rank, 2, rank, torch.device("cpu"))
        config = ModelConfig.from_preset("tiny", ffn="lory", n_experts=4, n_layers=2, d_model=32, n_heads=2,
                                         ffn_dim=60, segment_len=8, vocab_size=101)  # 101, 60: uneven shards
        torch.manual_seed(0)
        model = wrap_model(build_model(config), env, "fsdp")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(rank))
        model(ids).float().logsumexp(-1).mean().backward()
        optimizer.step()
        weights = full_state_dict(model)
        save_checkpoint(folder, 1, weights if rank == 0 else None, {"step": 1}, model=model, optimizer=optimizer,
                        rank=rank)
        saved = Path(folder) / "checkpoints" / "step-00000001"
        torch.manual_seed(1)  # other initial weights: the load must overwrite every shard
        fresh = wrap_model(build_model(config), env, "fsdp")
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        load_model_weights(fresh, saved)
        load_optimizer_state(fresh, fresh_optimizer, saved)
        reloaded = full_state_dict(fresh)
        moments = full_optimizer_state(fresh, fresh_optimizer).get("state")  # on rank 0
        if rank == 0:
            shutil.copytree(saved, Path(folder) / "checkpoint")
            torch.save({"config": config.to_dict(), "weights": reloaded,
                        "optimizer": moments},
                       Path(folder) / "gathered.pt")
    finally:
        dist.destroy_process_group()


def test_a_damaged_unhashed_checkpoint_is_a_one_line_error(text_shards, tmp_path):
    """Checkpoints written before files were hashed are only checked for presence; a damaged
    one still ends in a one-line error, not a safetensors traceback."""
    run(text_shards[0], tmp_path / "run", steps=2, ffn="dense")
    path = tmp_path / "run" / "checkpoints" / STEP(2)
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))
    _truncate(path / "model.safetensors")
    assert verify_checkpoint(path) is None
    with pytest.raises(LoryTrainError, match=r"cannot read .*model\.safetensors") as info:
        load_run(tmp_path / "run")
    assert "\n" not in str(info.value)
    with pytest.raises(LoryTrainError, match=r"cannot read .*model\.safetensors"):
        Trainer(config(text_shards[0], tmp_path / "run", steps=4, ffn="dense", resume=True))
