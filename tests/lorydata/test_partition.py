"""Partitioned ordering: k-means cells, centroid chaining, per-cell walks stitched together."""

import numpy as np
import pytest

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig
from lorydata.partition import (
    PartitionConfig,
    cell_stream_starts,
    chain_cells,
    global_neighbors,
    order_cell,
    partition,
    partitioned_order,
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
