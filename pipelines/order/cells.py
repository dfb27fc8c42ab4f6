"""`--partitions P > 1`: the similarity order of a split as k-means cells on the runner.

k-means centroids are trained in the driver on a hash-chosen sample (256 per cell), and a
cell the sample shows holding more than `MAX_CELL_FACTOR` times the mean is split by a
k-means of its own sample points (`lorydata.partition.split_large_cells`), so the largest
cell, whose graph and walk are the order stage's peak memory, stays near the mean cell size
whatever the corpus size. `cell_steps.AssignCellsFn` writes every document to its nearest
centroid's cell files; `OrderCellFn` builds each cell's graph and walk on one worker; the
cells are chained by a walk over their centroids in the driver, and each cell's walk is cut
into packing blocks (the shards stage's units) where a document starts a sequence. The
driver holds the sample, O(cells) state and the adjacent similarities (4 bytes per
document) for the metrics. Neighbours across cell borders are lost: the recorded kNN recall
is measured against exact search over the whole split (streamed a documents file at a
time), so the manifest shows what partitioning cost. With semantic dedup each cell drops
its own duplicates.
"""

from __future__ import annotations

import faiss
import numpy as np

from lorydata.knn import as_unit_float32
from lorydata.order_metrics import adjacent_metrics, break_threshold
from lorydata.partition import PartitionConfig, chain_cells, partition
from pipelines import fileio, layout
from pipelines.order import semantic_dedup
from pipelines.order.cell_steps import AssignCellsFn, MergeRoutesFn, OrderCellFn
from pipelines.order.config import OrderConfig
from pipelines.order.split_data import split_rows
from pipelines.runner.beam import BeamRunner

KMEANS_POINTS_PER_CELL = 256
# Largest cell allowed, in mean cells (n / P). A cap of 1 would split cells over mere sampling
# noise (256 sample points per cell: ~6% standard error) and k-means' ordinary spread of
# sizes, trading semantic cells for many small ones; 1.5 leaves those alone, splits the
# outliers (a dominant topic: 2.8x the mean in a 1M-document dump at P=20), and bounds a
# worker's memory to about 1.5 mean cells at any corpus size.
MAX_CELL_FACTOR = 1.5
RECALL_SAMPLE = 1000  # queries checked against exact search
_INT_STATS = ("chains_walked", "short_chains_rehomed", "documents_rehomed", "ends_joined", "chains",
              "leftover_documents")


