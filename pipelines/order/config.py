"""What the order stage is told: `OrderConfig` (and its semantic dedup part)."""

from __future__ import annotations

from dataclasses import dataclass

from lorydata.knn import KnnConfig, index_for
from lorydata.minhash import MinHashConfig
from lorydata.walk import WalkConfig


@dataclass(frozen=True)
class SemanticDedupConfig:
    """`--semantic-dedup`: drop kNN neighbours that the text confirms as copies.

    Args:
        cos: minimum cosine of a duplicate edge.
        confirm_jaccard: estimated MinHash Jaccard that confirms a pair.
        minhash: the MinHash parameters of the signatures (near-dedup's).
    """

    cos: float
    confirm_jaccard: float
    minhash: MinHashConfig


@dataclass(frozen=True)
class OrderConfig:
    """The document order of a split.

    Args:
        method: "similarity" (kNN graph + walk) or "random" (seeded hash keys).
        seed: seed of the random order, k-means, the walk and the recall sample.
        seq_len: tokens per packed sequence (the walk lays chains out by it).
        k: neighbours per document in the kNN graph.
        index: FAISS factory string, or None to choose by size.
        nprobe: IVF cells searched (None: the index's default rule).
        device: "auto", "cpu" or "cuda" for FAISS.
        partitions: 1 = one global walk; P > 1 = k-means cells walked in parallel.
        semantic: semantic dedup on the kNN graph, or None.
    """

    method: str
    seed: int
    seq_len: int
    k: int = 20
    index: str | None = None
    nprobe: int | None = None
    device: str = "auto"
    partitions: int = 1
    semantic: SemanticDedupConfig | None = None

    def knn_config(self, n: int | None = None) -> KnnConfig:
        """kNN options for a graph of `n` documents (an explicit index too large to train on
        them falls back to exact search); `n` None keeps the requested index as given."""
        index = self.index if n is None else index_for(self.index, n)
        return KnnConfig(k=self.k, index=index, nprobe=self.nprobe, device=self.device, seed=self.seed)

    def walk_config(self) -> WalkConfig:
        # Token-aware layout: chains start near sequence boundaries (see lorydata.walk).
        return WalkConfig(seq_len=self.seq_len, seed=self.seed)


def partitions_for(requested: int, n: int, k: int) -> int:
    """Cells actually used: at most one per 2(k+1) documents, so every cell can hold a
    graph of k real neighbours and a walk worth the name (small splits get one cell)."""
    return max(1, min(requested, n // (2 * (k + 1))))
