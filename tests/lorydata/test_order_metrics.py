"""Ordering metrics: packing arithmetic, break rate, chains, hubness, the manifest dict."""

import json

import numpy as np
import pytest

from lorydata.errors import LoryDataError
from lorydata.order_metrics import (
    adjacent_similarities,
    break_rate,
    break_threshold,
    chain_lengths,
    hubness,
    ordering_metrics,
    pair_sequences,
)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pairs_are_placed_in_the_sequence_where_the_second_document_starts():
    # Token spans (EOS included): [0,4) [4,7) [7,13) [13,15) with seq_len 4.
    seq, total = pair_sequences(np.array([3, 2, 5, 1]), seq_len=4)
    assert total == 4  # 15 tokens, the partial last sequence counts
    # Doc 1 starts exactly at a boundary, so (doc 0, doc 1) shares no sequence.
    assert seq.tolist() == [-1, 1, 3]


def test_break_rate_counts_sequences_not_pairs():
    lengths = np.array([3, 3, 3, 3, 3, 3, 3, 3])  # 4 tokens each, two documents per sequence of 8
    adjacent = np.array([0.9, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1], dtype=np.float32)
    # Pairs inside sequences: (0,1) seq 0, (2,3) seq 1, (4,5) seq 2, (6,7) seq 3; the pairs
    # (1,2), (3,4), (5,6) straddle boundaries.
    rate, broken, total = break_rate(adjacent, 0.5, lengths, seq_len=8)
    assert (broken, total) == (1, 4) and rate == 0.25


def test_chain_lengths_are_runs_of_related_neighbours():
    adjacent = np.array([0.9, 0.1, 0.8, 0.8, 0.0])
    assert chain_lengths(adjacent, 0.5).tolist() == [2, 3, 1]
    assert chain_lengths(np.zeros(0), 0.5).tolist() == [1]


def test_break_threshold_separates_clusters_and_is_reproducible():
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((50, 16)))
    x = _unit(centres[rng.integers(0, 50, 2000)] + 0.1 * rng.standard_normal((2000, 16)))
    threshold = break_threshold(x, seed=3)
    assert threshold == break_threshold(x, seed=3)
    within = np.einsum("ij,ij->i", x[:-1], x[1:])  # mostly different clusters: random pairs
    assert np.quantile(within, 0.95) == pytest.approx(threshold, abs=0.1)
    same_cluster = _unit(centres[:1] + 0.1 * rng.standard_normal((20, 16)))
    assert (adjacent_similarities(same_cluster, np.arange(20)) > threshold).all()


def test_hubness_counts_documents_nobody_points_to():
    star = np.array([[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]])  # documents 3 and 4 are orphans
    assert hubness(star) == {"orphan_share": 0.4, "max_in_degree": 4, "k": 2}


def test_ordering_metrics_is_a_json_dict_for_the_manifest():
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((300, 8)))
    lengths = rng.integers(1, 500, 300)
    neighbors = rng.integers(0, 300, (300, 5))
    metrics = ordering_metrics(np.arange(300), x, token_lengths=lengths, seq_len=1024, neighbors=neighbors,
                               knn_recall=0.97)
    json.dumps(metrics)
    assert metrics["documents"] == 300 and metrics["seq_len"] == 1024 and metrics["knn_recall"] == 0.97
    assert 0 <= metrics["break_rate"] <= 1 and metrics["sequences"] >= metrics["broken_sequences"]
    assert metrics["chain_length"]["count"] == round(metrics["unrelated_pair_share"] * 299) + 1
    assert "quantile" in metrics["break_rule"] and "hubness" in metrics
    windows = ordering_metrics(np.arange(300), x, window_docs=6, threshold=0.2)
    assert windows["window_docs"] == 6 and windows["sequences"] == 50 and windows["break_rule"] == "given"


def test_order_must_be_a_permutation():
    x = _unit(np.ones((4, 2)))
    with pytest.raises(LoryDataError, match="permutation"):
        ordering_metrics(np.array([0, 1, 1, 3]), x)
    with pytest.raises(LoryDataError, match="permutation"):
        ordering_metrics(np.arange(3), x)


def test_domain_shares_against_a_naive_count():
    from lorydata.order_metrics import nearest_same_domain_share, random_same_domain_share, same_domain_share

    domains = np.array(["a", "a", "b", "b", "a"])
    assert same_domain_share(np.array([0, 1, 4, 2, 3]), domains) == 3 / 4
    assert same_domain_share(np.array([0, 2, 1, 3, 4]), domains) == 0.0
    neighbors = np.array([[1, 2], [4, 0], [0, 3], [2, 1], [-1, -1]])
    assert nearest_same_domain_share(neighbors, domains) == 3 / 5  # a missing neighbour is a miss
    naive = np.mean([domains[i] == domains[j] for i in range(5) for j in range(5) if i != j])
    assert random_same_domain_share(domains) == pytest.approx(naive)


def test_domain_agreement_of_separated_clusters_is_perfect():
    from lorydata.order_metrics import domain_agreement

    rng = np.random.default_rng(0)
    centers = np.eye(3, 16, dtype=np.float32) * 10
    domains = np.repeat(["x", "y", "z"], 20)
    x = _unit(centers[np.repeat([0, 1, 2], 20)] + rng.normal(size=(60, 16)).astype(np.float32))
    result = domain_agreement(x, domains)
    assert result["documents"] == 60 and result["nearest_same_domain"] == 1.0
    assert result["walk_same_domain"] == pytest.approx(57 / 59)  # three runs, two borders
    with pytest.raises(LoryDataError):
        domain_agreement(x, domains[:10])
