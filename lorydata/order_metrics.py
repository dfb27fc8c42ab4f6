"""Quality of a document order, for the manifest and for comparing orders.

**Break threshold.** An adjacent pair is "unrelated" when its cosine similarity is below
the 0.95 quantile of the similarities of random document pairs of the same corpus: it is
then no more similar than 95% of pairs drawn at random, i.e. indistinguishable from a
random neighbour at the 5% level. The threshold depends only on the embeddings (a
fixed-seed sample of pairs), never on the order, so every order of a corpus is judged
against the same bar, and it adapts to the embedding model's similarity scale (cosines of
one model are not comparable with another's).

**Break rate.** Documents are packed in order, each followed by one EOS token, and cut
every `seq_len` tokens. An adjacent pair (a, b) lies in the sequence where b begins,
unless b begins exactly at a sequence start (then no sequence holds both). The break rate
is the share of sequences (the partial last one included) holding an unrelated pair.
Without token lengths, windows of `window_docs` consecutive documents stand in for
sequences.

**Chains** are the maximal runs of documents whose adjacent pairs are all related.
**Hubness** is the share of documents in no neighbour list of the kNN graph.

**Domain agreement** (for comparing embedders on a corpus with domain labels): the share of
documents whose nearest neighbour has their domain, and the share of adjacent pairs along
the similarity walk with one domain, against what a random order gives.
"""

from __future__ import annotations

import numpy as np

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig
from lorydata.partition import order_cell
from lorydata.walk import WalkConfig

BREAK_QUANTILE = 0.95


def random_pair_similarities(embeddings: np.ndarray, pairs: int = 100_000, seed: int = 0) -> np.ndarray:
    """Cosine similarities of `pairs` random pairs of distinct documents (fixed seed)."""
    n = len(embeddings)
    if n < 2:
        return np.zeros(0, np.float32)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, pairs)
    second = (first + rng.integers(1, n, pairs)) % n  # never the same document
    return _rowwise_dot(embeddings, first, second)


def break_threshold(embeddings: np.ndarray, quantile: float = BREAK_QUANTILE, pairs: int = 100_000,
                    seed: int = 0) -> float:
    """The similarity below which an adjacent pair counts as unrelated (module docstring)."""
    sims = random_pair_similarities(embeddings, pairs, seed)
    return float(np.quantile(sims, quantile)) if len(sims) else 0.0


def _rowwise_dot(embeddings: np.ndarray, left: np.ndarray, right: np.ndarray, step: int = 65_536) -> np.ndarray:
    out = np.empty(len(left), np.float32)
    for start in range(0, len(left), step):
        a = np.asarray(embeddings[left[start: start + step]], dtype=np.float32)
        b = np.asarray(embeddings[right[start: start + step]], dtype=np.float32)
        out[start: start + step] = np.einsum("ij,ij->i", a, b)
    return out


def adjacent_similarities(embeddings: np.ndarray, order: np.ndarray) -> np.ndarray:
    """(N-1,) cosine similarity of every pair of documents adjacent in `order`."""
    order = np.asarray(order, dtype=np.int64)
    return _rowwise_dot(embeddings, order[:-1], order[1:])


