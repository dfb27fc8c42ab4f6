"""Partitioned ordering for corpora too large for one walk: k-means cells walked
independently (in parallel on a runner), chained by a walk over their centroids.

Every per-cell step is a plain function on numpy arrays, so a Beam DoFn (or a process
pool) can run it on one cell without any shared state:

    part = partition(x, PartitionConfig(parts=P, max_cell_factor=1.5))  # cells ≤ 1.5 n/P
    members = part.members()                                  # ids of each cell
    sequence = chain_cells(part.centroids, part.sizes())      # cell order
    starts = cell_stream_starts(members, sequence, lengths)   # token offset of each cell
    cell = order_cell(x[ids], knn, walk, token_lengths=lengths[ids], stream_start=start)
    order = stitch_cells(members, {c: cell.order ...}, sequence)

k-means does not balance cells, and the largest cell sets the peak memory of its walk;
`max_cell_factor` caps them: a cell holding more than that many times the mean is split by
a k-means of its own points, so the cells stay nearest-centroid (Voronoi) cells of the
larger set of centroids (see `split_large_cells`).

Neighbours across cell borders are lost; `global_neighbors` maps the cells' graphs back to
corpus ids so `knn_recall` against exact global search measures what that costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, KnnGraph, as_unit_float32, build_knn_graph, compact_graph, use_faiss_gpu
from lorydata.walk import WalkConfig, walk

MAX_SPLIT_ROUNDS = 3  # a sub-cell that k-means left oversized again is split again, this often at most


@dataclass
class PartitionConfig:
    """k-means cells of the corpus.

    Args:
        parts: number of cells.
        niter: k-means iterations.
        max_points_per_cell: k-means trains on at most parts × this many sampled vectors.
        seed: k-means seed.
        device: "auto" (FAISS GPU when available), "cpu" or "cuda".
        max_cell_factor: largest cell allowed, as a multiple of the mean n/parts: a larger
            cell is split into sub-cells (`split_large_cells`), so there may end up more
            than `parts` cells. None: cells as k-means leaves them.
    """

    parts: int
    niter: int = 20
    max_points_per_cell: int = 256
    seed: int = 0
    device: str = "auto"
    max_cell_factor: float | None = None

    def __post_init__(self):
        if self.parts < 1:
            raise LoryDataError(f"partitions must be positive, got {self.parts}")
        if self.niter < 1:
            raise LoryDataError(f"k-means iterations must be positive, got {self.niter}")
        if self.max_cell_factor is not None and not self.max_cell_factor > 1:
            raise LoryDataError(f"the largest cell must be allowed more than the mean, got {self.max_cell_factor}")


@dataclass
class Partition:
    """Cell of every document and the cells' unit centroids.

    Args:
        assignment: (N,) int64 cell id of every document.
        centroids: (P, d) float32 unit-length cell centroids.
        split: cells split to keep within `max_cell_factor` (a sub-cell split again counts again).
    """

    assignment: np.ndarray
    centroids: np.ndarray
    split: int = 0

    def sizes(self) -> np.ndarray:
        """(P,) documents per cell."""
        return np.bincount(self.assignment, minlength=len(self.centroids))

    def members(self) -> list[np.ndarray]:
        """Sorted document ids of every cell (empty arrays for empty cells)."""
        by_cell = np.argsort(self.assignment, kind="stable")
        return np.split(by_cell, np.cumsum(self.sizes())[:-1])


def partition(x: np.ndarray, config: PartitionConfig) -> Partition:
    """Split the corpus into `config.parts` cells by spherical k-means (FAISS), then split
    the cells larger than `config.max_cell_factor` × n/parts (if set).

    Args:
        x: (N, d) embeddings (normalised here if needed).
        config: number of cells, iterations, seed, device, cap on cell size.
    """
    import faiss  # heavy; loaded where used, as in lorydata.knn

    x = as_unit_float32(x)
    n, d = x.shape
    if config.parts > n:
        raise LoryDataError(f"cannot split {n} documents into {config.parts} partitions")
    if config.parts == 1:
        centroid = x.mean(axis=0, keepdims=True)
        return Partition(np.zeros(n, np.int64), as_unit_float32(centroid if centroid.any() else x[:1]))
    kmeans = faiss.Kmeans(d, config.parts, niter=config.niter, seed=config.seed, spherical=True,
                          max_points_per_centroid=config.max_points_per_cell, gpu=use_faiss_gpu(config.device),
                          verbose=False)
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    part = Partition(assignment[:, 0].astype(np.int64), as_unit_float32(kmeans.centroids))
    if config.max_cell_factor is None:
        return part
    return split_large_cells(x, part, n / config.parts, config)


def split_large_cells(x: np.ndarray, part: Partition, target: float, config: PartitionConfig) -> Partition:
    """Split every cell of more than `config.max_cell_factor` × `target` points by a
    spherical k-means of its own points into ceil(size / target) sub-cells, whose centroids
    replace its own (in its place, so the ids of the cells before it do not move); then
    every point goes to its nearest centroid again. Repeated while cells stay too large, at
    most `MAX_SPLIT_ROUNDS` times. Cells within the cap are left as they are: with none
    above it the partition comes back unchanged.

    Args:
        x: (N, d) unit embeddings `part` assigns (e.g. the k-means training sample).
        part: their cells.
        target: size of a sub-cell to aim at (the mean cell, n / parts).
        config: the cap (`max_cell_factor`) and the k-means options (seed, iterations, device).

    Returns:
        The partition of `x` over the new centroids, with `split` counting the cells split.
    """
    x = as_unit_float32(x)
    cap = config.max_cell_factor * target
    assignment, centroids, split = part.assignment, part.centroids, part.split
    for _ in range(MAX_SPLIT_ROUNDS):
        sizes = np.bincount(assignment, minlength=len(centroids))
        blocks, split_now = [], 0
        for cell, size in enumerate(sizes):
            sub = _sub_centroids(x[assignment == cell], int(np.ceil(size / target)), config) if size > cap else None
            split_now += sub is not None
            blocks.append(centroids[cell: cell + 1] if sub is None else sub)
        if not split_now:  # none too large, or none that k-means could split (all its points alike)
            break
        split += split_now
        centroids = np.concatenate(blocks)
        assignment = nearest_centroid(x, centroids)
    return Partition(assignment, centroids, split)


def _sub_centroids(points: np.ndarray, parts: int, config: PartitionConfig) -> np.ndarray | None:
    """(m, d) unit centroids of a spherical k-means of `points` into `parts`, less those
    that win none of the points; None when fewer than two are left (nothing to split)."""
    import faiss

    kmeans = faiss.Kmeans(points.shape[1], parts, niter=config.niter, seed=config.seed, spherical=True,
                          max_points_per_centroid=config.max_points_per_cell, min_points_per_centroid=1,
                          gpu=use_faiss_gpu(config.device), verbose=False)
    kmeans.train(points)
    centroids = as_unit_float32(kmeans.centroids)
    owners = np.unique(nearest_centroid(points, centroids))
    return centroids[owners] if len(owners) > 1 else None


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) int64 id of the centroid of largest inner product with each row of `x`."""
    import faiss

    if len(x) == 0:
        return np.zeros(0, np.int64)
    _, ids = faiss.knn(x, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return ids[:, 0].astype(np.int64)


def chain_cells(centroids: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """The order in which to lay out the cells: a similarity walk over their centroids.

    Args:
        centroids: (P, d) cell centroids.
        sizes: (P,) documents per cell; empty cells are left out.

    Returns:
        Ids of the non-empty cells, neighbouring cells similar.
    """
    cells = np.arange(len(centroids)) if sizes is None else np.flatnonzero(np.asarray(sizes) > 0)
    if len(cells) <= 2:
        return cells
    vectors = as_unit_float32(centroids[cells])
    graph = build_knn_graph(vectors, KnnConfig(k=min(len(cells) - 1, 16), device="cpu"))
    # A short chain of cells is as good as a long one here: no re-homing threshold.
    result = walk(graph.neighbors, graph.similarities, WalkConfig(min_chain=1), embeddings=vectors)
    return cells[result.order]


def cell_stream_starts(members: list[np.ndarray], sequence: np.ndarray, token_lengths: np.ndarray) -> dict[int, int]:
    """Token position where each cell's documents begin in the packed stream (one EOS each),
    for the token-aware layout of cells walked independently."""
    starts, position = {}, 0
    for cell in sequence:
        starts[int(cell)] = position
        position += int(np.asarray(token_lengths)[members[cell]].sum()) + len(members[cell])
    return starts


@dataclass
class CellOrder:
    """The walk of one cell.

    Args:
        order: (n_cell,) permutation of the cell's local indices; with a `keep` mask, the
            kept local indices only, in walk order.
        graph: the cell's kNN graph (local ids, every document).
        stats: the walk's stats.
        keep: (n_cell,) bool, the documents walked (None: all).
    """

    order: np.ndarray
    graph: KnnGraph
    stats: dict = field(default_factory=dict)
    keep: np.ndarray | None = None


def order_cell(
    x_cell: np.ndarray,
    knn_config: KnnConfig,
    walk_config: WalkConfig,
    token_lengths: np.ndarray | None = None,
    stream_start: int = 0,
    keep: Callable[[KnnGraph, np.ndarray], np.ndarray | None] | None = None,
) -> CellOrder:
    """kNN graph and walk of one cell (or of a whole corpus), on local indices 0..n-1.

    Args:
        x_cell: (n, d) embeddings of the cell's documents.
        knn_config: kNN graph options.
        walk_config: walk options.
        token_lengths: (n,) tokens per document, for the token-aware layout.
        stream_start: token position of the cell's first document in the packed stream.
        keep: called with the graph and the unit embeddings once the graph is built;
            returns the (n,) bool mask of documents to walk (semantic dedup), or None for
            all. The walk then runs on the graph compacted to those documents.
    """
    x_cell = as_unit_float32(x_cell)
    graph = build_knn_graph(x_cell, knn_config)
    mask = keep(graph, x_cell) if keep is not None else None
    if mask is None or mask.all():
        result = walk(graph.neighbors, graph.similarities, walk_config, embeddings=x_cell,
                      token_lengths=token_lengths, stream_start=stream_start)
        return CellOrder(result.order, graph, result.stats)
    walked = compact_graph(graph, mask)
    lengths = None if token_lengths is None else np.asarray(token_lengths)[mask]
    result = walk(walked.neighbors, walked.similarities, walk_config, embeddings=x_cell[mask],
                  token_lengths=lengths, stream_start=stream_start)
    return CellOrder(np.flatnonzero(mask)[result.order], graph, result.stats, mask)


def stitch_cells(members: list[np.ndarray], cell_orders: dict[int, np.ndarray], sequence: np.ndarray) -> np.ndarray:
    """The corpus order: each cell's walk (mapped to corpus ids), cells in `sequence` order."""
    missing = [int(c) for c in sequence if int(c) not in cell_orders]
    if missing:
        raise LoryDataError(f"no order for partition(s) {missing[:5]}")
    parts = [members[c][cell_orders[int(c)]] for c in sequence]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def global_neighbors(members: list[np.ndarray], graphs: dict[int, KnnGraph], n: int, k: int) -> np.ndarray:
    """(N, k) neighbour ids in corpus numbering from the cells' local graphs (-1 kept)."""
    out = np.full((n, k), -1, np.int64)
    for cell, graph in graphs.items():
        ids = members[cell]
        local = graph.neighbors[:, :k]
        out[ids, : local.shape[1]] = np.where(local >= 0, ids[np.maximum(local, 0)], -1)
    return out


def partitioned_order(
    x: np.ndarray,
    config: PartitionConfig,
    knn_config: KnnConfig,
    walk_config: WalkConfig,
    token_lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """All of the above in one process (the runner does the same with cells in parallel).

    Returns:
        (order, info) with info = {"partitions", "cells", "split", "cell_sizes", "neighbors"}.
    """
    x = as_unit_float32(x)
    part = partition(x, config)
    members = part.members()
    sequence = chain_cells(part.centroids, part.sizes())
    starts = cell_stream_starts(members, sequence, token_lengths) if token_lengths is not None else {}
    orders, graphs = {}, {}
    for cell in sequence:
        ids = members[cell]
        lengths = None if token_lengths is None else np.asarray(token_lengths)[ids]
        result = order_cell(x[ids], knn_config, walk_config, lengths, starts.get(int(cell), 0))
        orders[int(cell)], graphs[int(cell)] = result.order, result.graph
    order = stitch_cells(members, orders, sequence)
    neighbors = global_neighbors(members, graphs, len(x), knn_config.k)
    return order, {"partitions": int(config.parts), "cells": len(part.centroids), "split": part.split,
                   "cell_sizes": [int(s) for s in part.sizes()], "neighbors": neighbors}
