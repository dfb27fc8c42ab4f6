"""Routing analysis: expert use, domain specialisation (MI vs shuffled labels), heatmaps, runs."""

import json
import math

import numpy as np
import pytest
import torch

from lorydata.manifest import Manifest
from lorytrain.analysis import (
    RoutingCollection,
    analyze_routing,
    collect_routing,
    plot_heatmaps,
    run_analysis,
    segment_labels,
    write_analysis,
)
from lorytrain.errors import LoryTrainError
from lorytrain.model import ModelConfig, build_model
from lorytrain.training.checkpoint import save_checkpoint

DOMAINS = ["bible", "git", "perlcode", "perlpod", "postgres"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def collection(weights, domains, layers=None, n_layers=None) -> RoutingCollection:
    """One (S, E) array, or a list of them (one per layer)."""
    weights = weights if isinstance(weights, list) else [weights]
    layers = layers or list(range(len(weights)))
    return RoutingCollection(layers, [np.asarray(w, dtype=np.float32) for w in weights],
                             np.array(domains, dtype=object), n_layers or len(layers), "lory", 8)


def specialised(n_per_domain=100, n_experts=8, seed=0) -> tuple[np.ndarray, list[str]]:
    """Each domain puts most of its weight on its own expert."""
    rng = np.random.default_rng(seed)
    domains = [d for d in DOMAINS for _ in range(n_per_domain)]
    weights = rng.dirichlet(np.ones(n_experts), size=len(domains)) * 0.3
    for row, name in enumerate(domains):
        weights[row, DOMAINS.index(name)] += 0.7
    return weights, domains


def test_domain_specific_routing_has_mutual_information_log_domains():
    weights, domains = specialised()
    result = analyze_routing(collection(weights, domains), n_shuffles=20, seed=0)
    spec = result["layers"][0]["specialisation"]
    assert result["unit"] == "nats"
    assert spec["mi"] == pytest.approx(math.log(len(DOMAINS)), abs=1e-9)
    assert spec["nmi"] == pytest.approx(1.0, abs=1e-9)
    # the plug-in bias of 500 segments, 5 domains × 8 experts is about (5-1)(5-1)/(2·500)
    assert spec["mi_shuffled"] < 0.05
    assert spec["mi_excess"] > 1.5
    weights_of = result["layers"][0]["domain_weights"]
    assert list(weights_of) == sorted(DOMAINS)
    for name in DOMAINS:
        assert int(np.argmax(weights_of[name])) == DOMAINS.index(name)
        assert weights_of[name][DOMAINS.index(name)] > 0.7
    assert result["domains"] == {name: 100 for name in DOMAINS}


def test_routing_independent_of_domain_is_at_the_shuffled_baseline():
    rng = np.random.default_rng(1)
    domains = list(rng.choice(DOMAINS, size=2000))
    weights = rng.dirichlet(np.ones(8), size=2000)
    spec = analyze_routing(collection(weights, domains), n_shuffles=20, seed=0)["layers"][0]["specialisation"]
    assert spec["mi_shuffled"] > 0  # finite counts always show some MI
    assert abs(spec["mi_excess"]) < 4 * spec["mi_shuffled_std"] + 1e-3
    assert spec["nmi"] < 0.01


def test_expert_use_on_a_hand_computed_example():
    # E = 4: active means weight > 2/4 = 0.5 (exactly 0.5 is not active)
    weights = np.array([
        [0.7, 0.1, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.1, 0.55, 0.2, 0.15],
        [0.25, 0.25, 0.25, 0.25],
        [0.5, 0.5, 0.0, 0.0],
    ])
    domains = ["a", "a", "b", "b", "b"]
    layer = analyze_routing(collection(weights, domains))["layers"][0]
    np.testing.assert_allclose(layer["active_share"], [0.4, 0.2, 0.0, 0.0])
    assert layer["expert_use"] == 0.5  # experts 0 and 1 are active in ≥ 1% of segments
    assert analyze_routing(collection(weights, domains), min_share=0.3)["layers"][0]["expert_use"] == 0.25
    assert layer["mean_active_experts"] == pytest.approx(3 / 5)
    # top-1: 0, 0, 1, 0 (first of the ties), 0
    np.testing.assert_allclose(layer["top1_share"], [0.8, 0.2, 0.0, 0.0])
    np.testing.assert_allclose(layer["domain_weights"]["a"], [0.65, 0.15, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(layer["domain_weights"]["b"], [0.85 / 3, 1.3 / 3, 0.45 / 3, 0.4 / 3], rtol=1e-6)
    assert analyze_routing(collection(weights, domains))["threshold"] == 0.5


def test_summary_groups_layers_into_thirds():
    weights, domains = specialised()
    rng = np.random.default_rng(2)
    noise = rng.dirichlet(np.ones(8), size=len(domains))
    # 6 decoder layers: 0-1 lower, 2-3 middle, 4-5 upper; only the middle ones specialise
    layers = [noise, noise, weights, weights, noise, noise]
    result = analyze_routing(collection(layers, domains, layers=list(range(6))), n_shuffles=5)
    groups = result["summary"]["groups"]
    assert [groups[g]["layers"] for g in ("lower", "middle", "upper")] == [[0, 1], [2, 3], [4, 5]]
    assert groups["middle"]["mi_excess"] > 1.5 > 0.1 > groups["lower"]["mi_excess"]
    assert result["summary"]["middle_minus_others_mi_excess"] > 1.4
    assert result["summary"]["most_specialised_layer"] in (2, 3)


def test_heatmaps_and_json_are_written(tmp_path):
    weights, domains = specialised(n_per_domain=20)
    result = analyze_routing(collection([weights] * 6, domains, layers=[1, 2, 3, 5, 7, 8], n_layers=10), n_shuffles=3)
    paths = plot_heatmaps(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["routing_layers_01-05.png", "routing_layers_07-08.png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    result["layers"][0]["specialisation"]["nmi"] = float("nan")  # must not break the JSON
    written = json.loads(write_analysis(result, tmp_path).read_text())
    assert written["layers"][0]["specialisation"]["nmi"] is None
    assert written["layers"][1]["specialisation"]["mi"] == pytest.approx(math.log(5))
    assert written["domains"]["git"] == 20


def test_segment_labels_take_the_majority_and_skip_padding():
    ids = np.array([1] * 9 + [0] * 3)  # pad id 0: the last 3 tokens
    assert segment_labels([0, 5], ["a", "b"], ids, 0, 4) == ["a", "b", None]  # 1 text token of 4
    ids = np.array([1] * 10 + [0] * 2)
    assert segment_labels([0, 5], ["a", "b"], ids, 0, 4) == ["a", "b", "b"]
    # a tie goes to the earlier document; unknown domains keep a label; a partial last segment
    assert segment_labels([0, 2, 6], ["x", "", "y"], np.ones(10, dtype=int), None, 4) == ["x", "(unknown)", "y"]


def tiny(ffn="lory", **options):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny", ffn=ffn, n_experts=4, segment_len=8, **options)).eval()


@pytest.mark.parametrize("ffn", ["lory", "topk"])
def test_collect_routing_on_real_shards(text_shards, ffn):
    model = tiny(ffn)
    collected = collect_routing(model, text_shards[1], batch_size=4, max_batches=3)
    assert collected.layers == [0, 1] and collected.n_experts == 4 and collected.segment_len == 8
    n_segments = len(collected.domains)
    assert 0 < n_segments <= 3 * 4 * 64 // 8
    assert set(collected.domains) <= set(DOMAINS)
    for weights in collected.weights:
        assert weights.shape == (n_segments, 4)
        assert np.isfinite(weights).all() and (weights >= 0).all()
        if ffn == "lory":
            np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-5)
    assert not model.training
    result = analyze_routing(collected, n_shuffles=3)
    assert sum(result["domains"].values()) == n_segments


def make_run(run_dir, config, tokenizer: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    state = {"step": 7, "model_config": config.to_dict(), "tokenizer": tokenizer}
    save_checkpoint(run_dir, 7, model.state_dict(), state)


def test_run_analysis_end_to_end(text_shards, tmp_path):
    heldout = text_shards[1]
    tokenizer = Manifest.read(heldout).tokenizer
    make_run(tmp_path / "run", ModelConfig.from_preset("tiny", ffn="lory", n_experts=4, segment_len=16), tokenizer)
    result = run_analysis(tmp_path / "run", heldout, tmp_path / "out", batch_size=4, max_batches=2, n_shuffles=3)
    assert result["step"] == 7 and [entry["layer"] for entry in result["layers"]] == [0, 1]
    written = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert written["n_segments"] == result["n_segments"] > 0
    assert (tmp_path / "out" / "routing_layers_00-01.png").read_bytes().startswith(PNG_MAGIC)


def test_dense_models_and_foreign_shards_are_refused(text_shards, tmp_path):
    heldout = text_shards[1]
    tokenizer = Manifest.read(heldout).tokenizer
    with pytest.raises(LoryTrainError, match="dense"):
        collect_routing(tiny("dense"), heldout)
    make_run(tmp_path / "dense", ModelConfig.from_preset("tiny", ffn="dense"), tokenizer)
    with pytest.raises(LoryTrainError, match="dense"):
        run_analysis(tmp_path / "dense", heldout, tmp_path / "out")
    make_run(tmp_path / "other", ModelConfig.from_preset("tiny", ffn="lory", n_experts=4),
             {**tokenizer, "sha256": "0" * 64})
    with pytest.raises(LoryTrainError, match="another tokenizer") as info:
        run_analysis(tmp_path / "other", heldout, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
