"""`lory train` end to end on tiny real-text shards: learning, upcycling, resume, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorytrain.training.config import make_config
from lorytrain.training.metrics_log import read_metrics
from lorytrain.training.trainer import Trainer, lm_loss
from tests.lorytrain.runkit import TINY

REPO = Path(__file__).resolve().parents[2]


def config(data, out, **options):
    values = {"data": str(data), "out": str(out), "batch_size": 4, "lr": 3e-3, "model_overrides": TINY,
              "warmup": 2, "log_every": 1}
    values.update(options)
    return make_config(None, values)


def run(data, out, **options) -> Trainer:
    trainer = Trainer(config(data, out, **options), log=lambda *a, **k: None)
    trainer.train()
    return trainer


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_tiny_moe_run_learns_upcycles_on_schedule_and_checkpoints(text_shards, tmp_path):
    train, heldout = text_shards
    trainer = run(train, tmp_path / "run", steps=24, dense_warmup=0.25, lr=1e-2, eval_data=str(heldout),
                  eval_batches=2)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))
    phases = [r["phase"] for r in records]
    assert phases == ["dense"] * 6 + ["moe"] * 18  # upcycled before step 7 = 25% of 24
    first, last = [r["loss"] for r in records[:3]], [r["loss"] for r in records[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 1.0
    assert records[-1]["tokens"] == 24 * 4 * 64
    assert all(len(layer) == 8 for layer in records[-1]["expert_use"])
    assert trainer.phase == "moe" and trainer.raw_model.config.ffn == "lory"
    evals = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert evals and set(evals[-1]["eval"]["domains"]) <= {"git", "postgres", "perlpod", "perlcode", "bible"}
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000024"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["phase"] == "moe" and state["model_config"]["n_experts"] == 8
    assert any(".ffn.experts.w" in k for k in load_file(str(checkpoint / "model.safetensors")))


def test_upcycling_keeps_the_loss_and_carries_adam_state(text_shards, tmp_path):
    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=10, dense_warmup=0.5), log=lambda *a, **k: None)
    batches = trainer._batches()
    while trainer.step < trainer.plan.upcycle_step:
        trainer._optimizer_step(batches)
    ids = next(trainer._batches())["input_ids"]
    dense = trainer.raw_model
    with torch.no_grad():
        before = lm_loss(dense(ids), ids, trainer.pad_id)
    dense_moment = trainer.optimizer.state[dense.layers[0].ffn.w]["exp_avg"].clone()
    trainer._upcycle()
    moe = trainer.raw_model
    with torch.no_grad():
        after = lm_loss(moe(ids), ids, trainer.pad_id)
    assert after.item() == pytest.approx(before.item(), abs=1e-5)
    experts = moe.layers[0].ffn.experts.w
    moment = trainer.optimizer.state[experts]["exp_avg"]
    assert torch.equal(moment, dense_moment.unsqueeze(0).expand_as(experts))
    assert trainer.optimizer.state[moe.layers[0].ffn.experts.w]["step"] == trainer.step
    trainer._optimizer_step(batches)  # the MoE trains on from there
    assert trainer.phase == "moe"


@pytest.mark.parametrize("ffn", ["lory", "topk"])
def test_resume_continues_bit_for_bit(text_shards, tmp_path, ffn):
    """Steps 1-6, a checkpoint, resume to 12 == 12 steps straight (upcycling at step 9)."""
    train, _ = text_shards
    options = {"steps": 12, "dense_warmup": 0.75, "ffn": ffn, "save_every": 6, "keep_last": 5}
    run(train, tmp_path / "straight", **options)
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000006", interrupted / "checkpoints" / "step-00000006")
    (interrupted / "checkpoints" / "latest").write_text("step-00000006")
    run(train, interrupted, resume=True, **options)
    straight, resumed = losses(tmp_path / "straight"), losses(interrupted)
    assert sorted(resumed) == list(range(7, 13))
    assert [resumed[s] for s in range(7, 13)] == [straight[s] for s in range(7, 13)]
    final_a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000012" / "model.safetensors"))
    final_b = load_file(str(interrupted / "checkpoints" / "step-00000012" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_refuses_a_checkpoint_of_another_model(text_shards, tmp_path):
    from lorytrain.errors import LoryTrainError

    train, _ = text_shards
    run(train, tmp_path / "run", steps=2, ffn="dense")
    with pytest.raises(LoryTrainError, match="ffn"):
        Trainer(config(train, tmp_path / "run", steps=4, ffn="lory", resume=True))
    with pytest.raises(LoryTrainError, match="already holds a run"):
        Trainer(config(train, tmp_path / "run", steps=4, ffn="dense"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(text_shards, tmp_path):
    from lorytrain.training.trainer import NonFiniteLossError

    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=6, ffn="dense", save_every=2), log=lambda *a, **k: None)
    original = trainer._micro_step

    def poisoned(ids, last):
        loss, aux = original(ids, last)
        return (loss * float("nan") if trainer.step == 3 else loss), aux

    trainer._micro_step = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        trainer.train()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000002"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000002"


def _cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _overrides():
    return [x for k, v in TINY.items() for x in ("--model-override", f"{k}={v}")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seq-len", "128"], "--seq-len 128 does not match the shards"),
        (["--model-override", "n_layerz=2"], "unknown model option(s): n_layerz"),
        (["--config", "{bad}"], "unknown config key(s): learning_rate"),
        (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
    ],
)
def test_user_errors_are_one_line(text_shards, tmp_path, extra, message):
    train, _ = text_shards
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    extra = [str(bad) if x == "{bad}" else x for x in extra]
    result = _cli("train", "--data", str(train), "--out", str(tmp_path / "run"), "--steps", "1", *extra)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_mismatched_tokenizer_between_train_and_eval_data(text_shards, tmp_path):
    from lorydata.tokenizer import train_tokenizer
    from tests.lorytrain.runkit import write_shards

    train, _ = text_shards
    texts = [f"document {i} about something else entirely" for i in range(200)]
    other = train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    write_shards(tmp_path / "other", [("x", t) for t in texts], seq_len=64, tokenizer=other)
    result = _cli("train", "--data", str(train), "--eval-data", str(tmp_path / "other"), "--out",
                  str(tmp_path / "run"), "--steps", "1")
    assert result.returncode == 2 and "another tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_two_process_torchrun_ranks_see_disjoint_data(text_shards, tmp_path):
    train, _ = text_shards
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "cli", "train", "--data", str(train), "--out", str(out), "--steps", "4", "--batch-size", "2",
               "--dense-warmup", "0.5", "--record-samples", *_overrides()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        lines = (out / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        seen[rank] = [i for r in records for i in r["seq_ids"]]
        assert len(seen[rank]) == 8
    assert not set(seen[0]) & set(seen[1])
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["tokens"] == 4 * 2 * 2 * 64
    assert [r["phase"] for r in records] == ["dense", "dense", "moe", "moe"]
    assert (out / "checkpoints" / "step-00000004" / "model.safetensors").exists()


def _torchrun(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "cli", "train", *args, *_overrides()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_fsdp_upcycles_across_shards_and_resumes_exactly(text_shards, tmp_path):
    """FSDP2 on 2 CPU processes: dense steps, upcycling of sharded weights and optimizer state,
    a checkpoint, and a resume from it that repeats the uninterrupted losses."""
    train, _ = text_shards
    options = ["--data", str(train), "--steps", "4", "--batch-size", "2", "--dense-warmup", "0.5",
               "--parallel", "fsdp", "--save-every", "2", "--keep-last", "3"]
    straight = tmp_path / "straight"
    result = _torchrun(*options, "--out", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000002", interrupted / "checkpoints" / "step-00000002")
    result = _torchrun(*options, "--out", str(interrupted), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(straight), losses(interrupted)
    assert [r["phase"] for r in read_metrics(straight) if "loss" in r] == ["dense", "dense", "moe", "moe"]
    assert [b[3], b[4]] == [a[3], a[4]]
    weights = load_file(str(interrupted / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert weights["layers.0.ffn.experts.w"].shape[0] == 8
