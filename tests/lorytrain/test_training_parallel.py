"""Multi-process paths of `lory train` emulated on CPU (2-process gloo torchrun): held-out
evaluation with rows split unevenly, upcycling shard by shard, FSDP mixed precision."""

import pytest
import torch

from lorydata.tokenizer import Tokenizer
from lorytrain import evaluation
from lorytrain.evaluation import evaluate
from lorytrain.model import ModelConfig, build_model
from lorytrain.runs import load_run
from lorytrain.training.metrics_log import read_metrics
from tests.lorytrain.runkit import sample_documents, write_shards
from tests.lorytrain.test_training import TINY, _torchrun

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
    monkeypatch.setattr(evaluation, "max_over_ranks", lambda value, device: value + 2)  # a rank with 2 more batches
    padded = evaluate(model, heldout_21, batch_size=2, device=device, autocast_dtype=dtype)
    assert rows == [2] * 10 + [1] + [1, 1]  # 21 rows in 11 batches, then 2 passes without rows
    assert padded == alone


@pytest.mark.slow
def test_fsdp_evaluation_of_unevenly_split_rows_equals_one_process(text_shards, heldout_21, tmp_path):
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
