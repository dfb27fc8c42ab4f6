"""Stage 3, similarity order of one split: kNN graph + walk over the document embeddings.

With `--partitions 1` the graph and the walk cover the whole split in this process (the
walk is compiled and takes seconds per million documents; the graph is the costly part).
With P > 1 the split is cut into k-means cells; each cell's graph and walk is one element
of a Beam pipeline (`OrderCellFn`), the cells are chained by a walk over their centroids
and their orders stitched together. Neighbours across cell borders are lost: the recorded
kNN recall is always measured against exact search over the whole split, so the manifest
shows what partitioning cost.

Output in the stage folder: `order.npy` (the permutation, read by the shards stage) and
`knn/` (the graph as `neighbors.npy` / `similarities.npy` / `knn.json`, for inspection).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, KnnGraph, build_knn_graph, knn_recall
from lorydata.order_metrics import ordering_metrics
from lorydata.walk import WalkConfig, walk
from pipelines.markers import MARKER
from pipelines.options import BuildOptions
from pipelines.split_data import SplitDocuments, load_embeddings

RECALL_SAMPLE = 1000  # queries checked against exact search
CELLS = "cells"
_INT_STATS = ("chains_walked", "short_chains_rehomed", "documents_rehomed", "ends_joined", "chains",
              "leftover_documents")


def training_points_needed(index: str) -> int:
    """Fewest vectors a FAISS factory string can be trained on (IVF lists, PQ codebooks)."""
    need = 1
    for match in re.finditer(r"IVF(\d+)", index):
        need = max(need, int(match.group(1)))
    for match in re.finditer(r"PQ\d+(?:x(\d+))?", index):
        need = max(need, 2 ** int(match.group(1) or 8))
    return need


def index_for(requested: str | None, n: int) -> str | None:
    """The index for a split (or cell) of `n` documents: the requested one, or exact search
    when there are too few documents to train it (a small held-out split, a small cell).
    None keeps the choice by size of `lorydata.knn.choose_index`."""
    if requested is not None and n < training_points_needed(requested):
        return "Flat"
    return requested


def check_index_string(index: str | None, dim: int) -> None:
    """Raise `LoryDataError` now for a FAISS factory string that cannot be built, rather
    than after the documents were read and embedded."""
    if index is None:
        return
    import faiss

    try:
        faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # FAISS prefixes the reason with the C++ function and source line: keep the reason.
        reason = re.sub(r"^Error in .*? at \S+: ", "", str(exc).strip().splitlines()[-1])
        raise LoryDataError(f"bad --index {index!r}: {reason}") from None


def knn_config(options: BuildOptions, n: int) -> KnnConfig:
    return KnnConfig(k=options.k, index=index_for(options.index, n), nprobe=options.nprobe, device=options.device,
                     seed=options.seed)


def walk_config(options: BuildOptions) -> WalkConfig:
    # Token-aware layout: chains start near sequence boundaries (see lorydata.walk).
    return WalkConfig(seq_len=options.seq_len, seed=options.seed)


def partitions_for(requested: int, n: int, k: int) -> int:
    """Cells actually used: at most one per 2(k+1) documents, so every cell can hold a
    graph of k real neighbours and a walk worth the name (small splits get one cell)."""
    return max(1, min(requested, n // (2 * (k + 1))))


def _embedder_identity(embeddings_dir: Path) -> dict | None:
    """The embedder recorded by the finished embeddings stage (no model load)."""
    try:
        return json.loads((Path(embeddings_dir) / MARKER).read_text())["result"].get("embedder")
    except (OSError, ValueError, KeyError):
        return None


def _sum_stats(all_stats: list[dict]) -> dict:
    """Walk stats of several cells added up (counts only)."""
    total = {"method": "similarity", "documents": sum(int(s.get("documents", 0)) for s in all_stats)}
    for key in _INT_STATS:
        total[key] = sum(int(s.get(key, 0)) for s in all_stats)
    total["token_aware"] = any(s.get("token_aware", False) for s in all_stats)
    return total


def similarity_order(docs: SplitDocuments, options: BuildOptions, embeddings_dir: Path, split: str,
                     out: Path) -> dict:
    """Order one split by similarity, save `out/order.npy` and `out/knn/`, and describe it.

    Args:
        docs: the split's documents (hash order), for their token counts.
        options: build options (k, index, nprobe, device, partitions, seq_len, seed).
        embeddings_dir: the finished embeddings stage folder.
        split: "train" or "heldout".
        out: the order stage's temp folder.

    Returns:
        {"order": {"method", "seed", "metrics", "walk", "partitions"}, "embedder": ..., "index": ...}
    """
    n = len(docs)
    lengths = docs.token_counts.astype(np.int64)
    if n == 0:
        np.save(out / "order.npy", np.zeros(0, np.int64))
        return {"order": {"method": "similarity", "seed": options.seed, "metrics": {"documents": 0}},
                "embedder": _embedder_identity(embeddings_dir), "index": None}
    x = load_embeddings(embeddings_dir, split, docs.hashes)
    parts = partitions_for(options.partitions, n, options.k)
    if parts == 1:
        graph = build_knn_graph(x, knn_config(options, n))
        result = walk(graph.neighbors, graph.similarities, walk_config(options), embeddings=x, token_lengths=lengths)
        order, stats, cells = result.order, result.stats, None
    else:
        order, graph, stats, cells = order_by_cells(x, lengths, options, parts, out / CELLS)
    graph.save(out / "knn")
    np.save(out / "order.npy", order)
    recall = knn_recall(x, graph.neighbors, sample=RECALL_SAMPLE, seed=options.seed)
    metrics = ordering_metrics(order, x, token_lengths=lengths, seq_len=options.seq_len, neighbors=graph.neighbors,
                               knn_recall=recall, seed=options.seed)
    partitions = {"requested": options.partitions, "used": parts, **(cells or {})}
    return {
        "order": {"method": "similarity", "seed": options.seed, "metrics": metrics, "walk": stats,
                  "partitions": partitions},
        "embedder": _embedder_identity(embeddings_dir),
        "index": {**graph.describe(), "knn_recall": recall, "recall_sample": min(n, RECALL_SAMPLE),
                  "recall_against": "exact search over the whole split"},
    }


def merged_graph(members: list[np.ndarray], graphs: dict[int, KnnGraph], n: int, k: int) -> KnnGraph:
    """The cells' local graphs as one (n, k) graph in split numbering (-1 / -inf kept)."""
    neighbors = np.full((n, k), -1, np.int64)
    similarities = np.full((n, k), -np.inf, np.float32)
    for cell, graph in graphs.items():
        ids = members[cell]
        local = graph.neighbors[:, :k]
        neighbors[ids, : local.shape[1]] = np.where(local >= 0, ids[np.maximum(local, 0)], -1)
        similarities[ids, : local.shape[1]] = graph.similarities[:, :k]
    described = [g for g in graphs.values() if len(g.neighbors)]
    kinds = sorted({g.index for g in described})
    nprobes = sorted({g.nprobe for g in described if g.nprobe is not None})
    return KnnGraph(neighbors, similarities, index=" | ".join(kinds) or "Flat",
                    nprobe=nprobes[0] if len(nprobes) == 1 else None,
                    device="cuda" if any(g.device == "cuda" for g in described) else "cpu")