def cells_order(config: OrderConfig, runner: BeamRunner, documents_dir: str, embeddings_dir: str, split: str,
                out: str, n: int, parts: int, sample: np.ndarray) -> dict:
    """Order `split` as `parts` k-means cells (oversized ones split), cut into packing
    blocks (the units), chained by their centroids.

    Args:
        config: the order options.
        runner: where the Beam steps run.
        documents_dir / embeddings_dir: the finished documents and embeddings stage folders.
        split: the split.
        out: the order stage's (temp) folder.
        n: documents in the split.
        parts: k-means cells to train (more once oversized ones are split).
        sample: the k-means training sample of the split's vectors.

    Returns:
        {"order": {...}, "index": {...}} for the manifest.
    """
    # Deterministic from the sample alone, so a resumed build gets the centroids its committed
    # AssignCells files were written with.
    trained = partition(sample, PartitionConfig(parts=parts, seed=config.seed, device=config.device,
                                                max_points_per_cell=KMEANS_POINTS_PER_CELL,
                                                max_cell_factor=MAX_CELL_FACTOR))
    centroids = trained.centroids
    _drop_cells_of_other_centroids(out, len(centroids))
    threshold = break_threshold(sample, seed=config.seed)
    files = layout.documents_files(documents_dir)
    on = config.semantic is not None
    if on:
        semantic_dedup.sign_split(config.semantic, runner, files, split, out)
    runner.run_each(out, "AssignCells", files, AssignCellsFn(out, embeddings_dir, split, centroids,
                                                             min(1.0, RECALL_SAMPLE / n), config.seed, semantic=on))
    counts = sum(fileio.load_npy(p) for p in fileio.match(fileio.join(layout.cell_counts_folder(out), "*.npy")))
    sequence = chain_cells(centroids, counts[:, 0])
    # Largest cells first, so the longest task is not the last one a worker picks up.
    elements = sorted(((int(c), u) for u, c in enumerate(sequence)), key=lambda e: -counts[e[0], 0])
    semantic = (config.semantic.cos, config.semantic.confirm_jaccard) if on else None
    # The requested index as given: each cell falls back to exact search on its own when it
    # is too small to train it (`OrderCellFn`), and the automatic choice follows cell size.
    runner.run_each(out, "OrderCells", elements, OrderCellFn(out, config.knn_config(), config.walk_config(),
                                                             threshold, semantic))
    results = [fileio.load_json(layout.cell_result_file(out, int(c), "result.json")) for c in sequence]
    # Each cell's packing blocks (its walked documents: what semantic dedup dropped is not
    # in them) are units, in chain order.
    cut = [cell_blocks(r, counts[int(c)]) for c, r in zip(sequence, results, strict=True)]
    blocks = [counts_of for _, counts_of in cut]
    first_unit = np.cumsum([0] + [len(b) for b in blocks])
    units_of_cell = {int(c): (int(first_unit[i]), cut[i][0]) for i, c in enumerate(sequence)}
    runner.run_each(out, "MergeRoutes", files, MergeRoutesFn(out, units_of_cell, split))
    dropped = np.array([r["semantic_dedup"]["dropped"] if on else 0 for r in results], np.int64)
    units = np.concatenate(blocks) if blocks else np.zeros((0, 2), np.int64)
    fileio.save_npy(layout.units_file(out), units)
    walked = n - int(dropped.sum())
    cell_sizes = np.array([int(b[:, 0].sum()) for b in blocks], np.int64)  # walked documents per cell
    adjacent = np.concatenate([fileio.load_npy(layout.cell_result_file(out, int(c), "adjacent.npy")) for c in sequence])
    recall, queries = _cells_recall(out, sequence, documents_dir, embeddings_dir, split, config.k, n)
    broken, sequences = sum(r["broken_sequences"] for r in results), sum(r["sequences"] for r in results)
    metrics = {
        "documents": walked,
        "break_threshold": float(threshold),
        "break_rule": f"0.95 quantile of random-pair cosine similarity in a sample of {len(sample)} documents "
                      f"(seed {config.seed})",
        "break_rate": broken / sequences if sequences else 0.0,
        "broken_sequences": broken,
        "sequences": sequences,
        "seq_len": config.seq_len,
        **adjacent_metrics(adjacent, threshold, cell_sizes),
        "hubness": {"orphan_share": sum(r["orphans"] for r in results) / n,
                    "max_in_degree": max(r["max_in_degree"] for r in results), "k": config.k},
        "knn_recall": recall,
    }
    graphs = [r["graph"] for r in results if r["graph"]["documents"]]
    nprobes = sorted({g["nprobe"] for g in graphs if g["nprobe"] is not None})
    index = {"index": " | ".join(sorted({g["index"] for g in graphs})) or "Flat", "k": config.k,
             "nprobe": nprobes[0] if len(nprobes) == 1 else None,
             "device": "cuda" if any(g["device"] == "cuda" for g in graphs) else "cpu", "metric": "inner_product",
             "documents": n, "knn_recall": recall, "recall_sample": queries,
             "recall_against": "exact search over the whole split"}
    # "used": k-means cells trained; "cells": those after splitting the oversized ones.
    partitions = {"requested": config.partitions, "used": parts, "cells": len(centroids), "split": trained.split,
                  "max_cell_factor": MAX_CELL_FACTOR, "cell_sizes": [int(s) for s in counts[:, 0]],
                  "cell_order": [int(c) for c in sequence]}
    info = {"method": "similarity", "seed": config.seed, "metrics": metrics,
            "walk": _sum_stats([r["walk"] for r in results]), "partitions": partitions, "units": len(units)}
    if on:
        info["semantic_dedup"] = semantic_dedup.summary(config.semantic, [r["semantic_dedup"] for r in results])
    return {"order": info, "index": index}


