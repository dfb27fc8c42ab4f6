"""The similarity walk: order documents so that similar ones sit side by side.

Input is a kNN graph (rows best first, self excluded, -1 padding) and, optionally, the
embeddings and per-document token counts. Every step is a compiled pass (numba, see
`walk_kernels`) over O(N·k) arrays:

1. **Chains.** Start at the unvisited document of lowest in-degree (documents that few
   others list as a neighbour are the ones no walk reaches; starting there keeps them from
   ending up alone), step to the most similar unvisited neighbour among all k until stuck,
   then grow the chain backwards from its start the same way; restart at the next
   lowest-in-degree document.
2. **Re-home short chains.** A chain of fewer than `min_chain` documents (mostly single
   documents whose neighbours were all taken) is spliced next to its most similar
   document in a long chain, into the slot that adds the most adjacent similarity:
   between p and its successor or predecessor q, s(p, a) + s(b, q) - s(p, q), or at the
   free end of p's chain. Similarities come from the embeddings when given, else from the
   kNN rows, else (a pair in neither row) from the lower bound cos(angle(b, p) + angle(p, q)).
3. **Join chain ends.** The ends of the remaining chains are linked greedily, most similar
   pairs first, each end once and without cycles. Candidates are other chains' ends among
   an end's kNN neighbours and, re-searching two hops out, among the neighbours of its
   `join_via` nearest neighbours, scored by the lower bound cos(angle1 + angle2). Most
   restarts of step 1 then stop being junctions between unrelated documents.
4. **Layout.** Long chains in walk order; short chains still left over go together at the
   end (a few incoherent sequences rather than many with one unrelated document).
   Token-aware (`token_lengths` with `config.seq_len`): wherever a long chain ends inside a
   packed sequence, the rest of that sequence is filled with left-over short chains that
   fit (largest first), so breaks gather in sequences that already hold one and the next
   chain starts as close to a sequence boundary as the leftovers allow.

`order="random"` gives a seeded permutation, the baseline for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lorydata.errors import LoryDataError

_ORDERS = ("similarity", "random")
_SORT_CHECK_ROWS = 4096
LOCKSTEP_MIN_DOCS = 200_000  # from here on a (N, 20) graph no longer fits in a CPU's caches


@dataclass
class WalkConfig:
    """How to order documents.

    Args:
        order: "similarity" (the walk) or "random" (seeded permutation).
        min_chain: chains with fewer documents are re-homed (step 2), and laid out as
            leftovers (step 4) when that fails.
        rehome: run step 2.
        reach: step 2 tries the first `reach` kNN neighbours of each end of a short chain.
        min_gain: step 2 splices only where the adjacent-similarity gain exceeds this.
        join_ends: run step 3.
        join_via: step 3 re-searches through this many nearest neighbours (0 = only direct
            kNN neighbours).
        per_end: step 3 keeps this many best candidates per chain end.
        walkers: chains grown in lockstep in step 1 to hide memory latency (see
            `walk_kernels.greedy_chains`); None = 8 from `LOCKSTEP_MIN_DOCS` documents on,
            where the graph outgrows the CPU caches, else 1 (one chain after another).
        seq_len: packed sequence length for the token-aware layout (used with token lengths).
        seed: seed of the random order.
    """

    order: str = "similarity"
    min_chain: int = 4
    rehome: bool = True
    reach: int = 2
    min_gain: float = 0.0
    join_ends: bool = True
    join_via: int = 5
    per_end: int = 4
    walkers: int | None = None
    seq_len: int | None = None
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.order in _ORDERS, f"order must be 'similarity' or 'random', got {self.order!r}"),
            (self.min_chain >= 1, f"min_chain must be positive, got {self.min_chain}"),
            (self.reach >= 1, f"reach must be positive, got {self.reach}"),
            (self.join_via >= 0, f"join_via must be non-negative, got {self.join_via}"),
            (self.per_end >= 1, f"per_end must be positive, got {self.per_end}"),
            (self.walkers is None or self.walkers >= 1, f"walkers must be positive, got {self.walkers}"),
            (self.seq_len is None or self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoryDataError(message)


@dataclass
class WalkResult:
    """A document order and what the walk did.

    Args:
        order: (N,) int64 permutation of 0..N-1.
        stats: JSON-serialisable counts (chains walked, links made, re-homed chains...).
    """

    order: np.ndarray
    stats: dict = field(default_factory=dict)


def random_order(n: int, seed: int = 0) -> np.ndarray:
    """The baseline: a seeded random permutation of 0..n-1."""
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def _check_graph(neighbors, similarities, embeddings, token_lengths):
    neighbors = np.ascontiguousarray(neighbors, dtype=np.int64)
    similarities = np.ascontiguousarray(similarities, dtype=np.float32)
    n = len(neighbors)
    if neighbors.ndim != 2 or neighbors.shape != similarities.shape or neighbors.shape[1] == 0:
        raise LoryDataError(f"neighbours {neighbors.shape} and similarities {similarities.shape} must be equal (N, k)")
    if embeddings is not None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise LoryDataError(f"embeddings of shape {embeddings.shape} do not match {n} documents")
    if token_lengths is not None:
        token_lengths = np.ascontiguousarray(token_lengths, dtype=np.int64)
        if token_lengths.shape != (n,) or (n and token_lengths.min() < 0):
            raise LoryDataError(f"token_lengths must be {n} non-negative counts, got shape {token_lengths.shape}")
    from lorydata.walk_kernels import rows_sorted, scan_graph

    degree, bad_ids = scan_graph(neighbors)
    if bad_ids:
        raise LoryDataError(f"{bad_ids} neighbour ids lie outside [0, {n}) (-1 is the only allowed filler)")
    # Rows must be best first. FAISS output is; checking a sample of rows catches a caller's
    # unsorted graph without a second pass over all of it, and then everything is sorted.
    if n <= _SORT_CHECK_ROWS:
        rows = np.arange(n)
    else:
        rows = np.random.default_rng(0).choice(n, _SORT_CHECK_ROWS, replace=False)
    if not rows_sorted(neighbors, similarities, rows):
        safe = np.where(neighbors >= 0, similarities, -np.inf)
        by_sim = np.argsort(-safe, axis=1, kind="stable")
        neighbors = np.take_along_axis(neighbors, by_sim, axis=1)
        similarities = np.take_along_axis(similarities, by_sim, axis=1)
    return neighbors, similarities, embeddings, token_lengths, degree


def walk(
    neighbors: np.ndarray,
    similarities: np.ndarray,
    config: WalkConfig | None = None,
    *,
    embeddings: np.ndarray | None = None,
    token_lengths: np.ndarray | None = None,
    stream_start: int = 0,
) -> WalkResult:
    """Order documents by the similarity walk (module docstring), or randomly.

    Args:
        neighbors: (N, k) int64 kNN ids (self excluded, -1 = none).
        similarities: (N, k) float32 similarities of those neighbours.
        config: walk options.
        embeddings: (N, d) unit vectors; step 2 then scores every slot exactly.
        token_lengths: (N,) tokens per document (EOS excluded); with `config.seq_len` turns
            on the token-aware layout.
        stream_start: token position of the first document in the packed stream (non-zero
            when this walk is one partition of a larger order).

    Returns:
        A `WalkResult` whose `order` is a permutation of 0..N-1.
    """
    from lorydata import walk_kernels as kernels

    config = config or WalkConfig()
    n = len(neighbors)
    if stream_start < 0:
        raise LoryDataError(f"stream_start must be non-negative, got {stream_start}")
    if config.order == "random":
        return WalkResult(random_order(n, config.seed), {"method": "random", "seed": config.seed})
    neighbors, similarities, embeddings, token_lengths, degree = _check_graph(
        neighbors, similarities, embeddings, token_lengths)
    stats: dict = {"method": "similarity", "documents": n}
    if n == 0:
        return WalkResult(np.zeros(0, np.int64), stats)
    start_queue = kernels.queue_by_degree(degree)
    emb = embeddings if embeddings is not None else np.zeros((0, 1), np.float32)
    walkers = config.walkers or (8 if n >= LOCKSTEP_MIN_DOCS else 1)
    order, offsets, link = kernels.greedy_chains(neighbors, similarities, start_queue, walkers)
    stats["walkers"] = walkers
    stats["chains_walked"] = len(offsets) - 1
    if config.rehome:
        order, offsets, link, chains_moved, docs_moved = kernels.rehome_short_chains(
            order, offsets, link, neighbors, similarities, emb, config.min_chain, config.min_gain, config.reach)
        stats["short_chains_rehomed"] = int(chains_moved)
        stats["documents_rehomed"] = int(docs_moved)
    if config.join_ends and len(offsets) > 2:
        cand = kernels.end_candidates(order, offsets, neighbors, similarities, config.join_via, config.per_end)
        order, offsets, link, links = kernels.join_chains(order, offsets, link, *cand)
        stats["ends_joined"] = int(links)
    sizes = np.diff(offsets)
    is_long = sizes >= config.min_chain
    stats["chains"] = len(sizes)
    stats["leftover_documents"] = int(sizes[~is_long].sum())
    if token_lengths is not None and config.seq_len is not None:
        order = kernels.token_aware_layout(order, offsets, is_long, token_lengths, config.seq_len, stream_start)
        stats["token_aware"] = True
    else:
        order = kernels.long_then_short(order, offsets, is_long)
        stats["token_aware"] = False
    return WalkResult(order, stats)