def pair_sequences(lengths_in_order: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Which packed sequence holds each adjacent pair, and how many sequences there are.

    Args:
        lengths_in_order: tokens of each document in packing order (EOS excluded).
        seq_len: tokens per sequence.

    Returns:
        ((N-1,) sequence index of pair i = (doc i, doc i+1), -1 when doc i+1 starts a
        sequence; number of sequences, the partial last one included).
    """
    sizes = np.asarray(lengths_in_order, dtype=np.int64) + 1
    starts = np.cumsum(sizes) - sizes
    second = starts[1:]
    seq = np.where(second % seq_len == 0, -1, second // seq_len)
    return seq, int(-(-int(sizes.sum()) // seq_len))


def break_rate(adjacent: np.ndarray, threshold: float, lengths_in_order: np.ndarray, seq_len: int) -> tuple[float, int, int]:
    """(break rate, broken sequences, sequences): see the module docstring."""
    seq, total = pair_sequences(lengths_in_order, seq_len)
    broken = np.unique(seq[(adjacent < threshold) & (seq >= 0)])
    return (len(broken) / total if total else 0.0), len(broken), total


def chain_lengths(adjacent: np.ndarray, threshold: float) -> np.ndarray:
    """Lengths (in documents) of the maximal runs whose adjacent pairs are all related."""
    cuts = np.flatnonzero(adjacent < threshold)
    edges = np.concatenate([[-1], cuts, [len(adjacent)]])
    return np.diff(edges).astype(np.int64)


def hubness(neighbors: np.ndarray) -> dict:
    """Share of documents in no neighbour list, and the largest in-degree relative to k."""
    neighbors = np.asarray(neighbors)
    n, k = neighbors.shape
    degree = np.bincount(neighbors[neighbors >= 0], minlength=n)
    return {"orphan_share": float((degree == 0).mean()) if n else 0.0,
            "max_in_degree": int(degree.max(initial=0)), "k": int(k)}


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean": None}
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2])}


def adjacent_metrics(adjacent: np.ndarray, threshold: float, part_sizes: np.ndarray | None = None) -> dict:
    """The metrics that depend only on the similarities of adjacent documents.

    Args:
        adjacent: similarities of adjacent pairs; for an order made of parts packed apart
            (cells), the parts' arrays one after the other (no pair across a border).
        threshold: the break threshold.
        part_sizes: documents in each part (None: one part); chains end at part borders.

    Returns:
        {"adjacent_similarity", "unrelated_pair_share", "chain_length"}.
    """
    adjacent = np.asarray(adjacent, dtype=np.float32)
    if part_sizes is None:
        part_sizes = np.array([len(adjacent) + 1 if len(adjacent) else 0])
    chains, start = [], 0
    for size in np.asarray(part_sizes, dtype=np.int64):
        if size:
            chains.append(chain_lengths(adjacent[start: start + size - 1], threshold))
            start += size - 1
    chains = np.concatenate(chains) if chains else np.zeros(0, np.int64)
    return {
        "adjacent_similarity": _summary(adjacent),
        "unrelated_pair_share": float((adjacent < threshold).mean()) if len(adjacent) else 0.0,
        "chain_length": {**_summary(chains), "count": len(chains), "max": int(chains.max(initial=0)),
                         "single_document_share": float((chains == 1).mean()) if len(chains) else 0.0},
    }


def ordering_metrics(
    order: np.ndarray,
    embeddings: np.ndarray,
    *,
    token_lengths: np.ndarray | None = None,
    seq_len: int = 4096,
    window_docs: int = 8,
    neighbors: np.ndarray | None = None,
    knn_recall: float | None = None,
    threshold: float | None = None,
    seed: int = 0,
) -> dict:
    """All ordering metrics of the manifest, as a JSON-serialisable dict.

    Args:
        order: (N,) permutation of the documents.
        embeddings: (N, d) unit vectors.
        token_lengths: (N,) tokens per document (EOS excluded), indexed by document id;
            without them windows of `window_docs` documents stand in for sequences.
        seq_len: tokens per packed sequence.
        window_docs: documents per window when token lengths are unknown.
        neighbors: the kNN graph, for hubness.
        knn_recall: measured recall of that graph, recorded as is.
        threshold: break threshold; None = `break_threshold(embeddings)` (fixed seed).
        seed: seed of the random pairs behind the default threshold.

    Returns:
        {"documents", "adjacent_similarity", "break_threshold", "break_rule",
        "unrelated_pair_share", "break_rate", "broken_sequences", "sequences",
        "chain_length", "hubness", "knn_recall"}.
    """
    order = np.asarray(order, dtype=np.int64)
    n = len(embeddings)
    if order.shape != (n,) or (n and not np.array_equal(np.bincount(order, minlength=n), np.ones(n, np.int64))):
        raise LoryDataError(f"order must be a permutation of the {n} documents")
    if threshold is None:
        threshold = break_threshold(embeddings, seed=seed)
        rule = f"{BREAK_QUANTILE} quantile of random-pair cosine similarity (100000 pairs, seed {seed})"
    else:
        rule = "given"
    adjacent = adjacent_similarities(embeddings, order)
    if token_lengths is not None:
        lengths = np.asarray(token_lengths, dtype=np.int64)[order]
        unit = {"seq_len": int(seq_len)}
    else:  # a window of w documents = a sequence of w one-token documents
        lengths, seq_len = np.zeros(n, np.int64), window_docs
        unit = {"window_docs": int(window_docs)}
    rate, broken, sequences = break_rate(adjacent, threshold, lengths, seq_len)
    metrics = {
        "documents": int(n),
        "break_threshold": float(threshold),
        "break_rule": rule,
        "break_rate": float(rate),
        "broken_sequences": broken,
        "sequences": sequences,
        **unit,
        **adjacent_metrics(adjacent, threshold, np.array([n])),
    }
    if neighbors is not None:
        metrics["hubness"] = hubness(neighbors)
    if knn_recall is not None:
        metrics["knn_recall"] = float(knn_recall)
    return metrics


def same_domain_share(order: np.ndarray, domains) -> float:
    """Share of adjacent pairs along `order` whose two documents have the same domain.

    Args:
        order: (N,) document ids in order.
        domains: (N,) domain label of every document, indexed by document id.
    """
    labels = np.asarray(domains)[np.asarray(order, dtype=np.int64)]
    return float((labels[1:] == labels[:-1]).mean()) if len(labels) > 1 else 0.0


def nearest_same_domain_share(neighbors: np.ndarray, domains) -> float:
    """Share of documents whose nearest neighbour (column 0 of a kNN graph, best first) has
    their domain; a missing neighbour (-1) counts as another domain."""
    labels = np.asarray(domains)
    first = np.asarray(neighbors)[:, 0]
    return float(np.mean((first >= 0) & (labels[np.maximum(first, 0)] == labels))) if len(first) else 0.0


def random_same_domain_share(domains) -> float:
    """Expected same-domain share of adjacent pairs in a random order (draws without replacement)."""
    _, counts = np.unique(np.asarray(domains), return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


def domain_agreement(embeddings: np.ndarray, domains, knn_config: KnnConfig | None = None,
                     walk_config: WalkConfig | None = None, token_lengths: np.ndarray | None = None) -> dict:
    """How well an embedding keeps a labelled corpus's domains together, through lory's own
    kNN graph and similarity walk (`lorydata.partition.order_cell`).

    Args:
        embeddings: (N, d) document vectors.
        domains: (N,) domain labels.
        knn_config: the graph (default `KnnConfig()`).
        walk_config: the walk (default `WalkConfig()`).
        token_lengths: (N,) tokens per document, for the walk's token-aware layout.

    Returns:
        {"documents", "nearest_same_domain", "walk_same_domain", "random_same_domain"}.
    """
    if len(embeddings) != len(domains):
        raise LoryDataError(f"{len(embeddings)} embeddings but {len(domains)} domain labels")
    cell = order_cell(embeddings, knn_config or KnnConfig(), walk_config or WalkConfig(), token_lengths=token_lengths)
    return {"documents": len(embeddings),
            "nearest_same_domain": nearest_same_domain_share(cell.graph.neighbors, domains),
            "walk_same_domain": same_domain_share(cell.order, domains),
            "random_same_domain": random_same_domain_share(domains)}