def _drop_cells_of_other_centroids(out: str, cells: int) -> None:
    """Remove what an earlier run wrote from another number of cells (a build started by a
    lory that did not split oversized cells, resumed by one that does): the cell files, the
    routes and the semantic dead letters, so the steps that wrote them run again instead of
    mixing two sets of cells. With the same number the centroids are the same: they follow
    from the sample alone."""
    counts = fileio.match(fileio.join(layout.cell_counts_folder(out), "*.npy"))
    if any(len(fileio.load_npy(path)) != cells for path in counts):
        for folder in (layout.cells_folder(out), layout.cell_counts_folder(out), layout.cell_routes_folder(out),
                       fileio.dirname(layout.routes_file(out, "any")), layout.dead_letters(out)):
            fileio.delete_tree(folder)


def cell_blocks(result: dict, cell_counts: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(walk positions where the cell's packing blocks start, (blocks, 2) documents and tokens
    with their EOS per block) from a cell's `result.json`. A result written by a lory from
    before packing blocks (a build resumed across the upgrade) is one block: the cell's
    counts less what semantic dedup dropped.

    Args:
        result: the cell's result record (`OrderCellFn`).
        cell_counts: (documents, tokens with EOS) the assign step counted in the cell.
    """
    if "blocks" in result:
        return list(result["blocks"]["starts"]), np.asarray(result["blocks"]["counts"], np.int64).reshape(-1, 2)
    dropped = result.get("semantic_dedup", {"dropped": 0, "tokens_dropped": 0})
    return [0], (np.asarray(cell_counts, np.int64)
                 - np.array([dropped["dropped"], dropped["tokens_dropped"] + dropped["dropped"]], np.int64))[None]


def _sum_stats(all_stats: list[dict]) -> dict:
    """Walk stats of several cells added up (counts only)."""
    total = {"method": "similarity", "documents": sum(int(s.get("documents", 0)) for s in all_stats)}
    for key in _INT_STATS:
        total[key] = sum(int(s.get(key, 0)) for s in all_stats)
    total["token_aware"] = any(s.get("token_aware", False) for s in all_stats)
    return total


def _cells_recall(out: str, cells: list[int], documents_dir: str, embeddings_dir: str, split: str, k: int,
                  n: int) -> tuple[float, int]:
    """Recall@k of the cells' graphs against exact search over the whole split, for the
    hash-chosen query sample, streaming the split's vectors a documents file at a time. A
    neighbour counts when its similarity reaches the exact k-th one's (minus 1e-5), as in
    `lorydata.knn.knn_recall`.

    Returns:
        (recall, number of queries).
    """
    recalls = [fileio.load_npz(layout.cell_result_file(out, int(c), "recall.npz")) for c in cells]
    queries = as_unit_float32(np.concatenate([r["x"] for r in recalls]))
    found = np.concatenate([r["similarities"] for r in recalls])
    width = min(k, n - 1)
    if len(queries) == 0 or width <= 0:
        return 1.0, 0
    best = np.full((len(queries), width + 1), -np.inf, np.float32)  # the query itself included
    for path in layout.documents_files(documents_dir):
        rows = split_rows(fileio.read_table(path, ["split"]), split)
        if len(rows) == 0:
            continue
        x = as_unit_float32(fileio.load_npy(layout.embeddings_file(embeddings_dir, path))[rows])
        sims, _ = faiss.knn(queries, x, min(width + 1, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        best = -np.sort(-np.concatenate([best, sims], axis=1), axis=1)[:, : width + 1]
    kth = best[:, width]
    hits = np.isfinite(found[:, :width]) & (found[:, :width] >= kth[:, None] - 1e-5)
    return float(hits.sum(axis=1).mean() / width), len(queries)
