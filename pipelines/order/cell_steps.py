"""The Beam steps of the cells order (`--partitions P > 1`), one partition per element,
everything through files (`pipelines.layout`, order stage).

- `AssignCellsFn` (per documents file): each document to its nearest k-means centroid (the
  centroids travel with the DoFn: O(cells × d)); writes (vector, row, tokens count, recall
  flag, and with `--semantic-dedup` signature, characters, content hash and id) to the
  cell's member file of that documents file, and the per-cell counts beside.
- `OrderCellFn` (per cell): the cell's kNN graph, semantic dedup when on, and token-aware
  walk; writes the position of every walked member back per source documents file, with
  the dropped members beside, the adjacent similarities, the graph rows of the recall
  sample and the cell's stats, with the packing blocks its walk is cut into (`block_starts`;
  each block is one unit of the shards stage).
- `MergeRoutesFn` (per documents file): the cells' positions into its routes file, and its
  `semantic_duplicate` dead letters.

File names depend only on documents file and cell, so a retried bundle overwrites its own
files.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lorydata.knn import as_unit_float32, index_for
from lorydata.order_metrics import adjacent_similarities, break_rate
from lorydata.pack import block_starts
from lorydata.partition import order_cell
from pipelines import dead_letters, fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.order.semantic_dedup import COLUMNS, SemanticFilter, dead_letters_of, drops_in, load_signatures
from pipelines.order.split_data import (
    UNIT_TOKENS,
    block_of,
    empty_routes,
    sampled,
    split_rows,
    token_lengths,
    unit_counts,
)


class AssignCellsFn(PartitionFn):
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

    def run(self, path: str, out: Commit) -> None:
        table = fileio.read_table(path, ["content_hash", "split", "tokens"])
        rows = split_rows(table, self.split)
        x = as_unit_float32(fileio.load_npy(layout.embeddings_file(self.embeddings_dir, path))[rows])
        lengths = token_lengths(table.take(rows))
        query = sampled(table.column("content_hash").take(rows), self.recall_fraction, self.seed)
        cells = np.argmax(x @ self.centroids.T, axis=1) if len(x) else np.zeros(0, np.int64)
        carried = {}
        if self.semantic:
            carried = load_signatures(self.order_dir, [path])  # row-aligned with `rows`
        for cell in np.unique(cells):
            members = np.flatnonzero(cells == cell)
            out.save_npz(layout.cell_member_file(self.order_dir, int(cell), path),
                            x=x[members], rows=rows[members], lengths=lengths[members], query=query[members],
                            **{name: values[members] for name, values in carried.items()})
        out.save_npy(layout.cell_counts_file(self.order_dir, path), unit_counts(cells, lengths, len(self.centroids)))


class OrderCellFn(PartitionFn):
    """(cell, unit) → the cell's walk, written as positions per source documents file, plus
    its adjacent similarities (`adjacent.npy`), recall rows (`recall.npz`) and `result.json`
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

    def key(self, element: tuple[int, int]) -> str:
        return layout.cell_name(element[0])

    def run(self, element: tuple[int, int], out: Commit) -> None:
        cell, _unit = element
        parts = layout.cell_member_files(self.order_dir, cell)
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
            on = position[start:end] >= 0
            out.save_npy(layout.cell_routes_file(self.order_dir, path, cell),
                         np.stack([part["rows"][on], position[start:end][on]], axis=1))
            here = drops_in(drops, start, part["rows"])
            if here:
                out.save_json(layout.cell_routes_file(self.order_dir, path, cell, ".drops.json"), here)
            start = end
        adjacent = adjacent_similarities(x, result.order)
        _, broken, sequences = break_rate(adjacent, self.threshold, lengths[result.order], self.walk_config.seq_len)
        query = np.concatenate([p["query"] for p in loaded])
        out.save_npy(layout.cell_result_file(self.order_dir, cell, "adjacent.npy"), adjacent)
        out.save_npz(layout.cell_result_file(self.order_dir, cell, "recall.npz"), x=x[query],
                     similarities=result.graph.similarities[query])
        neighbors = result.graph.neighbors
        degree = np.bincount(neighbors[neighbors >= 0], minlength=len(x))
        # Packing blocks of the walk, cut where a document starts a sequence (as the global
        # walk's units): the pack step holds one block, however large k-means made the cell.
        walked = lengths[result.order]
        cuts = block_starts(walked, self.walk_config.seq_len, UNIT_TOKENS)
        block = block_of(cuts, np.arange(len(walked)))
        out.save_json(layout.cell_result_file(self.order_dir, cell, "result.json"), {
            "blocks": {"starts": cuts.tolist(), "counts": unit_counts(block, walked, len(cuts)).tolist()},
            "walk": result.stats, "graph": result.graph.describe(), "broken_sequences": int(broken),
            "sequences": int(sequences), "orphans": int((degree == 0).sum()), "max_in_degree": int(degree.max(initial=0)),
            **({"semantic_dedup": semantic.counts(lengths)} if semantic is not None else {}),
        })
        out.count("cells_ordered")


class MergeRoutesFn(PartitionFn):
    """documents file → its routes, from the positions the cells wrote for it.

    Args:
        order_dir: the order stage folder.
        units_of_cell: {cell: (its first unit, walk positions where its blocks start)}: the
            blocks of the cells in chain order are units 0, 1, ...
        split: the split (names its dead-letter files).
    """

    def __init__(self, order_dir: str, units_of_cell: dict[int, tuple[int, list[int]]], split: str = ""):
        self.order_dir, self.units_of_cell, self.split = order_dir, units_of_cell, split

    def run(self, path: str, out: Commit) -> None:
        table = fileio.read_table(path, ["split"])
        routes = empty_routes(table.num_rows)
        for cell, part in layout.cell_routes_files(self.order_dir, path).items():
            pairs = fileio.load_npy(part)
            first, starts = self.units_of_cell[cell]
            routes[pairs[:, 0], 0] = first + block_of(starts, pairs[:, 1])
            routes[pairs[:, 0], 1] = pairs[:, 1]
        out.save_npy(layout.routes_file(self.order_dir, path), routes)
        drop_files = layout.cell_routes_files(self.order_dir, path, ".drops.json")
        if drop_files:
            drops = [d for _, f in sorted(drop_files.items()) for d in fileio.load_json(f)]
            letters = dead_letters_of(path, drops)
            dead_letters.write(out, layout.dead_letter_file(self.order_dir,
                                                            layout.semantic_dead_letter_name(self.split, path)), letters)
