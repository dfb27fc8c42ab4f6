"""Stage 3, similarity order of one split: kNN graph + walk over the document embeddings.

`--partitions 1`, for splits whose embeddings fit in one process: the graph and the walk
cover the whole split in the driver (the walk is compiled and takes seconds per million
documents; the graph is the costly part), then the walk is cut into blocks of about
`split_data.UNIT_TOKENS` tokens at sequence boundaries (`lorydata.pack.block_starts`), the units
that the shards stage packs one per worker. The graph is kept in `knn/` for inspection.

P > 1, for any size: k-means centroids trained on a hash-chosen sample (256 per cell);
`AssignCellsFn` writes every document to its cell's files; `OrderCellFn` builds each
cell's graph and walk on one worker; the cells are chained by a walk over their centroids
in the driver, and each cell is one unit. The driver holds the sample, O(cells) state and
the adjacent similarities (4 bytes per document) for the metrics. Neighbours across cell
borders are lost: the recorded kNN recall is measured against exact search over the whole
split (streamed a bucket at a time), so the manifest shows what partitioning cost.

With `--semantic-dedup COS` both drop semantic duplicates from the graph before the walk
(the driver's graph, or each cell's: see `pipelines.semantic_dedup`); the dropped documents
keep the routes (-1, -1) and are in no unit. The graph kept in `knn/`, the kNN recall and
(P > 1) the hubness figures are those of the graph before the drops.

Both end with the routes files and `units.npy` of `pipelines.split_data`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, knn_recall
from lorydata.order_metrics import adjacent_metrics, break_threshold, ordering_metrics
from lorydata.walk import WalkConfig
from pipelines import fileio
from pipelines.markers import MARKER
from pipelines.options import BuildOptions
from pipelines.split_data import UNITS

RECALL_SAMPLE = 1000  # queries checked against exact search
KMEANS_POINTS_PER_CELL = 256
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




def _empty_order(options: BuildOptions, out: str, embeddings_dir) -> dict:
    fileio.save_npy(fileio.join(out, UNITS), np.zeros((0, 2), np.int64))
    return {"order": {"method": "similarity", "seed": options.seed, "metrics": {"documents": 0}, "units": 0},
            "embedder": _embedder_identity(embeddings_dir), "index": None}


def similarity_order(options: BuildOptions, documents_dir, embeddings_dir, split: str, out, n: int) -> dict:
    """Order one split by similarity: routes and units in `out` (see the module docstring).

    Args:
        options: build options (k, index, nprobe, device, partitions, seq_len, seed).
        documents_dir: the finished documents stage folder.
        embeddings_dir: the finished embeddings stage folder.
        split: "train" or "heldout".
        out: the order stage's temp folder.
        n: documents in the split.

    Returns:
        {"order": {"method", "seed", "metrics", "walk", "partitions", "units"}, "embedder", "index"}
    """
    documents_dir, embeddings_dir, out = str(documents_dir), str(embeddings_dir), str(out)
    if n == 0:
        return _empty_order(options, out, embeddings_dir)
    parts = partitions_for(options.partitions, n, options.k)
    if parts > 1:
        from pipelines.split_data import sample_split_vectors

        fraction = min(1.0, KMEANS_POINTS_PER_CELL * parts / n)
        sample = sample_split_vectors(documents_dir, embeddings_dir, split, fraction, options.seed)
        if len(sample) >= 2 * parts:
            return _cells_order(options, documents_dir, embeddings_dir, split, out, n, parts, sample)
    return _global_order(options, documents_dir, embeddings_dir, split, out)


def _global_order(options: BuildOptions, documents_dir: str, embeddings_dir: str, split: str, out: str) -> dict:
    """`--partitions 1`: one graph and one walk in this process, cut into packing blocks."""
    from lorydata.knn import compact_graph
    from lorydata.pack import block_starts
    from lorydata.partition import order_cell
    from pipelines import split_data
    from pipelines.cells import unit_counts

    data = split_data.load_split_vectors(documents_dir, embeddings_dir, split)
    x, lengths, n = data.x, data.lengths, len(data.x)
    semantic = _semantic_filter(options, data.files, split, out)
    result = order_cell(x, knn_config(options, n), walk_config(options), token_lengths=lengths, keep=semantic)
    graph, order = result.graph, result.order
    graph.save(Path(out) / "knn")
    recall = knn_recall(x, graph.neighbors, sample=RECALL_SAMPLE, seed=options.seed)
    kept = np.ones(n, bool) if result.keep is None else result.keep
    walked = graph if result.keep is None else compact_graph(graph, kept)
    renumber = np.cumsum(kept) - 1  # metrics over the walked documents, numbered 0..m-1
    metrics = ordering_metrics(renumber[order], x[kept], token_lengths=lengths[kept], seq_len=options.seq_len,
                               neighbors=walked.neighbors, knn_recall=recall, seed=options.seed)
    cuts = block_starts(lengths[order], options.seq_len, split_data.UNIT_TOKENS)
    unit_at = np.repeat(np.arange(len(cuts)), np.diff(np.append(cuts, len(order))))  # unit of each walk position
    position = np.full(n, -1, np.int64)  # -1: dropped, never packed
    position[order] = np.arange(len(order))
    drops = {} if semantic is None else {r["index"]: r for r in semantic.records()}
    start = 0
    for path, rows, size in zip(data.files, data.rows, data.sizes, strict=True):
        routes = split_data.empty_routes(size)
        mine = position[start: start + len(rows)]
        on = mine >= 0
        routes[rows[on], 0], routes[rows[on], 1] = unit_at[mine[on]], mine[on]
        fileio.save_npy(split_data.routes_file(out, path), routes)
        if drops:
            from pipelines.semantic_dedup import DEAD_LETTERS, drops_in, write_dead_letters

            write_dead_letters(path, drops_in(drops, start, rows), fileio.join(out, DEAD_LETTERS), split)
        start += len(rows)
    fileio.save_npy(fileio.join(out, UNITS), unit_counts(unit_at, lengths[order], len(cuts)))
    info = {"method": "similarity", "seed": options.seed, "metrics": metrics, "walk": result.stats,
            "partitions": {"requested": options.partitions, "used": 1}, "units": len(cuts)}
    if semantic is not None:
        from pipelines.semantic_dedup import summary

        info["semantic_dedup"] = summary(options, [semantic.counts(lengths)])
    return {
        "order": info,
        "embedder": _embedder_identity(embeddings_dir),
        "index": {**graph.describe(), "knn_recall": recall, "recall_sample": min(n, RECALL_SAMPLE),
                  "recall_against": "exact search over the whole split"},
    }


def _semantic_filter(options: BuildOptions, files: list[str], split: str, out: str):
    """With `--semantic-dedup`: the split's documents signed (on the runner) and the
    `order_cell` keep function over all of them; else None."""
    if options.semantic_dedup is None:
        return None
    from pipelines.semantic_dedup import SIGNATURES, SemanticFilter, load_signatures, sign_split

    sign_split(options, files, split, out)
    carried = load_signatures(out, files)
    fileio.delete_tree(fileio.join(out, SIGNATURES))  # scratch: the filter holds them now
    return SemanticFilter(carried, options.semantic_dedup, options.semantic_dedup_jaccard)


def _cells_order(options: BuildOptions, documents_dir: str, embeddings_dir: str, split: str, out: str, n: int,
                 parts: int, sample: np.ndarray) -> dict:
    """P > 1: k-means cells on the runner, one unit per cell, chained by their centroids."""
    from lorydata.partition import PartitionConfig, chain_cells, partition
    from pipelines.cells import (
        CELL_COUNTS,
        CELL_ROUTES,
        CELLS,
        AssignCellsFn,
        MergeRoutesFn,
        OrderCellFn,
        cell_name,
    )
    from pipelines.documents_stage import bucket_files
    from pipelines.semantic_dedup import SIGNATURES
    from pipelines.transforms import run_each

    centroids = partition(sample, PartitionConfig(parts=parts, seed=options.seed, device=options.device,
                                                  max_points_per_cell=KMEANS_POINTS_PER_CELL)).centroids
    threshold = break_threshold(sample, seed=options.seed)
    files = bucket_files(documents_dir)
    on = options.semantic_dedup is not None
    if on:
        from pipelines.semantic_dedup import sign_split

        sign_split(options, files, split, out)
    run_each(options, "AssignCells", files, AssignCellsFn(out, embeddings_dir, split, centroids,
                                                          min(1.0, RECALL_SAMPLE / n), options.seed, semantic=on))
    counts = sum(fileio.load_npy(p) for p in fileio.match(fileio.join(out, CELL_COUNTS, "*.npy")))
    sequence = chain_cells(centroids, counts[:, 0])
    # The requested index as given: each cell falls back to exact search on its own when it
    # is too small to train it (`OrderCellFn`), and the automatic choice follows cell size.
    config = KnnConfig(k=options.k, index=options.index, nprobe=options.nprobe, device=options.device,
                       seed=options.seed)
    # Largest cells first, so the longest task is not the last one a worker picks up.
    elements = sorted(((int(c), u) for u, c in enumerate(sequence)), key=lambda e: -counts[e[0], 0])
    semantic = (options.semantic_dedup, options.semantic_dedup_jaccard) if on else None
    run_each(options, "OrderCells", elements, OrderCellFn(out, config, walk_config(options), threshold, semantic))
    run_each(options, "MergeRoutes", files, MergeRoutesFn(out, {int(c): u for u, c in enumerate(sequence)}, split))
    folders = [fileio.join(out, CELLS, cell_name(int(c))) for c in sequence]
    results = [fileio.load_json(fileio.join(f, "result.json")) for f in folders]
    # What each cell dropped leaves its unit: documents, and tokens with their EOS.
    dropped = np.array([[r["semantic_dedup"]["dropped"], r["semantic_dedup"]["tokens_dropped"]
                         + r["semantic_dedup"]["dropped"]] if on else [0, 0] for r in results], np.int64)
    units = counts[sequence] - dropped
    fileio.save_npy(fileio.join(out, UNITS), units)
    walked = n - int(dropped[:, 0].sum())
    adjacent = np.concatenate([fileio.load_npy(fileio.join(f, "adjacent.npy")) for f in folders])
    recall, queries = _cells_recall(folders, documents_dir, embeddings_dir, split, options.k, n)
    broken, sequences = sum(r["broken_sequences"] for r in results), sum(r["sequences"] for r in results)
    metrics = {
        "documents": walked,
        "break_threshold": float(threshold),
        "break_rule": f"0.95 quantile of random-pair cosine similarity in a sample of {len(sample)} documents "
                      f"(seed {options.seed})",
        "break_rate": broken / sequences if sequences else 0.0,
        "broken_sequences": broken,
        "sequences": sequences,
        "seq_len": options.seq_len,
        **adjacent_metrics(adjacent, threshold, units[:, 0]),
        "hubness": {"orphan_share": sum(r["orphans"] for r in results) / n,
                    "max_in_degree": max(r["max_in_degree"] for r in results), "k": options.k},
        "knn_recall": recall,
    }
    graphs = [r["graph"] for r in results if r["graph"]["documents"]]
    nprobes = sorted({g["nprobe"] for g in graphs if g["nprobe"] is not None})
    index = {"index": " | ".join(sorted({g["index"] for g in graphs})) or "Flat", "k": options.k,
             "nprobe": nprobes[0] if len(nprobes) == 1 else None,
             "device": "cuda" if any(g["device"] == "cuda" for g in graphs) else "cpu", "metric": "inner_product",
             "documents": n, "knn_recall": recall, "recall_sample": queries,
             "recall_against": "exact search over the whole split"}
    for scratch in (CELLS, CELL_COUNTS, CELL_ROUTES, SIGNATURES):
        fileio.delete_tree(fileio.join(out, scratch))
    partitions = {"requested": options.partitions, "used": parts, "cell_sizes": [int(s) for s in counts[:, 0]],
                  "cell_order": [int(c) for c in sequence]}
    info = {"method": "similarity", "seed": options.seed, "metrics": metrics,
            "walk": _sum_stats([r["walk"] for r in results]), "partitions": partitions, "units": len(sequence)}
    if on:
        from pipelines.semantic_dedup import summary

        info["semantic_dedup"] = summary(options, [r["semantic_dedup"] for r in results])
    return {"order": info, "embedder": _embedder_identity(embeddings_dir), "index": index}


def _cells_recall(folders: list[str], documents_dir: str, embeddings_dir: str, split: str, k: int,
                  n: int) -> tuple[float, int]:
    """Recall@k of the cells' graphs against exact search over the whole split, for the
    hash-chosen query sample, streaming the split's vectors a bucket at a time. A neighbour
    counts when its similarity reaches the exact k-th one's (minus 1e-5), as in
    `lorydata.knn.knn_recall`.

    Returns:
        (recall, number of queries).
    """
    import faiss

    from lorydata.knn import as_unit_float32
    from pipelines.documents_stage import bucket_files
    from pipelines.embed_stage import embeddings_file
    from pipelines.split_data import split_rows

    recalls = [fileio.load_npz(fileio.join(f, "recall.npz")) for f in folders]
    queries = as_unit_float32(np.concatenate([r["x"] for r in recalls]))
    found = np.concatenate([r["similarities"] for r in recalls])
    width = min(k, n - 1)
    if len(queries) == 0 or width <= 0:
        return 1.0, 0
    best = np.full((len(queries), width + 1), -np.inf, np.float32)  # the query itself included
    for path in bucket_files(documents_dir):
        rows = split_rows(fileio.read_table(path, ["split"]), split)
        if len(rows) == 0:
            continue
        x = as_unit_float32(fileio.load_npy(embeddings_file(embeddings_dir, path))[rows])
        sims, _ = faiss.knn(queries, x, min(width + 1, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        best = -np.sort(-np.concatenate([best, sims], axis=1), axis=1)[:, : width + 1]
    kth = best[:, width]
    hits = np.isfinite(found[:, :width]) & (found[:, :width] >= kth[:, None] - 1e-5)
    return float(hits.sum(axis=1).mean() / width), len(queries)