def order_by_cells(x: np.ndarray, lengths: np.ndarray, options: BuildOptions, parts: int,
                   folder: Path) -> tuple[np.ndarray, KnnGraph, dict, dict]:
    """k-means cells, one Beam element per cell (`OrderCellFn`), chained and stitched.

    Args:
        x: (n, d) embeddings of the split.
        lengths: (n,) tokens per document.
        options: build options (runner and Beam flags too).
        parts: number of k-means cells.
        folder: scratch folder for the cells' inputs and outputs (removed at the end).

    Returns:
        (order, merged graph, summed walk stats, {"cell_sizes", "cell_order"}).
    """
    import apache_beam as beam

    from lorydata.partition import PartitionConfig, cell_stream_starts, chain_cells, partition, stitch_cells
    from pipelines.options import make_pipeline
    from pipelines.transforms import OrderCellFn, cell_name, run_pipeline

    part = partition(x, PartitionConfig(parts=parts, seed=options.seed, device=options.device))
    members = part.members()
    sequence = chain_cells(part.centroids, part.sizes())
    starts = cell_stream_starts(members, sequence, lengths)
    folder.mkdir(parents=True, exist_ok=True)
    for cell in sequence:
        np.save(folder / f"{cell_name(cell)}.x.npy", x[members[cell]])
        np.save(folder / f"{cell_name(cell)}.lengths.npy", lengths[members[cell]])
    # Largest cells first, so the longest task is not the last one a worker picks up.
    elements = sorted(((int(c), int(starts[int(c)])) for c in sequence), key=lambda e: -len(members[e[0]]))
    # The requested index as given: each cell falls back to exact search on its own when it
    # is too small to train it (`OrderCellFn`), and the automatic choice follows cell size.
    config = KnnConfig(k=options.k, index=options.index, nprobe=options.nprobe, device=options.device,
                       seed=options.seed)
    pipeline = make_pipeline(options)
    (
        pipeline
        | "Cells" >> beam.Create(elements)
        | "SpreadCells" >> beam.Reshuffle()
        | "OrderCells" >> beam.ParDo(OrderCellFn(str(folder), config, walk_config(options)))
    )
    run_pipeline(pipeline)
    orders, graphs, stats = {}, {}, []
    for cell in sequence:
        out = folder / cell_name(cell)
        if not (out / "order.npy").is_file():
            raise RuntimeError(f"partition cell {cell} produced no order (runner lost its output?)")
        orders[int(cell)] = np.load(out / "order.npy")
        graphs[int(cell)] = KnnGraph.load(out)
        stats.append(json.loads((out / "walk.json").read_text()))
    order = stitch_cells(members, orders, sequence)
    graph = merged_graph(members, graphs, len(x), options.k)
    shutil.rmtree(folder, ignore_errors=True)  # copies of what order.npy and knn/ hold
    cells = {"cell_sizes": [int(s) for s in part.sizes()], "cell_order": [int(c) for c in sequence]}
    return order, graph, _sum_stats(stats), cells
