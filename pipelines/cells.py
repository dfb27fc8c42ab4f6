"""The order stage's Beam steps, one partition per element, everything through files.

- `RandomRoutesFn` (per bucket): random order; each document's unit and key come from a
  seeded hash of its content hash.
- `AssignCellsFn` (per bucket): each document to its nearest k-means centroid (the
  centroids travel with the DoFn: O(cells × d)); writes (vector, row, tokens count, recall
  flag, and with `--semantic-dedup` signature, characters, content hash and id) to
  `cells/c<cell>/b<bucket>.npz` and the per-cell counts to `cellcounts/b<bucket>.npy`.
- `OrderCellFn` (per cell): the cell's kNN graph, semantic dedup when on, and token-aware
  walk; writes the position of every walked member back per source bucket
  (`cellroutes/b<bucket>/c<cell>.npy`) with the dropped members beside
  (`cellroutes/b<bucket>/c<cell>.drops.json`), the adjacent similarities, the graph rows of
  the recall sample and the cell's stats.
- `MergeRoutesFn` (per bucket): the cells' positions into the bucket's routes file, and the
  bucket's `semantic_duplicate` dead letters.

Folder layout inside the order stage folder; file names depend only on bucket and cell,
so a retried bundle overwrites its own files.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from lorydata.shuffle import mix64
from pipelines import fileio
from pipelines.embed_stage import embeddings_file
from pipelines.semantic_dedup import (
    COLUMNS,
    DEAD_LETTERS,
    SemanticFilter,
    drops_in,
    load_signatures,
    write_dead_letters,
)
from pipelines.split_data import (
    empty_routes,
    hash_keys,
    routes_file,
    sampled,
    split_rows,
    token_lengths,
)
from pipelines.transforms import count

CELLS = "cells"
CELL_COUNTS = "cellcounts"
CELL_ROUTES = "cellroutes"
UNIT_COUNTS = "unitcounts"


def cell_name(cell: int) -> str:
    return f"c{cell:06d}"


def unit_counts(units: np.ndarray, lengths: np.ndarray, n_units: int) -> np.ndarray:
    """(n_units, 2) documents and tokens (EOS included) per unit."""
    out = np.zeros((n_units, 2), np.int64)
    np.add.at(out[:, 0], units, 1)
    np.add.at(out[:, 1], units, lengths + 1)
    return out


class RandomRoutesFn(beam.DoFn):
    """documents file → its routes for the random order: key = seeded hash of the content
    hash, unit = the key's range among `units` equal ranges; per-unit counts beside.

    Args:
        order_dir: the order stage folder.
        split: the split being ordered.
        units: number of units.
        seed: the order's seed.
    """

    def __init__(self, order_dir: str, split: str, units: int, seed: int):
        self.order_dir, self.split, self.units, self.seed = order_dir, split, units, seed

    def process(self, path: str):
        table = fileio.read_table(path, ["content_hash", "split", "tokens"])
        rows = split_rows(table, self.split)
        keys = mix64(hash_keys(table.column("content_hash").take(rows)), self.seed)
        unit = np.minimum(((keys >> np.uint64(11)).astype(np.float64) * self.units / 2.0**53).astype(np.int64),
                          self.units - 1)
        routes = empty_routes(table.num_rows)
        routes[rows, 0] = unit
        routes[rows, 1] = (keys >> np.uint64(1)).astype(np.int64)
        fileio.save_npy(routes_file(self.order_dir, path), routes)
        lengths = token_lengths(table.take(rows))
        fileio.save_npy(fileio.join(self.order_dir, UNIT_COUNTS, f"{fileio.stem(path)}.npy"),
                        unit_counts(unit, lengths, self.units))
        yield len(rows)


class AssignCellsFn(beam.DoFn):
    """documents file → its split's documents in the files of their nearest cell.

    Args:
        order_dir: the order stage folder.
        embeddings_dir: the embeddings stage folder.
        split: the split being ordered.
        centroids: (P, d) unit centroids.
        recall_fraction: share of documents (by hash) whose graph rows are kept to measure
            kNN recall.
        seed: seed of that sample.
        semantic: carry each member's signature, characters, content hash and id (from the
            signing step's files) into the cell files, for semantic dedup.
    """

    def __init__(self, order_dir: str, embeddings_dir: str, split: str, centroids: np.ndarray,
                 recall_fraction: float, seed: int, semantic: bool = False):
        self.order_dir, self.embeddings_dir, self.split = order_dir, embeddings_dir, split
        self.centroids, self.recall_fraction, self.seed = centroids, recall_fraction, seed
        self.semantic = semantic

    def process(self, path: str):
        from lorydata.knn import as_unit_float32

        table = fileio.read_table(path, ["content_hash", "split", "tokens"])
        rows = split_rows(table, self.split)
        x = as_unit_float32(fileio.load_npy(embeddings_file(self.embeddings_dir, path))[rows])
        lengths = token_lengths(table.take(rows))
        query = sampled(table.column("content_hash").take(rows), self.recall_fraction, self.seed)
        cells = np.argmax(x @ self.centroids.T, axis=1) if len(x) else np.zeros(0, np.int64)
        bucket = fileio.stem(path)
        carried = {}
        if self.semantic:
            carried = load_signatures(self.order_dir, [path])  # row-aligned with `rows`
        for cell in np.unique(cells):
            members = np.flatnonzero(cells == cell)
            fileio.save_npz(fileio.join(self.order_dir, CELLS, cell_name(int(cell)), f"{bucket}.npz"),
                            x=x[members], rows=rows[members], lengths=lengths[members], query=query[members],
                            **{name: values[members] for name, values in carried.items()})
        fileio.save_npy(fileio.join(self.order_dir, CELL_COUNTS, f"{bucket}.npy"),
                        unit_counts(cells, lengths, len(self.centroids)))
        yield len(rows)


class OrderCellFn(beam.DoFn):
    """(cell, unit) → the cell's walk, written as positions per source bucket, plus its
    adjacent similarities (`adjacent.npy`), recall rows (`recall.npz`) and `result.json`
    (walk stats, graph description, broken and total sequences, hubness counts).

    Args:
        order_dir: the order stage folder.
        knn_config: kNN options (an explicit index falls back to exact search in a cell too
            small to train it).
        walk_config: walk options (token-aware: each cell is packed from a fresh sequence).
        threshold: the split's break threshold.
        semantic: (cos, confirming Jaccard) of semantic dedup within the cell, or None.
    """

    def __init__(self, order_dir: str, knn_config, walk_config, threshold: float,
                 semantic: tuple[float, float] | None = None):
        self.order_dir, self.knn_config, self.walk_config = order_dir, knn_config, walk_config
        self.threshold, self.semantic = threshold, semantic

    def process(self, element: tuple[int, int]):
        from lorydata.order_metrics import adjacent_similarities, break_rate
        from lorydata.partition import order_cell
        from pipelines.similarity_order import index_for

        cell, _unit = element
        folder = fileio.join(self.order_dir, CELLS, cell_name(cell))
        parts = fileio.match(fileio.join(folder, "b*.npz"))
        loaded = [fileio.load_npz(p) for p in parts]
        x = np.concatenate([p["x"] for p in loaded])
        lengths = np.concatenate([p["lengths"] for p in loaded])
        config = dataclasses.replace(self.knn_config, index=index_for(self.knn_config.index, len(x)))
        semantic = None
        if self.semantic is not None:
            semantic = SemanticFilter({c: np.concatenate([p[c] for p in loaded]) for c in COLUMNS}, *self.semantic)
        result = order_cell(x, config, self.walk_config, token_lengths=lengths, stream_start=0, keep=semantic)
        position = np.full(len(x), -1, np.int64)  # -1: dropped by semantic dedup
        position[result.order] = np.arange(len(result.order))
        drops = {} if semantic is None else {r["index"]: r for r in semantic.records()}
        start = 0
        for path, part in zip(parts, loaded, strict=True):
            end = start + len(part["rows"])
            bucket = fileio.stem(path)
            on = position[start:end] >= 0
            target = fileio.join(self.order_dir, CELL_ROUTES, bucket, cell_name(cell))
            fileio.save_npy(f"{target}.npy", np.stack([part["rows"][on], position[start:end][on]], axis=1))
            here = drops_in(drops, start, part["rows"])
            if here:
                fileio.save_json(f"{target}.drops.json", here)
            start = end
        adjacent = adjacent_similarities(x, result.order)
        _, broken, sequences = break_rate(adjacent, self.threshold, lengths[result.order], self.walk_config.seq_len)
        query = np.concatenate([p["query"] for p in loaded])
        fileio.save_npy(fileio.join(folder, "adjacent.npy"), adjacent)
        fileio.save_npz(fileio.join(folder, "recall.npz"), x=x[query], similarities=result.graph.similarities[query])
        neighbors = result.graph.neighbors
        degree = np.bincount(neighbors[neighbors >= 0], minlength=len(x))
        fileio.save_json(fileio.join(folder, "result.json"), {
            "walk": result.stats, "graph": result.graph.describe(), "broken_sequences": int(broken),
            "sequences": int(sequences), "orphans": int((degree == 0).sum()), "max_in_degree": int(degree.max(initial=0)),
            **({"semantic_dedup": semantic.counts(lengths)} if semantic is not None else {}),
        })
        count("cells_ordered")
        yield cell


class MergeRoutesFn(beam.DoFn):
    """documents file → its routes, from the positions the cells wrote for it.

    Args:
        order_dir: the order stage folder.
        unit_of_cell: {cell: unit} (cells in chain order are units 0, 1, ...).
        split: the split (names its dead-letter files).
    """

    def __init__(self, order_dir: str, unit_of_cell: dict[int, int], split: str = ""):
        self.order_dir, self.unit_of_cell, self.split = order_dir, unit_of_cell, split

    def process(self, path: str):
        table = fileio.read_table(path, ["split"])
        routes = empty_routes(table.num_rows)
        bucket = fileio.stem(path)
        for part in fileio.match(fileio.join(self.order_dir, CELL_ROUTES, bucket, "c*.npy")):
            cell = int(part.rsplit("/c", 1)[1].removesuffix(".npy"))
            pairs = fileio.load_npy(part)
            routes[pairs[:, 0], 0] = self.unit_of_cell[cell]
            routes[pairs[:, 0], 1] = pairs[:, 1]
        fileio.save_npy(routes_file(self.order_dir, path), routes)
        drop_files = fileio.match(fileio.join(self.order_dir, CELL_ROUTES, bucket, "c*.drops.json"))
        if drop_files:
            drops = [d for f in drop_files for d in fileio.load_json(f)]
            write_dead_letters(path, drops, fileio.join(self.order_dir, DEAD_LETTERS), self.split)
        yield bucket
