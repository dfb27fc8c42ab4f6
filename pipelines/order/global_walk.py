"""`--partitions 1`: one kNN graph and one walk over a whole split, in the driver.

For splits whose embeddings fit in one process: the walk is compiled and takes seconds per
million documents (the graph is the costly part), then it is cut into blocks of about
`split_data.UNIT_TOKENS` tokens at sequence boundaries (`lorydata.pack.block_starts`), the
units that the shards stage packs one per worker. The graph is kept (`layout.knn_folder`)
for inspection. With semantic dedup the driver's graph drops its duplicates before the walk.
"""

from __future__ import annotations

import json

import numpy as np

from lorydata.knn import compact_graph, knn_recall
from lorydata.order_metrics import ordering_metrics
from lorydata.pack import block_starts
from lorydata.partition import order_cell
from pipelines import dead_letters, fileio, layout
from pipelines.order import semantic_dedup
from pipelines.order.config import OrderConfig
from pipelines.order.split_data import UNIT_TOKENS, block_of, empty_routes, load_split_vectors, unit_counts
from pipelines.runner.beam import BeamRunner

RECALL_SAMPLE = 1000  # queries checked against exact search


def global_order(config: OrderConfig, runner: BeamRunner, documents_dir: str, embeddings_dir: str, split: str,
                 out: str) -> dict:
    """Order `split` with one graph and one walk; routes and units into `out`.

    Args:
        config: the order options.
        runner: where the semantic-dedup signing step runs (when on).
        documents_dir / embeddings_dir: the finished documents and embeddings stage folders.
        split: the split.
        out: the order stage's (temp) folder.

    Returns:
        {"order": {...}, "index": {...}} for the manifest.
    """
    data = load_split_vectors(documents_dir, embeddings_dir, split)
    x, lengths, n = data.x, data.lengths, len(data.x)
    semantic = _semantic_filter(config, runner, data.files, split, out)
    result = order_cell(x, config.knn_config(n), config.walk_config(), token_lengths=lengths, keep=semantic)
    graph, order = result.graph, result.order
    _save_graph(graph, layout.knn_folder(out))
    recall = knn_recall(x, graph.neighbors, sample=RECALL_SAMPLE, seed=config.seed)
    kept = np.ones(n, bool) if result.keep is None else result.keep
    walked = graph if result.keep is None else compact_graph(graph, kept)
    renumber = np.cumsum(kept) - 1  # metrics over the walked documents, numbered 0..m-1
    metrics = ordering_metrics(renumber[order], x[kept], token_lengths=lengths[kept], seq_len=config.seq_len,
                               neighbors=walked.neighbors, knn_recall=recall, seed=config.seed)
    cuts = block_starts(lengths[order], config.seq_len, UNIT_TOKENS)
    unit_at = block_of(cuts, np.arange(len(order)))  # unit of each walk position
    position = np.full(n, -1, np.int64)  # -1: dropped, never packed
    position[order] = np.arange(len(order))
    drops = {} if semantic is None else {r["index"]: r for r in semantic.records()}
    start = 0
    for path, rows, size in zip(data.files, data.rows, data.sizes, strict=True):
        routes = empty_routes(size)
        mine = position[start: start + len(rows)]
        on = mine >= 0
        routes[rows[on], 0], routes[rows[on], 1] = unit_at[mine[on]], mine[on]
        fileio.save_npy(layout.routes_file(out, path), routes)
        if drops:
            letters = semantic_dedup.dead_letters_of(path, semantic_dedup.drops_in(drops, start, rows))
            dead_letters.write(None, layout.dead_letter_file(out, layout.semantic_dead_letter_name(split, path)),
                               letters)
        start += len(rows)
    fileio.save_npy(layout.units_file(out), unit_counts(unit_at, lengths[order], len(cuts)))
    info = {"method": "similarity", "seed": config.seed, "metrics": metrics, "walk": result.stats,
            "partitions": {"requested": config.partitions, "used": 1}, "units": len(cuts)}
    if semantic is not None:
        info["semantic_dedup"] = semantic_dedup.summary(config.semantic, [semantic.counts(lengths)])
    return {
        "order": info,
        "index": {**graph.describe(), "knn_recall": recall, "recall_sample": min(n, RECALL_SAMPLE),
                  "recall_against": "exact search over the whole split"},
    }


def _save_graph(graph, folder: str) -> None:
    """The kNN graph for inspection, as `KnnGraph.save` lays it out (`KnnGraph.load` reads
    it), through the file layer."""
    fileio.save_npy(fileio.join(folder, "neighbors.npy"), graph.neighbors)
    fileio.save_npy(fileio.join(folder, "similarities.npy"), graph.similarities)
    fileio.write_bytes(fileio.join(folder, "knn.json"), json.dumps(graph.describe(), indent=1).encode())


def _semantic_filter(config: OrderConfig, runner: BeamRunner, files: list[str], split: str,
                     out: str) -> semantic_dedup.SemanticFilter | None:
    """With semantic dedup: the split's documents signed (on the runner) and the
    `order_cell` keep function over all of them; else None."""
    if config.semantic is None:
        return None
    semantic_dedup.sign_split(config.semantic, runner, files, split, out)
    carried = semantic_dedup.load_signatures(out, files)
    return semantic_dedup.SemanticFilter(carried, config.semantic.cos, config.semantic.confirm_jaccard)
