"""Stage 3, order: the document order of one split, as routes (per documents file: each
document's unit and key) and units (per unit: documents and tokens); see
`pipelines.order.split_data`.

- random (`random_keys`): a seeded hash of each content hash is its key and picks its unit
  among equal hash ranges of about `split_data.UNIT_TOKENS` tokens; nothing of the split is
  ever in one process.
- similarity (`similarity`): kNN graph and walk, globally in the driver (`global_walk`) or
  per k-means cell on the runner (`cells`, `cell_steps`), with optional semantic dedup
  (`semantic_dedup`).
"""

from __future__ import annotations

from pipelines.order.config import OrderConfig
from pipelines.order.random_keys import random_order
from pipelines.order.similarity import similarity_order
from pipelines.runner.beam import BeamRunner


def compute_order(config: OrderConfig, runner: BeamRunner, documents_dir: str, embeddings_dir: str | None,
                  split: str, out: str, counts: dict) -> dict:
    """Order one split into `out` (routes, units, and the kNN graph of a global walk).

    Args:
        config: the stage's options.
        runner: where the Beam steps run.
        documents_dir: the finished documents stage folder.
        embeddings_dir: the finished embeddings stage folder (similarity order only).
        split: "train" or "heldout".
        out: the order stage's (temp) folder.
        counts: the documents stage's counts (documents and tokens per split).

    Returns:
        {"order": {"method", "seed", "metrics", "units", ...}, "index"} for the manifest.
    """
    n = counts["documents_per_split"][split]
    documents_dir, out = str(documents_dir), str(out)
    if config.method == "random":
        tokens = counts.get("tokens_per_split", {}).get(split, 0)
        return random_order(config.seed, runner, documents_dir, split, out, n, tokens)
    return similarity_order(config, runner, documents_dir, str(embeddings_dir), split, out, n)
