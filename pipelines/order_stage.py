"""Stage 3: the document order of one split (random, or similarity: kNN graph + walk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.options import BuildOptions
from pipelines.split_data import SplitDocuments


def random_order(n: int, seed: int) -> np.ndarray:
    """The baseline order: a seeded permutation of the (hash-sorted) documents."""
    return np.random.default_rng(seed).permutation(n)


def compute_order(docs: SplitDocuments, options: BuildOptions, embeddings_dir: Path | None, split: str,
                  out: Path) -> dict:
    """Compute the order of `docs`, save it as `out/order.npy`, and describe it.

    Returns:
        {"order": {"method", "seed", "metrics"}, "embedder": ..., "index": ...} for the manifest.
    """
    if options.order == "random":
        order = random_order(len(docs), options.seed)
        np.save(out / "order.npy", order)
        return {"order": {"method": "random", "seed": options.seed, "metrics": {}}}
    from pipelines.similarity_order import similarity_order

    return similarity_order(docs, options, embeddings_dir, split, out)
