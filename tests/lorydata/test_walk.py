"""The similarity walk: a permutation always, clusters kept together, leftovers handled."""

import json

import numpy as np
import pytest

from lorydata import walk_kernels
from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, build_knn_graph
from lorydata.order_metrics import ordering_metrics
from lorydata.walk import WalkConfig, random_order, walk


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(n_clusters=20, per_cluster=50, d=32, noise=0.25, seed=0):
    """Well separated clusters, shuffled ids: (embeddings, cluster label of every row)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_clusters, d)))
    labels = rng.permutation(np.repeat(np.arange(n_clusters), per_cluster))
    x = _unit(centres[labels] + noise * rng.standard_normal((len(labels), d)) / np.sqrt(d))
    return x, labels


def _is_permutation(order, n):
    return order.dtype == np.int64 and order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))


def _random_graph(n, k, seed, pad=0.0):
    """Arbitrary (not kNN-consistent) graph with sorted rows and optional -1 padding."""
    rng = np.random.default_rng(seed)
    if n == 1:
        return np.full((1, k), -1, np.int64), np.full((1, k), -np.inf, np.float32)
    neighbors = np.stack([rng.choice(np.delete(np.arange(n), i), size=k, replace=n - 1 < k) for i in range(n)])
    sims = -np.sort(-rng.uniform(-1, 1, size=(n, k)), axis=1).astype(np.float32)
    cut = rng.uniform(size=n) < pad
    neighbors[cut, k // 2:] = -1
    sims[cut, k // 2:] = -np.inf
    return neighbors.astype(np.int64), sims


@pytest.mark.parametrize("n, k, pad", [(1, 1, 0.0), (2, 1, 0.0), (7, 3, 0.5), (120, 6, 0.3), (500, 10, 0.0)])
@pytest.mark.parametrize("walkers", [1, 3])
def test_every_document_exactly_once(n, k, pad, walkers):
    neighbors, sims = _random_graph(n, k, seed=n, pad=pad)
    rng = np.random.default_rng(1)
    emb = _unit(rng.standard_normal((n, 8)))
    lengths = rng.integers(0, 300, n)
    for kwargs in ({}, {"embeddings": emb}, {"embeddings": emb, "token_lengths": lengths}, {"token_lengths": lengths}):
        config = WalkConfig(walkers=walkers, seq_len=256, min_chain=3)
        assert _is_permutation(walk(neighbors, sims, config, **kwargs).order, n)


def test_empty_corpus_and_graph_without_any_neighbour():
    assert walk(np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32)).order.shape == (0,)
    lonely = walk(np.full((5, 2), -1), np.full((5, 2), -np.inf, np.float32))
    assert _is_permutation(lonely.order, 5)


def test_clusters_stay_contiguous_while_random_order_scatters_them():
    x, labels = _clusters()
    graph = build_knn_graph(x, KnnConfig(k=10))
    lengths = np.random.default_rng(0).integers(50, 800, len(x))
    result = walk(graph.neighbors, graph.similarities, WalkConfig(seq_len=1024), embeddings=x, token_lengths=lengths)
    assert _is_permutation(result.order, len(x))
    cluster_changes = np.count_nonzero(np.diff(labels[result.order]))
    assert cluster_changes <= 20 + 2  # 19 is the minimum for 20 clusters
    ours = ordering_metrics(result.order, x, token_lengths=lengths, seq_len=1024)
    baseline = ordering_metrics(random_order(len(x), seed=0), x, token_lengths=lengths, seq_len=1024)
    assert ours["break_rate"] <= 0.05, ours
    assert baseline["break_rate"] >= 0.5, baseline
    assert ours["adjacent_similarity"]["mean"] > baseline["adjacent_similarity"]["mean"] + 0.5
    json.dumps(result.stats)


def test_graph_only_walk_also_keeps_clusters_together():
    x, labels = _clusters(seed=3)
    graph = build_knn_graph(x, KnnConfig(k=10))
    order = walk(graph.neighbors, graph.similarities).order
    assert np.count_nonzero(np.diff(labels[order])) <= 22


def test_points_on_an_arc_come_out_in_arc_order():
    # 200 unit vectors along a great-circle arc: the best path is the arc itself.
    angles = np.linspace(0, 1.5, 200)
    shuffle = np.random.default_rng(0).permutation(200)
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)[shuffle]
    graph = build_knn_graph(x, KnnConfig(k=6))
    order = walk(graph.neighbors, graph.similarities, embeddings=x).order
    steps = np.abs(np.diff(angles[shuffle][order]))
    assert (steps < 0.02).mean() >= 0.98  # adjacent on the arc, up to one jump


def test_single_documents_are_rehomed_into_chains():
    x, _ = _clusters(n_clusters=10, per_cluster=40, seed=5)
    graph = build_knn_graph(x, KnnConfig(k=8))
    plain = walk(graph.neighbors, graph.similarities, WalkConfig(rehome=False, join_ends=False), embeddings=x)
    full = walk(graph.neighbors, graph.similarities, embeddings=x)
    assert full.stats["chains"] < plain.stats["chains"]
    assert full.stats["leftover_documents"] <= plain.stats["leftover_documents"]
    assert full.stats["short_chains_rehomed"] > 0 or plain.stats["leftover_documents"] == 0
    metrics = [ordering_metrics(r.order, x, window_docs=8) for r in (plain, full)]
    assert metrics[1]["adjacent_similarity"]["mean"] >= metrics[0]["adjacent_similarity"]["mean"]


def test_unsorted_rows_give_the_same_walk_as_sorted_ones():
    x, _ = _clusters(n_clusters=5, per_cluster=30, seed=2)
    graph = build_knn_graph(x, KnnConfig(k=6))
    shuffle = np.random.default_rng(0).permuted(np.tile(np.arange(6), (len(x), 1)), axis=1)
    mixed_ids = np.take_along_axis(graph.neighbors, shuffle, axis=1)
    mixed_sims = np.take_along_axis(graph.similarities, shuffle, axis=1)
    expected = walk(graph.neighbors, graph.similarities, embeddings=x).order
    np.testing.assert_array_equal(walk(mixed_ids, mixed_sims, embeddings=x).order, expected)
    np.testing.assert_array_equal(walk(graph.neighbors, graph.similarities, embeddings=x).order, expected)


def test_token_aware_layout_fills_the_broken_sequence_and_starts_the_next_chain_on_a_boundary():
    # Chains: A = [0, 1, 2] (long), B = [3] and C = [4] (short), D = [5, 6, 7] (long).
    order = np.arange(8, dtype=np.int64)
    offsets = np.array([0, 3, 4, 5, 8], dtype=np.int64)
    is_long = np.array([True, False, False, True])
    # A takes 3 x (9 + 1 EOS) = 30 tokens of a 40-token sequence; B needs 10 and fits the
    # rest exactly, C (20) does not; D then starts at token 40, a sequence boundary.
    lengths = np.array([9, 9, 9, 9, 19, 9, 9, 9], dtype=np.int64)
    out = walk_kernels.token_aware_layout(order, offsets, is_long, lengths, 40, 0)
    assert out.tolist() == [0, 1, 2, 3, 5, 6, 7, 4]
    # Starting mid-sequence (a later partition), the fill happens before the first chain too.
    out = walk_kernels.token_aware_layout(order, offsets, is_long, lengths, 40, 20)
    assert out.tolist() == [4, 0, 1, 2, 3, 5, 6, 7]


def test_random_order_is_a_seeded_permutation():
    first = walk(np.zeros((50, 2), np.int64), np.zeros((50, 2), np.float32), WalkConfig(order="random", seed=1))
    again = random_order(50, seed=1)
    assert _is_permutation(first.order, 50) and np.array_equal(first.order, again)
    assert not np.array_equal(again, random_order(50, seed=2))
    assert first.stats == {"method": "random", "seed": 1}


def test_walk_is_deterministic():
    neighbors, sims = _random_graph(300, 8, seed=4)
    runs = [walk(neighbors, sims, WalkConfig(walkers=4)).order for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "neighbors, sims, kwargs, message",
    [
        (np.zeros((4, 2), np.int64), np.zeros((4, 3), np.float32), {}, "must be equal"),
        (np.full((4, 2), 9), np.zeros((4, 2), np.float32), {}, "outside"),
        (np.full((4, 2), -2), np.zeros((4, 2), np.float32), {}, "outside"),
        (np.zeros((4, 2), np.int64), np.zeros((4, 2), np.float32), {"embeddings": np.zeros((3, 2))}, "embeddings"),
        (np.zeros((4, 2), np.int64), np.zeros((4, 2), np.float32), {"token_lengths": -np.ones(4)}, "token_lengths"),
        (np.zeros((4, 2), np.int64), np.zeros((4, 2), np.float32), {"stream_start": -1}, "stream_start"),
    ],
)
def test_bad_input_is_a_user_error(neighbors, sims, kwargs, message):
    with pytest.raises(LoryDataError, match=message):
        walk(neighbors, sims, **kwargs)


@pytest.mark.parametrize("kwargs", [{"order": "greedy"}, {"min_chain": 0}, {"walkers": 0}, {"seq_len": 1}])
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(LoryDataError):
        WalkConfig(**kwargs)
