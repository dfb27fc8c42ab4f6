"""Stage 3: the document order of one split, as routes (per bucket: each document's unit
and key) and units (per unit: documents and tokens); see `pipelines.split_data`.

- random: a seeded hash of each content hash is its key and picks its unit among equal
  hash ranges of about `split_data.UNIT_TOKENS` tokens (`RandomRoutesFn`, per bucket);
  nothing of the split is ever in one process.
- similarity: `pipelines.similarity_order`.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines import fileio, split_data
from pipelines.options import BuildOptions


def random_order(options: BuildOptions, documents_dir: str, split: str, out: str, n: int, tokens: int) -> dict:
    """Routes and units of the random order (see the module docstring)."""
    from pipelines.cells import UNIT_COUNTS, RandomRoutesFn
    from pipelines.documents_stage import bucket_files
    from pipelines.transforms import run_each

    units = max(1, math.ceil((tokens + n) / split_data.UNIT_TOKENS))
    run_each(options, "RandomRoutes", bucket_files(documents_dir), RandomRoutesFn(out, split, units, options.seed))
    parts = fileio.match(fileio.join(out, UNIT_COUNTS, "*.npy"))
    totals = sum((fileio.load_npy(p) for p in parts), np.zeros((units, 2), np.int64))
    fileio.save_npy(fileio.join(out, split_data.UNITS), totals)
    fileio.delete_tree(fileio.join(out, UNIT_COUNTS))
    return {"order": {"method": "random", "seed": options.seed, "metrics": {}, "units": units}}


def compute_order(options: BuildOptions, documents_dir, embeddings_dir, split: str, out, counts: dict) -> dict:
    """Order one split into `out` (routes, `units.npy`, and `knn/` for a global walk).

    Args:
        options: build options.
        documents_dir: the finished documents stage folder.
        embeddings_dir: the finished embeddings stage folder (similarity order only).
        split: "train" or "heldout".
        out: the order stage's temp folder.
        counts: the documents stage's counts (documents and tokens per split).

    Returns:
        {"order": {"method", "seed", "metrics", "units", ...}, "embedder", "index"} for the manifest.
    """
    n = counts["documents_per_split"][split]
    if options.order == "random":
        tokens = counts.get("tokens_per_split", {}).get(split, 0)
        return random_order(options, str(documents_dir), split, str(out), n, tokens)
    from pipelines.similarity_order import similarity_order

    return similarity_order(options, documents_dir, embeddings_dir, split, out, n)
