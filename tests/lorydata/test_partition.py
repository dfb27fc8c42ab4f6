"""Partitioned ordering: k-means cells, centroid chaining, per-cell walks stitched together."""

import numpy as np
import pytest

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig
from lorydata.partition import (
    MAX_SPLIT_ROUNDS,
    Partition,
    PartitionConfig,
    cell_stream_starts,
    chain_cells,
    global_neighbors,
    nearest_centroid,
    order_cell,
    partition,
    partitioned_order,
    split_large_cells,
    stitch_cells,
)
from lorydata.walk import WalkConfig


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((6, 16)))
    labels = rng.integers(0, 6, 1200)
    return _unit(centres[labels] + 0.05 * rng.standard_normal((1200, 16))), labels


def test_cells_follow_the_clusters(clustered):
    x, labels = clustered
    part = partition(x, PartitionConfig(parts=12, seed=1))  # more cells than clusters: none may mix two
    assert part.assignment.shape == (1200,) and part.centroids.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(part.centroids, axis=1), 1.0, atol=1e-5)
    members = part.members()
    assert sum(len(m) for m in members) == 1200 and part.sizes().sum() == 1200
    purity = sum(np.bincount(labels[m]).max() for m in members if len(m)) / 1200
    assert purity > 0.99


def test_partitioned_order_walks_each_cell_and_chains_them(clustered):
    x, _ = clustered
    lengths = np.random.default_rng(2).integers(10, 600, len(x))
    order, info = partitioned_order(x, PartitionConfig(parts=4, seed=0), KnnConfig(k=8), WalkConfig(seq_len=512),
                                    token_lengths=lengths)
    assert np.array_equal(np.sort(order), np.arange(len(x)))
    part = partition(x, PartitionConfig(parts=4, seed=0))
    cells = part.assignment[order]
    assert np.count_nonzero(np.diff(cells)) == np.count_nonzero(part.sizes()) - 1  # each cell contiguous
    neighbors = info["neighbors"]
    assert neighbors.shape == (len(x), 8)
    valid = neighbors >= 0
    rows = np.broadcast_to(np.arange(len(x))[:, None], neighbors.shape)
    assert (part.assignment[neighbors[valid]] == part.assignment[rows[valid]]).all()  # same cell
    assert not (neighbors == np.arange(len(x))[:, None]).any()


def test_chain_cells_skips_empty_cells_and_orders_the_rest():
    centroids = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]]))
    sequence = chain_cells(centroids, np.array([5, 5, 5, 5, 0]))
    assert sorted(sequence.tolist()) == [0, 1, 2, 3]
    position = {cell: i for i, cell in enumerate(sequence.tolist())}
    assert abs(position[0] - position[2]) == 1 and abs(position[1] - position[3]) == 1


def test_stream_starts_stitching_and_local_to_global_ids():
    members = [np.array([0, 3]), np.array([1, 2, 4])]
    lengths = np.array([10, 20, 30, 40, 50])
    assert cell_stream_starts(members, np.array([1, 0]), lengths) == {1: 0, 0: 103}
    order = stitch_cells(members, {0: np.array([1, 0]), 1: np.array([2, 0, 1])}, np.array([1, 0]))
    assert order.tolist() == [4, 1, 2, 3, 0]
    with pytest.raises(LoryDataError, match="no order"):
        stitch_cells(members, {0: np.array([1, 0])}, np.array([1, 0]))
    x = _unit(np.random.default_rng(0).standard_normal((3, 4)))
    cell = order_cell(x, KnnConfig(k=2), WalkConfig())
    mapped = global_neighbors([np.array([4, 1, 2])], {0: cell.graph}, n=5, k=2)
    assert set(mapped[[1, 2, 4]].ravel().tolist()) <= {1, 2, 4} and (mapped[[0, 3]] == -1).all()


def test_bad_partitioning_is_a_user_error():
    x = _unit(np.ones((3, 2)))
    with pytest.raises(LoryDataError, match="partitions"):
        partition(x, PartitionConfig(parts=5))
    with pytest.raises(LoryDataError):
        PartitionConfig(parts=0)


@pytest.fixture(scope="module")
def dominant():
    """2,000 unit vectors: one broad blob holding 70% of them, six tight small clusters the rest."""
    rng = np.random.default_rng(3)
    blob = _unit(rng.standard_normal((1, 16))) + 0.3 * rng.standard_normal((1400, 16))
    centres = _unit(rng.standard_normal((6, 16)))
    return _unit(np.concatenate([blob, centres[rng.integers(0, 6, 600)] + 0.05 * rng.standard_normal((600, 16))]))


