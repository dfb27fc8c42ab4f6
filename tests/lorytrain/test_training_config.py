import itertools
import math

import pytest

from lorytrain.errors import LoryTrainError
from lorytrain.training.config import TrainConfig, make_config, parse_overrides
from lorytrain.training.schedule import lr_at, warmup_steps


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    total, warm, peak = 100, 10, 1e-3
    rates = [lr_at(s, peak, total, warm, min_lr_ratio=0.1) for s in range(total)]
    assert rates[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(peak)
    assert rates[-1] == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    mid = lr_at(10 + (total - warm - 1) // 2, peak, total, warm, 0.1)
    assert mid == pytest.approx(0.1 * peak + 0.5 * 0.9 * peak * (1 + math.cos(math.pi * 44 / 89)))
    assert warmup_steps(0.05, 200) == 10 and warmup_steps(7, 200) == 7


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: a\nout: b\nsteps: 10\nlr: 0.01\nmodel-overrides: {n_layers: 2}\n")
    config = make_config(path, {"lr": 0.5, "steps": None})
    assert (config.lr, config.steps, config.model_overrides) == (0.5, 10, {"n_layers": 2})
    toml = tmp_path / "run.toml"
    toml.write_text('data = "a"\nout = "b"\ntokens = 1000\n')
    assert make_config(toml, {}).tokens == 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("data: a\nout: b\nsteps: 1\nlearning_rate: 3\n", "unknown config key"),
        ("data: a\nout: b\n", "give --steps or --tokens"),
        ("[not: yaml: at all", "cannot parse config"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(LoryTrainError, match=message):
        make_config(path, {})


def test_missing_config_file_and_bad_override():
    with pytest.raises(LoryTrainError, match="config file not found"):
        make_config("/nonexistent.yaml", {})
    with pytest.raises(LoryTrainError, match="KEY=VALUE"):
        parse_overrides(["n_layers"])
    assert parse_overrides(["n_layers=2", "tie_embeddings=true", "rope_theta=1e4"]) == {
        "n_layers": 2, "tie_embeddings": True, "rope_theta": 1e4}


def test_dense_warmup_defaults_to_five_percent_for_moe_only():
    assert TrainConfig(ffn="lory").dense_warmup_fraction == 0.05
    assert TrainConfig(ffn="dense").dense_warmup_fraction == 0.0
    assert TrainConfig(ffn="topk", dense_warmup=0.0).dense_warmup_fraction == 0.0


def test_plan_turns_tokens_into_steps_accumulation_and_upcycle_step():
    from lorytrain.training.trainer import make_plan

    base = {"data": "a", "out": "b", "batch_size": 4}
    plan = make_plan(make_config(None, {**base, "tokens": 100_000, "tokens_per_step": 4096}), seq_len=256, world_size=2)
    assert plan.accum == 2  # 4 × 256 × 2 ranks = 2048 tokens per micro-step
    assert plan.steps == 25  # ceil(100000 / 4096)
    assert plan.upcycle_step == 1 and plan.warmup == 1  # round(5% of 25) for both
    dense = make_plan(make_config(None, {**base, "steps": 40, "ffn": "dense"}), seq_len=256, world_size=1)
    assert (dense.accum, dense.steps, dense.upcycle_step) == (1, 40, 40)  # dense never upcycles
    moe = make_plan(make_config(None, {**base, "steps": 40, "dense_warmup": 0.0}), seq_len=256, world_size=1)
    assert moe.upcycle_step == 0  # MoE from the first step
