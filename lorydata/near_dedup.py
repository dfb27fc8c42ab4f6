"""Near-duplicate removal: verified candidate pairs → groups → one document kept per group.

The blocks compose the same way in memory (`find_near_duplicates`) and in the Beam stage,
where the band keys route documents to bucket files and each bucket is verified on its own:

1. `bucket_pairs`: the members of one LSH bucket → pairs whose estimated Jaccard is at least
   the threshold (every pair in small buckets; against the bucket's group leaders in large
   ones, so a bucket of 100k templated pages costs O(members × groups), not O(members²)).
2. `group_duplicates`: connected components of the verified pairs (union-find), and in each
   one keeper: the longest document, ties broken by the smaller content hash, so the result
   depends on the documents only, never on arrival order or worker count.
3. `semantic_pairs`: the similarity-order variant: kNN graph edges at cosine ≥ COS that the
   pair's MinHash Jaccard confirms, so documents that merely embed alike (a shared licence
   header the embedder sees, different bodies) are never dropped. `semantic_duplicates`
   groups them (`group_duplicates`, same keeper rule) into the documents a walk leaves out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lorydata.minhash import MinHashConfig, MinHasher, estimated_jaccard, is_empty

# Buckets up to this size are verified pair by pair (one vectorised m × m comparison).
PAIRWISE_LIMIT = 256
# Default Jaccard that confirms a semantic (kNN) pair: half the shingles shared is more
# than a shared header or footer gives unless it is most of the text.
SEMANTIC_CONFIRM_JACCARD = 0.5


class DocRef(NamedTuple):
    """What dedup needs to know of a document besides its signature.

    Args:
        key: the content hash (unique after exact dedup; the tie-breaker).
        length: characters of the cleaned text (the longest copy is kept).
        id: the document id (named in dead letters).
    """

    key: str
    length: int
    id: str


@dataclass(frozen=True)
class NearDuplicate:
    """One dropped document and the one kept in its place.

    Args:
        dropped: the dropped document.
        kept: the keeper of its group.
        group_size: documents in the group, keeper included.
    """

    dropped: DocRef
    kept: DocRef
    group_size: int


def bucket_pairs(signatures: np.ndarray, threshold: float, pairwise_limit: int = PAIRWISE_LIMIT) -> list[tuple[int, int, float]]:
    """Verified near-duplicate pairs among the members of one LSH bucket.

    Args:
        signatures: (m, num_perm) uint32 signatures, in a deterministic member order.
        threshold: minimum estimated Jaccard of a kept pair.
        pairwise_limit: buckets larger than this compare each member with the group
            leaders found so far (the first member of each group, in member order) instead
            of with every other member.

    Returns:
        (i, j, estimated Jaccard) with i < j, indices into `signatures`.
    """
    m = len(signatures)
    if m < 2:
        return []
    if m <= pairwise_limit:
        agree = (signatures[:, None, :] == signatures[None, :, :]).mean(axis=2)
        i, j = np.nonzero(np.triu(agree >= threshold, k=1))
        return [(int(a), int(b), float(agree[a, b])) for a, b in zip(i, j, strict=True)]
    leaders: list[int] = [0]
    pairs = []
    for member in range(1, m):
        agree = (signatures[leaders] == signatures[member]).mean(axis=1)
        matched = np.nonzero(agree >= threshold)[0]
        if len(matched) == 0:
            leaders.append(member)
        for k in matched:
            pairs.append((leaders[k], member, float(agree[k])))
    return pairs


class UnionFind:
    """Disjoint sets over hashable keys, with path halving."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b) -> bool:
        """Join the sets of `a` and `b` (the smaller root stays); False when they were one."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def _keeper_order(ref: DocRef) -> tuple[int, str]:
    return (-ref.length, ref.key)


def group_duplicates(pairs: Iterable[tuple[DocRef, DocRef]]) -> list[NearDuplicate]:
    """One keeper per connected component of the verified pairs; everyone else is dropped.

    Args:
        pairs: verified near-duplicate pairs (any order, repeats allowed).

    Returns:
        The dropped documents, sorted by key, each with its group's keeper.
    """
    sets = UnionFind()
    refs: dict[str, DocRef] = {}
    for a, b in pairs:
        refs[a.key], refs[b.key] = a, b
        sets.union(a.key, b.key)
    groups: dict[str, list[DocRef]] = {}
    for key, ref in refs.items():
        groups.setdefault(sets.find(key), []).append(ref)
    dropped = []
    for members in groups.values():
        members.sort(key=_keeper_order)
        keeper = members[0]
        dropped.extend(NearDuplicate(ref, keeper, len(members)) for ref in members[1:])
    return sorted(dropped, key=lambda d: d.dropped.key)


def verified_pairs(refs: Sequence[DocRef], signatures: Sequence[np.ndarray | None], config: MinHashConfig,
                   pairwise_limit: int = PAIRWISE_LIMIT) -> list[tuple[DocRef, DocRef, float]]:
    """Every LSH candidate pair whose estimated Jaccard is at least `config.threshold`.

    Args:
        refs: the documents; keys must be unique.
        signatures: their signatures (None: a text without words, never paired).
        config: the parameters the signatures were made with.
        pairwise_limit: see `bucket_pairs`.

    Returns:
        (ref, ref, estimated Jaccard), each pair once.
    """
    hasher = MinHasher(config)
    buckets: dict[int, list[int]] = {}
    for i, signature in enumerate(signatures):
        if signature is not None:
            for key in hasher.band_keys(signature).tolist():
                buckets.setdefault(key, []).append(i)
    pairs: dict[tuple[str, str], tuple[DocRef, DocRef, float]] = {}
    for members in buckets.values():
        if len(members) > 1:
            members.sort(key=lambda i: refs[i].key)
            found = bucket_pairs(np.stack([signatures[m] for m in members]), config.threshold, pairwise_limit)
            for i, j, jaccard in found:
                a, b = refs[members[i]], refs[members[j]]
                pairs[(a.key, b.key)] = (a, b, jaccard)
    return list(pairs.values())


def find_near_duplicates(docs: Sequence[tuple[DocRef, str]], config: MinHashConfig = MinHashConfig(),
                         pairwise_limit: int = PAIRWISE_LIMIT) -> list[NearDuplicate]:
    """MinHash LSH near-dedup of documents held in memory (the Beam stage does the same with
    buckets in files).

    Args:
        docs: (reference, cleaned text) per document; keys must be unique.
        config: shingles, permutations, bands and threshold.
        pairwise_limit: see `bucket_pairs`.

    Returns:
        The documents to drop, each with the one kept in its place. Documents without any
        word are never near-duplicates (exact dedup handles identical ones).
    """
    hasher = MinHasher(config)
    refs = [ref for ref, _ in docs]
    signatures = [hasher.signature(text) for _, text in docs]
    return group_duplicates((a, b) for a, b, _ in verified_pairs(refs, signatures, config, pairwise_limit))


def edges_above(neighbors: np.ndarray, similarities: np.ndarray, cos: float) -> np.ndarray:
    """The distinct undirected kNN graph edges at cosine ≥ `cos`.

    Args:
        neighbors: (N, k) neighbour ids of a `KnnGraph` (-1 pads).
        similarities: (N, k) cosine similarities.
        cos: minimum cosine of an edge.

    Returns:
        (E, 2) int64 rows (i, j) with i < j, sorted, each edge once.
    """
    rows, cols = np.nonzero((similarities >= cos) & (neighbors >= 0))
    targets = neighbors[rows, cols]
    lo, hi = np.minimum(rows, targets), np.maximum(rows, targets)
    keep = lo != hi
    return np.unique(np.stack([lo[keep], hi[keep]], axis=1).astype(np.int64), axis=0)


def confirmed_pairs(edges: np.ndarray, signatures: np.ndarray,
                    confirm_jaccard: float = SEMANTIC_CONFIRM_JACCARD) -> list[tuple[int, int, float]]:
    """The edges whose documents' MinHash signatures confirm them.

    Args:
        edges: (E, 2) document pairs (`edges_above`).
        signatures: (N, num_perm) uint32 MinHash signatures (`MinHasher.signature_or_empty`).
        confirm_jaccard: minimum estimated Jaccard of the pair's signatures; an edge whose
            documents share less text (same boilerplate, different bodies) is not confirmed.

    Returns:
        (i, j, estimated Jaccard) of every confirmed edge, in the order of `edges`.
    """
    if len(edges) == 0:
        return []
    left, right = signatures[edges[:, 0]], signatures[edges[:, 1]]
    agree = (left == right).mean(axis=1)
    # A text without words has the empty signature: it never confirms a pair.
    confirmed = (agree >= confirm_jaccard) & ~is_empty(left) & ~is_empty(right)
    return [(int(i), int(j), float(a)) for (i, j), a in zip(edges[confirmed], agree[confirmed], strict=True)]


def semantic_pairs(neighbors: np.ndarray, similarities: np.ndarray, signatures: np.ndarray, cos: float,
                   confirm_jaccard: float = SEMANTIC_CONFIRM_JACCARD) -> list[tuple[int, int, float]]:
    """kNN graph edges that are semantic duplicates: cosine ≥ `cos` and MinHash-confirmed.

    Args:
        neighbors: (N, k) neighbour ids of a `KnnGraph` (-1 pads).
        similarities: (N, k) cosine similarities.
        signatures: (N, num_perm) uint32 MinHash signatures of the same documents
            (`MinHasher.signature_or_empty`).
        cos: minimum cosine of a duplicate edge.
        confirm_jaccard: see `confirmed_pairs`.

    Returns:
        (i, j, estimated Jaccard) with i < j, each pair once.
    """
    return confirmed_pairs(edges_above(neighbors, similarities, cos), signatures, confirm_jaccard)


@dataclass(frozen=True)
class SemanticDrop:
    """One document that semantic dedup leaves out of the walk.

    Args:
        index: its row in the graph.
        kept: the row of its group's keeper.
        group_size: documents in the group, keeper included.
        cosine: cosine similarity of its embedding and the keeper's.
        jaccard: estimated Jaccard of its signature and the keeper's.
    """

    index: int
    kept: int
    group_size: int
    cosine: float
    jaccard: float


@dataclass(frozen=True)
class SemanticDedup:
    """What semantic dedup found in one graph.

    Args:
        drops: the documents to leave out, by row.
        edges_above_cos: distinct graph edges (undirected) at cosine ≥ COS.
        confirmed_pairs: those whose MinHash Jaccard confirmed them.
        groups: connected components of the confirmed pairs (one keeper each).
    """

    drops: list[SemanticDrop]
    edges_above_cos: int
    confirmed_pairs: int
    groups: int

    def keep_mask(self, n: int) -> np.ndarray:
        """(n,) bool: False for the dropped rows."""
        keep = np.ones(n, bool)
        keep[[d.index for d in self.drops]] = False
        return keep


def semantic_duplicates(neighbors: np.ndarray, similarities: np.ndarray, signatures: np.ndarray,
                        refs: Sequence[DocRef], embeddings: np.ndarray, cos: float,
                        confirm_jaccard: float = SEMANTIC_CONFIRM_JACCARD) -> SemanticDedup:
    """The documents of a kNN graph to drop as semantic duplicates: `semantic_pairs`, then
    one keeper per connected component (`group_duplicates`: longest, then smaller key).

    Args:
        neighbors / similarities: the (N, k) graph (-1 pads).
        signatures: (N, num_perm) signatures (`MinHasher.signature_or_empty`).
        refs: (content hash, characters, id) of every row; keys unique.
        embeddings: (N, d) embeddings, for the cosine of each dropped document to its keeper.
        cos: minimum cosine of a duplicate edge.
        confirm_jaccard: minimum estimated Jaccard that confirms an edge.

    Returns:
        The drops (sorted by key, as `group_duplicates`) and the counts behind them.
    """
    edges = edges_above(neighbors, similarities, cos)
    pairs = confirmed_pairs(edges, signatures, confirm_jaccard)
    row_of = {ref.key: i for i, ref in enumerate(refs)}
    grouped = group_duplicates((refs[i], refs[j]) for i, j, _ in pairs)
    drops = []
    for d in grouped:
        i, k = row_of[d.dropped.key], row_of[d.kept.key]
        a, b = embeddings[i].astype(np.float64), embeddings[k].astype(np.float64)
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        drops.append(SemanticDrop(i, k, d.group_size, cosine, estimated_jaccard(signatures[i], signatures[k])))
    return SemanticDedup(drops, len(edges), len(pairs), len({d.kept for d in drops}))
