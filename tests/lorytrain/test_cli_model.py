"""`lory eval`, `lory generate` and `lory analyze` on a tiny trained run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import lory
from lorydata.dataset import ShardDataset
from lorytrain.errors import LoryTrainError
from lorytrain.runs import load_run
from tests.lorytrain.runkit import train_tiny_run


@pytest.fixture(scope="module")
def tiny_run(text_shards, tmp_path_factory):
    train, _ = text_shards
    out = tmp_path_factory.mktemp("cli_run") / "run"
    return train_tiny_run(train, out)


def invoke(*args):
    result = CliRunner().invoke(lory, [str(a) for a in args], catch_exceptions=True)
    return result


def test_eval_json_matches_a_direct_computation(tiny_run, text_shards):
    _, heldout = text_shards
    result = invoke("eval", tiny_run, "--data", heldout, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    overall, domains = report["overall"], report["domains"]
    assert report["checkpoint"]["step"] == 6
    assert set(domains) == {"git", "postgres", "perlpod", "perlcode", "bible"}
    assert overall["tokens"] == sum(d["tokens"] for d in domains.values())
    weighted = sum(d["loss"] * d["tokens"] for d in domains.values()) / overall["tokens"]
    assert overall["loss"] == pytest.approx(weighted, rel=1e-9)
    assert overall["ppl"] == pytest.approx(math.exp(overall["loss"]))
    # the same numbers from a plain forward pass over every held-out sequence
    run = load_run(tiny_run)
    pad = ShardDataset(heldout).manifest.tokenizer["pad_id"]
    ids = torch.stack([s["input_ids"] for s in ShardDataset(heldout, shuffle=False, epochs=1, even=False)])
    with torch.no_grad():
        logits = run.model(ids)
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), targets, reduction="none")
    keep = targets != pad
    total, count = float(losses[keep].sum()), int(keep.sum())
    assert count == overall["tokens"]
    assert overall["loss"] == pytest.approx(total / count, rel=1e-5)


def test_generate_is_seeded_and_every_routing_mode_works(tiny_run):
    args = ["generate", tiny_run, "--prompt", "git rebase", "--prompt", "In the beginning", "--max-new-tokens", "12",
            "--json", "--device", "cpu"]
    first, again = invoke(*args, "--seed", "3"), invoke(*args, "--seed", "3")
    assert first.exit_code == 0, first.output
    outputs = json.loads(first.output)
    assert [o["prompt"] for o in outputs] == ["git rebase", "In the beginning"]
    assert first.output == again.output
    segment = invoke(*args, "--routing", "segment", "--temperature", "0")
    assert segment.exit_code == 0 and len(json.loads(segment.output)) == 2
    causal = [invoke(*args, "--routing", "causal", "--temperature", "0") for _ in range(2)]
    assert causal[0].exit_code == 0 and len(json.loads(causal[0].output)) == 2, causal[0].output
    assert causal[0].output == causal[1].output


def test_analyze_writes_heatmaps_and_numbers(tiny_run, text_shards, tmp_path):
    _, heldout = text_shards
    result = invoke("analyze", tiny_run, "--data", heldout, "--out", tmp_path, "--max-batches", "3", "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["layers"]) == 2
    for layer in report["layers"]:
        assert 0.0 <= layer["expert_use"] <= 1.0
        for weights in layer["domain_weights"].values():
            assert np.isclose(sum(weights), 1.0, atol=1e-4)  # lory merge weights are a softmax
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert json.loads((tmp_path / "analysis.json").read_text())["layers"][0]["layer"] == 0


def test_model_commands_refuse_bad_input(tiny_run, tmp_path):
    missing = invoke("eval", tmp_path / "nothing", "--data", tmp_path)
    assert isinstance(missing.exception, LoryTrainError) and "run folder not found" in str(missing.exception)
    no_prompt = invoke("generate", tiny_run)
    assert isinstance(no_prompt.exception, LoryTrainError) and "--prompt" in str(no_prompt.exception)
