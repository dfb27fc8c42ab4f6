"""`lory analyze` additions: routing divergence between domains (Jensen–Shannon) and the
training-time diagnostics curves read from metrics.jsonl."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from cli import lory
from lorytrain.analysis import (
    RoutingCollection,
    analyze_routing,
    plot_training_diagnostics,
    routing_divergence,
)
from lorytrain.training.metrics_log import read_metrics
from tests.lorytrain.runkit import train_tiny_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def js_naive(p, q) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y, strict=True) if a > 0)  # noqa: E731
    return (kl(p, m) + kl(q, m)) / 2


def test_routing_divergence_is_the_mean_pairwise_js_of_domain_means():
    weights = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1],  # domain 0: mean (0.6, 0.3, 0.1)
                        [0.1, 0.1, 0.8],                    # domain 1: (0.1, 0.1, 0.8)
                        [0.3, 0.4, 0.3], [0.3, 0.2, 0.5]])  # domain 2: (0.3, 0.3, 0.4)
    codes = np.array([0, 0, 1, 2, 2])
    means = [(0.6, 0.3, 0.1), (0.1, 0.1, 0.8), (0.3, 0.3, 0.4)]
    expected = np.mean([js_naive(means[0], means[1]), js_naive(means[0], means[2]), js_naive(means[1], means[2])])
    assert routing_divergence(weights, codes) == pytest.approx(expected, rel=1e-9)
    one_hot = np.eye(3)
    assert routing_divergence(one_hot, np.arange(3)) == pytest.approx(math.log(2), rel=1e-9)
    assert routing_divergence(np.tile([0.2, 0.3, 0.5], (4, 1)), np.array([0, 1, 0, 1])) == pytest.approx(0, abs=1e-12)
    # near-uniform float32 routing (a freshly upcycled model): tiny, never NaN or negative
    rng = np.random.default_rng(0)
    near = (np.full((200, 8), 1 / 8) + 1e-7 * rng.standard_normal((200, 8))).astype(np.float32)
    assert 0 <= routing_divergence(near, rng.integers(0, 5, 200)) < 1e-9


def test_divergence_excess_separates_domain_routing_from_chance():
    rng = np.random.default_rng(0)
    names = np.array(["a", "b", "c"], dtype=object)
    codes = rng.integers(0, 3, size=900)
    random_weights = rng.dirichlet(np.ones(4), size=900)
    routed = random_weights * 0.5
    routed[np.arange(900), codes] += 0.5  # domain d leans on expert d
    found = {}
    for label, w in (("random", random_weights), ("routed", routed)):
        collected = RoutingCollection([0], [w.astype(np.float32)], names[codes], 1, "lory", 8)
        found[label] = analyze_routing(collected, n_shuffles=10)
    random_js = found["random"]["layers"][0]["divergence"]
    assert random_js["js_shuffled"] > 0 and abs(random_js["js_excess"]) < 3 * random_js["js_shuffled"]
    routed_js = found["routed"]["layers"][0]["divergence"]
    assert routed_js["js_excess"] > 0.05 > 10 * routed_js["js_shuffled"]
    assert found["routed"]["summary"]["mean_js_excess"] == pytest.approx(routed_js["js_excess"])


@pytest.fixture(scope="module")
def lory_run(text_shards, tmp_path_factory):
    train, _ = text_shards
    return train_tiny_run(train, tmp_path_factory.mktemp("diag_run") / "run", ffn="lory", experts=4, steps=8,
                          dense_warmup=0.25)


def test_training_diagnostics_png_from_metrics(lory_run, tmp_path):
    records = read_metrics(lory_run)
    path = plot_training_diagnostics(records, tmp_path / "curves.png", title="tiny")
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000
    dense_only = [r for r in records if r.get("phase") == "dense"]
    assert dense_only and plot_training_diagnostics(dense_only, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_analyze_cli_reports_divergence_and_writes_the_curves(lory_run, text_shards, tmp_path):
    _, heldout = text_shards
    result = CliRunner().invoke(lory, ["analyze", str(lory_run), "--data", str(heldout), "--out", str(tmp_path),
                                       "--max-batches", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "domain JS" in result.output
    assert (tmp_path / "training_diagnostics.png").read_bytes().startswith(PNG_MAGIC)
    report = json.loads((tmp_path / "analysis.json").read_text())
    for layer in report["layers"]:
        assert 0 <= layer["divergence"]["js"] <= math.log(2)
    assert str(tmp_path / "training_diagnostics.png") in report["files"]


def test_smooth_is_a_trailing_moving_average():
    from lorytrain.analysis import smooth

    values = np.arange(8, dtype=float).reshape(8, 1) ** 2  # 0 1 4 9 16 25 36 49
    found = smooth(values, parts=4)  # window 2
    np.testing.assert_allclose(found[:, 0], [0, 0.5, 2.5, 6.5, 12.5, 20.5, 30.5, 42.5])
    np.testing.assert_allclose(smooth(values, parts=100), values)  # window 1
