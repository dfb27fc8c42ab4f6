"""Device choice, step timing and the training benchmark's runs, as on a GPU machine."""

import time
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_train
from lorytrain.errors import LoryTrainError
from lorytrain.training import trainer as trainer_module
from lorytrain.training.trainer import Trainer, lm_loss
from tests.lorytrain.test_training import TINY, config

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_step_time_waits_for_the_optimizer_step_before_reading_the_clock(text_shards, tmp_path, monkeypatch, device):
    """On CUDA `optimizer.step()` only queues kernels: tokens/s and MFU must include them."""
    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=2, ffn="lory", dense_warmup=0.0, device=device),
                      log=lambda *a, **k: None)
    events = []
    clock, sync, step = time.perf_counter, trainer_module.synchronize, trainer.optimizer.step

    def traced(name, call):
        def run(*args, **kwargs):
            events.append(name)
            return call(*args, **kwargs)
        return run

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=traced("clock", clock)))
    monkeypatch.setattr(trainer_module, "synchronize", traced("synchronize", sync))
    monkeypatch.setattr(trainer.optimizer, "step", traced("optimizer.step", step))
    record = trainer._optimizer_step(trainer._batches())
    assert events == ["clock", "optimizer.step", "synchronize", "clock"]
    assert record["tokens_per_s"] > 0


def test_bench_train_cpu_section_stays_on_the_cpu_and_writes_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    data = bench_train.random_shards(tmp_path / "data", seq_len=64, sequences=16)
    result = bench_train.time_run(data, tmp_path / "run", skip=0, steps=2, ffn="dense", **bench_train.CPU_RUN)
    assert result["device"] == "cpu" and result["tokens_per_s"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_save_every_zero_still_saves_at_the_end_unless_told_not_to(text_shards, tmp_path):
    train, _ = text_shards
    Trainer(config(train, tmp_path / "default", steps=1, ffn="dense"), log=lambda *a, **k: None).train()
    assert (tmp_path / "default" / "checkpoints" / "step-00000001").is_dir()
    Trainer(config(train, tmp_path / "bench", steps=1, ffn="dense", save_final=False), log=lambda *a, **k: None).train()
    assert not (tmp_path / "bench" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where torch sees no GPU")
def test_asking_for_cuda_without_a_gpu_is_a_one_line_error(text_shards, tmp_path):
    train, _ = text_shards
    with pytest.raises(LoryTrainError, match="--device cuda: torch sees no CUDA GPU"):
        Trainer(config(train, tmp_path / "run", steps=1, device="cuda"))


@pytest.mark.gpu
def test_upcycling_on_cuda_keeps_the_loss_and_allocates_no_second_copy(text_shards, tmp_path):
    """One CUDA device: the MoE weights and its experts' Adam moments are allocated once
    (before: gathered state dicts, a rebuilt dense model and cloned moments besides)."""
    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=4, dense_warmup=0.5, device="cuda", precision="fp32",
                             model_overrides={**TINY, "ffn_dim": 512}), log=lambda *a, **k: None)
    batches = trainer._batches()
    while trainer.step < trainer.plan.upcycle_step:
        trainer._optimizer_step(batches)
    ids = next(trainer._batches())["input_ids"].cuda()
    with torch.no_grad():
        before = lm_loss(trainer.model(ids), ids, trainer.pad_id).item()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    trainer._upcycle()
    grown = torch.cuda.max_memory_allocated() - start
    with torch.no_grad():
        after = lm_loss(trainer.model(ids), ids, trainer.pad_id).item()
    assert after == pytest.approx(before, abs=1e-5)
    weights = sum(p.numel() * p.element_size() for p in trainer.raw_model.parameters())
    assert grown <= 3 * weights  # the MoE weights, plus 2 moments of the experts only
    trainer._optimizer_step(batches)


@pytest.mark.gpu
def test_batches_come_pinned_and_are_copied_without_blocking(text_shards, tmp_path, monkeypatch):
    train, _ = text_shards
    trainer = Trainer(config(train, tmp_path / "run", steps=1, ffn="dense", device="cuda"), log=lambda *a, **k: None)
    batch = next(trainer._batches())
    assert batch["input_ids"].is_pinned()
    copies = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(k.get("non_blocking")) or original(self, *a, **k))
    trainer._optimizer_step(iter([batch]))
    assert copies and copies[0] is True
