"""The similarity order of one split: kNN graph + walk over the document embeddings, in
the driver (`global_walk`, `--partitions 1`) or per k-means cell on the runner (`cells`).

With `--semantic-dedup COS` both drop semantic duplicates from the graph before the walk
(see `semantic_dedup`); the dropped documents keep the routes (-1, -1) and are in no unit.
The graph kept for inspection, the kNN recall and (P > 1) the hubness figures are those of
the graph before the drops. Both end with the routes files and the units file of
`split_data`.
"""

from __future__ import annotations

import numpy as np

from pipelines import fileio, layout
from pipelines.order.cells import KMEANS_POINTS_PER_CELL, cells_order
from pipelines.order.config import OrderConfig, partitions_for
from pipelines.order.global_walk import global_order
from pipelines.order.split_data import sample_split_vectors
from pipelines.runner.beam import BeamRunner


def similarity_order(config: OrderConfig, runner: BeamRunner, documents_dir: str, embeddings_dir: str, split: str,
                     out: str, n: int) -> dict:
    """Order one split by similarity: routes and units in `out` (see the module docstring).

    Args:
        config: the order options (k, index, nprobe, device, partitions, seq_len, seed).
        runner: where the Beam steps run.
        documents_dir: the finished documents stage folder.
        embeddings_dir: the finished embeddings stage folder.
        split: "train" or "heldout".
        out: the order stage's (temp) folder.
        n: documents in the split.

    Returns:
        {"order": {"method", "seed", "metrics", "walk", "partitions", "units"}, "index"}
    """
    if n == 0:
        fileio.save_npy(layout.units_file(out), np.zeros((0, 2), np.int64))
        return {"order": {"method": "similarity", "seed": config.seed, "metrics": {"documents": 0}, "units": 0},
                "index": None}
    parts = partitions_for(config.partitions, n, config.k)
    if parts > 1:
        fraction = min(1.0, KMEANS_POINTS_PER_CELL * parts / n)
        sample = sample_split_vectors(documents_dir, embeddings_dir, split, fraction, config.seed)
        if len(sample) >= 2 * parts:
            return cells_order(config, runner, documents_dir, embeddings_dir, split, out, n, parts, sample)
    return global_order(config, runner, documents_dir, embeddings_dir, split, out)