def test_a_dominant_cell_is_split_to_the_cap_and_every_point_keeps_its_nearest_centroid(dominant):
    plain = partition(dominant, PartitionConfig(parts=4, seed=0))
    cap = 1.5 * len(dominant) / 4
    assert plain.sizes().max() > 1.8 * cap and plain.split == 0  # k-means alone: one cell of ~2/3 of the points
    part = partition(dominant, PartitionConfig(parts=4, seed=0, max_cell_factor=1.5))
    sizes = part.sizes()
    assert sizes.max() <= cap and sizes.sum() == len(dominant) and sizes.min() > 0
    assert part.split >= 1 and len(part.centroids) > 4
    np.testing.assert_allclose(np.linalg.norm(part.centroids, axis=1), 1.0, atol=1e-5)
    # Voronoi cells: each point in the cell of its most similar centroid (naive reference).
    assert np.array_equal(part.assignment, np.argmax(dominant @ part.centroids.T, axis=1))
    assert np.array_equal(nearest_centroid(dominant, part.centroids), part.assignment)
    # The cells within the cap are kept as k-means left them (same centroids).
    kept = [c for c in range(4) if plain.sizes()[c] <= cap]
    for c in kept:
        assert (np.abs(part.centroids - plain.centroids[c]).max(axis=1) < 1e-6).any()


def test_the_cap_found_on_a_sample_holds_for_the_whole_set(dominant):
    sample = dominant[np.random.default_rng(4).permutation(len(dominant))[:500]]
    part = partition(sample, PartitionConfig(parts=4, seed=0, max_cell_factor=1.5))
    sizes = np.bincount(nearest_centroid(dominant, part.centroids), minlength=len(part.centroids))
    assert sizes.max() <= 1.25 * 1.5 * len(dominant) / 4  # within sampling error of the cap


def test_splitting_is_deterministic_and_a_no_op_without_oversized_cells(dominant, clustered):
    config = PartitionConfig(parts=4, seed=0, max_cell_factor=1.5)
    first, again = partition(dominant, config), partition(dominant, config)
    assert np.array_equal(first.centroids, again.centroids) and np.array_equal(first.assignment, again.assignment)
    x, _ = clustered  # six clusters of about 200 in six cells (this seed finds them): none above the cap
    plain = partition(x, PartitionConfig(parts=6, seed=2))
    assert plain.sizes().max() < 1.5 * len(x) / 6
    capped = partition(x, PartitionConfig(parts=6, seed=2, max_cell_factor=1.5))
    assert capped.split == 0 and np.array_equal(capped.centroids, plain.centroids)
    assert np.array_equal(capped.assignment, plain.assignment)


def test_a_cell_of_identical_points_cannot_be_split_and_the_rounds_are_bounded():
    rng = np.random.default_rng(5)
    copies = np.tile(_unit(rng.standard_normal((1, 8))), (700, 1))
    alone = split_large_cells(copies, Partition(np.zeros(700, np.int64), copies[:1]), target=100.0,
                              config=PartitionConfig(parts=7, max_cell_factor=1.5))
    assert alone.split == 0 and len(alone.centroids) == 1 and (alone.assignment == 0).all()
    x = np.concatenate([copies, _unit(rng.standard_normal((300, 8)))])
    part = partition(x, PartitionConfig(parts=4, seed=0, max_cell_factor=1.5))
    # Each round peels the other points off the copies' cell; the copies stay one cell.
    assert 700 in part.sizes() and part.sizes().sum() == len(x) and 1 <= part.split <= MAX_SPLIT_ROUNDS
    assert np.array_equal(part.assignment, nearest_centroid(x, part.centroids))


def test_split_large_cells_splits_into_cells_of_about_the_target_size(dominant):
    part = Partition(np.zeros(len(dominant), np.int64), _unit(dominant.mean(axis=0, keepdims=True)))
    split = split_large_cells(dominant, part, target=400.0, config=PartitionConfig(parts=5, max_cell_factor=1.5))
    assert split.split >= 1 and len(split.centroids) >= 5  # ceil(2000 / 400) sub-cells at least
    assert split.sizes().max() <= 600


def test_a_cap_not_above_the_mean_is_refused():
    with pytest.raises(LoryDataError, match="more than the mean"):
        PartitionConfig(parts=4, max_cell_factor=1.0)
