"""Multi-process paths of `lory train` emulated on CPU (2-process gloo torchrun): held-out
evaluation with rows split unevenly, upcycling shard by shard, FSDP mixed precision."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lorydata.tokenizer import Tokenizer
from lorytrain import evaluation
from lorytrain.evaluation import evaluate
from lorytrain.model import ModelConfig, build_model
from lorytrain.runs import load_run
from lorytrain.training import model_setup
from lorytrain.training.config import make_config
from lorytrain.training.distributed import full_optimizer_state, load_full_optimizer_state
from lorytrain.training.metrics_log import read_metrics
from lorytrain.training.model_setup import empty_model
from lorytrain.training.trainer import lm_loss
from tests.lorytrain.runkit import sample_documents, write_shards
from tests.lorytrain.test_training import REPO, TINY, _torchrun

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.fixture(scope="module")
def heldout_21(tmp_path_factory):
    """A held-out folder of 21 rows: with batch 2 on 2 ranks, rank 0 gets 6 batches, rank 1 five."""
    folder = tmp_path_factory.mktemp("heldout21")
    manifest = write_shards(folder, sample_documents(lambda i: i % 20 == 1, max_chars=1500)[:3], seq_len=64)
    assert sum(shard.rows for shard in manifest.shards) == 21
    return folder


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_evaluation_runs_the_passes_the_ranks_agree_on_and_counts_only_real_rows(heldout_21, monkeypatch, device):
    """A rank out of rows keeps running forward passes (FSDP all-gathers) as long as the
    busiest rank; those passes add nothing to the result."""
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=Tokenizer().vocab_size, ffn="lory",
                                                n_experts=4, **TINY)).to(device)
    dtype = torch.bfloat16 if device == "cuda" else None
    alone = evaluate(model, heldout_21, batch_size=2, device=device, autocast_dtype=dtype)
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    monkeypatch.setattr(evaluation, "max_over_ranks", lambda value: value + 2)  # a rank with 2 more batches
    padded = evaluate(model, heldout_21, batch_size=2, device=device, autocast_dtype=dtype)
    assert rows == [2] * 10 + [1] + [1, 1]  # 21 rows in 11 batches, then 2 passes without rows
    assert padded == alone


@pytest.mark.slow
def test_fsdp_evaluation_of_unevenly_split_rows_equals_one_process(text_shards, heldout_21, tmp_path):
    """Before: rank 0's sixth batch met rank 1's all_gather_object (gloo aborted, NCCL hangs)."""
    train, _ = text_shards
    out = tmp_path / "run"
    result = _torchrun("--data", str(train), "--eval-data", str(heldout_21), "--out", str(out), "--steps", "1",
                       "--batch-size", "2", "--dense-warmup", "0", "--parallel", "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    (distributed,) = [r["eval"] for r in read_metrics(out) if "eval" in r]
    # the final checkpoint holds the weights the final evaluation saw
    single = evaluate(load_run(out).model, heldout_21, batch_size=2, expected_seq_len=64)
    assert distributed["overall"]["tokens"] == single["overall"]["tokens"] > 0
    assert distributed["overall"]["loss"] == pytest.approx(single["overall"]["loss"], rel=1e-6)
    assert distributed["domains"].keys() == single["domains"].keys()
    for name, entry in single["domains"].items():
        assert distributed["domains"][name]["tokens"] == entry["tokens"]
        assert distributed["domains"][name]["loss"] == pytest.approx(entry["loss"], rel=1e-6)


def _run_probe(kind: str, options: dict, out) -> None:
    """Run `fsdp_probe KIND` on 2 gloo processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "tests.lorytrain.fsdp_probe", kind, str(out), json.dumps(options)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _probe(options: dict, out) -> dict:
    """The upcycling probe's saved results and each rank's byte counts."""
    _run_probe("upcycle", options, out)
    probe = torch.load(out / "upcycle.pt", weights_only=True)
    probe["bytes"] = [json.loads((out / f"bytes-{rank}.json").read_text()) for rank in (0, 1)]
    return probe


@pytest.mark.slow
def test_fsdp_upcycling_builds_only_each_ranks_shards_and_equals_one_process(text_shards, tmp_path):
    """Each rank allocates about half of the MoE's weights and Adam moments, never a whole
    expert bank; the result is exactly what one process makes of the same dense state."""
    train, _ = text_shards
    options = {"data": str(train), "out": str(tmp_path / "run"), "batch_size": 2, "steps": 4, "dense_warmup": 0.5,
               "parallel": "fsdp", "ffn": "lory", "experts": 8, "lr": 3e-3, "warmup": 2,
               "model_overrides": {**TINY, "ffn_dim": 512}}  # an expert bank outweighs the embedding
    probe = _probe(options, tmp_path)
    assert probe["after"] == pytest.approx(probe["before"], abs=1e-5)  # merged copies of one FFN are that FFN

    config = make_config(None, options)
    dense = empty_model(model_setup.model_config(config, Tokenizer().vocab_size, "dense"), "cpu")
    dense.load_state_dict(probe["dense"])
    dense_optimizer = model_setup.make_optimizer(dense, config)
    load_full_optimizer_state(dense, dense_optimizer, probe["dense_optimizer"])
    torch.set_rng_state(probe["rng"])
    moe = model_setup.upcycle_model(dense, config)
    moe_optimizer = model_setup.make_optimizer(moe, config)
    model_setup.carry_optimizer_state(dense, dense_optimizer, moe, moe_optimizer)
    assert moe.state_dict().keys() == probe["moe"].keys()
    assert all(torch.equal(value, probe["moe"][name]) for name, value in moe.state_dict().items())
    expected = full_optimizer_state(moe, moe_optimizer)["state"]
    assert expected.keys() == probe["moe_optimizer"]["state"].keys()
    for name, state in expected.items():
        assert all(torch.equal(value, probe["moe_optimizer"]["state"][name][key]) for key, value in state.items())
    with torch.no_grad():
        assert lm_loss(moe(probe["ids"]), probe["ids"], None).item() == pytest.approx(probe["after"], rel=1e-6)

    weights = sum(p.numel() * p.element_size() for p in moe.parameters())
    bank = moe.layers[0].ffn.experts.w
    for counted in probe["bytes"]:
        # its half of the weights and 2 Adam moments, plus one dense FFN gathered at a time
        # (before: 2.97 × the whole of them on every rank, a whole expert bank at once)
        assert counted["total"] < 0.55 * 3 * weights
        assert counted["largest"] <= bank.numel() * bank.element_size() // 2


@pytest.mark.slow
def test_fsdp_gathers_bf16_weights_under_bf16_precision_and_keeps_fp32_shards(text_shards, tmp_path):
    """A MixedPrecisionPolicy: all-gathers move bf16 (half the traffic of fp32); the sharded
    weights and Adam moments stay fp32, gradients are reduced in fp32."""
    train, _ = text_shards
    options = {"data": str(train), "out": str(tmp_path / "run"), "batch_size": 2, "steps": 1, "ffn": "dense",
               "parallel": "fsdp", "precision": "bf16", "model_overrides": TINY}
    _run_probe("precision", options, tmp_path)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"precision-{rank}.json").read_text())
        assert seen["compute"] == "torch.bfloat16"
        assert seen["sharded_type"] == "DTensor"
        assert seen["sharded"] == seen["moments"] == "torch.float32"
        assert math.isfinite(seen["loss"])
