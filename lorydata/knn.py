"""The kNN graph: for every document its k most similar others (cosine = inner product on
unit vectors), found with FAISS, self excluded, stored as two (N, k) .npy arrays.

Index choice by corpus size N (overridable with any FAISS factory string):

- N <= 50k: "Flat", exact search (N² d flops stay in seconds to tens of seconds on a CPU).
- N <= 2M: "IVF{nlist},Flat", vectors stored exactly, only the probed cells are scanned.
- N <= 20M: "IVF{nlist},SQ8", 4x smaller storage, candidates re-scored exactly.
- above: "IVF{nlist},PQ{m}", m = d/4 bytes per vector, `rerank` x k candidates re-scored exactly.

nlist is the power of two nearest 4·√N, nprobe defaults to nlist/64 (at least 8, at most
256). Every search goes through the plain `index.search` in query batches; the
"big batch search" path with residual PQ on inner product, which returned mostly wrong
neighbours in the In-Context Pretraining setup, is never used, and for lossy encodings
the returned similarities are always recomputed from the exact vectors, so the graph
holds true cosines. Measure quality with `knn_recall`.

On GPU, exact storage stays exact: vectors are kept in float32 (FAISS's `useFloat16` would
store a Flat index in fp16 and make "exact" search approximate); fp16 is used only for IVF-PQ
lookup tables, whose candidates are re-scored anyway. GPU search returns at most 2048
results per query and probes at most 2048 lists, so larger k or nprobe is a user error there
(re-score candidates are capped, with a warning). Each process keeps one set of FAISS GPU
resources per device and thread, reused by every graph it builds (e.g. one per cell of a
partitioned corpus).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lorydata.errors import LoryDataError

FLAT_MAX_DOCS = 50_000
IVF_FLAT_MAX_DOCS = 2_000_000
IVF_SQ_MAX_DOCS = 20_000_000
_EXACT_STORAGE = re.compile(r"(IVF\d+(_HNSW\d+)?,)?Flat|HNSW\d+(,Flat)?")
_DEVICES = ("auto", "cpu", "cuda")
# GPU FAISS selects at most this many results per query and probes at most this many IVF
# lists (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh); above it search raises.
GPU_MAX_K = 2048
_gpu_cache = threading.local()  # StandardGpuResources by device id, per thread (they are not thread-safe)


@dataclass
class KnnConfig:
    """How to build the kNN graph.

    Args:
        k: neighbours per document (self excluded).
        index: FAISS factory string (e.g. "Flat", "IVF4096,Flat", "HNSW32"); None = by size.
        nprobe: IVF cells probed per query; None = nlist/64 clipped to [8, 256].
        device: "auto" (FAISS GPU when the installed faiss has it and a GPU is visible),
            "cpu" or "cuda".
        query_batch: queries per `search` call (bounds temporary memory).
        rerank: for lossy encodings (SQ, PQ, PCA...), search rerank·k candidates and keep the
            k best by exact similarity.
        train_points_per_list: IVF training sample size per inverted list.
        normalize: L2-normalise input rows that are not unit length (cosine similarity).
        seed: seed of the training sample and the k-means of IVF training.
    """

    k: int = 20
    index: str | None = None
    nprobe: int | None = None
    device: str = "auto"
    query_batch: int = 65_536
    rerank: int = 2
    train_points_per_list: int = 64
    normalize: bool = True
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.k >= 1, f"k must be positive, got {self.k}"),
            (self.nprobe is None or self.nprobe >= 1, f"nprobe must be positive, got {self.nprobe}"),
            (self.device in _DEVICES, f"kNN device must be one of {_DEVICES}, got {self.device!r}"),
            (self.query_batch >= 1, f"query_batch must be positive, got {self.query_batch}"),
            (self.rerank >= 1, f"rerank must be at least 1, got {self.rerank}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoryDataError(message)


@dataclass
class KnnGraph:
    """Neighbours of every document, most similar first.

    Args:
        neighbors: (N, k) int64 document ids; -1 pads rows with fewer than k neighbours.
        similarities: (N, k) float32 cosine similarities; -inf where the id is -1.
        index: the FAISS factory string used.
        nprobe: IVF cells probed (None for non-IVF indexes).
        device: "cpu" or "cuda", where the search ran.
    """

    neighbors: np.ndarray
    similarities: np.ndarray
    index: str = "Flat"
    nprobe: int | None = None
    device: str = "cpu"

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]

    def describe(self) -> dict:
        """Index type, k, nprobe and device, for the manifest."""
        return {"index": self.index, "k": self.k, "nprobe": self.nprobe, "device": self.device,
                "metric": "inner_product", "documents": len(self.neighbors)}

    def save(self, folder: str | Path) -> None:
        """Write `neighbors.npy`, `similarities.npy` and `knn.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "neighbors.npy", self.neighbors)
        np.save(folder / "similarities.npy", self.similarities)
        (folder / "knn.json").write_text(json.dumps(self.describe(), indent=1))

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> KnnGraph:
        """Read a graph written by `save` (memory-mapped if `mmap`)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "knn.json").read_text())
            mode = "r" if mmap else None
            neighbors = np.load(folder / "neighbors.npy", mmap_mode=mode)
            similarities = np.load(folder / "similarities.npy", mmap_mode=mode)
        except (OSError, ValueError) as exc:
            raise LoryDataError(f"cannot read the kNN graph in {folder}: {exc}") from exc
        if neighbors.shape != similarities.shape:
            raise LoryDataError(f"kNN graph in {folder} is inconsistent: {neighbors.shape} vs {similarities.shape}")
        return cls(neighbors, similarities, meta.get("index", "?"), meta.get("nprobe"), meta.get("device", "cpu"))


def choose_index(n: int, d: int) -> str:
    """The FAISS factory string for `n` vectors of dimension `d` (see the module docstring)."""
    if n <= FLAT_MAX_DOCS:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    if n <= IVF_FLAT_MAX_DOCS:
        return f"IVF{nlist},Flat"
    if n <= IVF_SQ_MAX_DOCS:
        return f"IVF{nlist},SQ8"
    # PQ needs m | d; GPU IVF-PQ supports at most 96 bytes per vector.
    m = max(m for m in range(1, max(1, min(96, d // 4)) + 1) if d % m == 0)
    return f"IVF{nlist},PQ{m}"


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
    None keeps the choice by size of `choose_index`."""
    if requested is not None and n < training_points_needed(requested):
        return "Flat"
    return requested


def check_index_string(index: str | None, dim: int) -> None:
    """Raise `LoryDataError` for a FAISS factory string that cannot be built, before any
    vector exists (a build checks its `--index` before reading and embedding anything)."""
    if index is None:
        return
    import faiss

    try:
        faiss.index_factory(dim, index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # FAISS prefixes the reason with the C++ function and source line: keep the reason.
        reason = re.sub(r"^Error in .*? at \S+: ", "", str(exc).strip().splitlines()[-1])
        raise LoryDataError(f"bad --index {index!r}: {reason}") from None


def _nlist(index: str) -> int | None:
    match = re.search(r"IVF(\d+)", index)
    return int(match.group(1)) if match else None


def default_nprobe(index: str) -> int | None:
    """nlist/64 clipped to [8, 256] for IVF factory strings, None otherwise."""
    nlist = _nlist(index)
    if nlist is None:
        return None
    return min(nlist, max(8, min(256, nlist // 64)))


def as_unit_float32(x: np.ndarray, normalize: bool = True) -> np.ndarray:
    """`x` as a C-contiguous float32 (N, d) matrix with unit rows (copied only if needed)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise LoryDataError(f"embeddings must be a 2-D (N, d) matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise LoryDataError(f"embeddings must be floating point, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise LoryDataError("embeddings contain NaN or infinite values")
    if normalize and len(x):
        norms = np.linalg.norm(x, axis=1)
        if np.abs(norms[norms > 0] - 1).max(initial=0) > 1e-3:
            x = x / np.where(norms > 0, norms, 1)[:, None]
    return x


def use_faiss_gpu(device: str) -> bool:
    """Whether FAISS should run on GPU for `device` ("auto", "cpu", "cuda"); errors for an
    impossible "cuda"."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if device == "cuda" and gpus == 0:
        raise LoryDataError("kNN device 'cuda' requested but the installed faiss has no GPU support or sees no GPU")
    return device != "cpu" and gpus > 0


def _new_index(d: int, spec: str, config: KnnConfig, gpu: bool):
    """The empty index, on the GPUs when asked and possible; returns (index, device used)."""
    import faiss

    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise LoryDataError(f"bad FAISS index string {spec!r}: {str(exc).splitlines()[0]}") from exc
    with contextlib.suppress(RuntimeError):  # raised for non-IVF indexes
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = config.seed
        # IVF-PQ trains polysemous codes by default, which only polysemous search uses (we
        # never do): 50x the training time of the PQ itself (10 s vs 0.2 s on 3k vectors).
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    device = "cpu"
    if gpu:
        try:
            index = _to_all_gpus(index, spec)
            device = "cuda"
        except RuntimeError:
            pass  # e.g. HNSW has no GPU version: stay on CPU
    return index, device


def _fill(index, x: np.ndarray, spec: str, config: KnnConfig) -> None:
    """Train the index if it needs it (on a seeded sample), then add `x`."""
    if not index.is_trained:
        wanted = max(config.train_points_per_list * (_nlist(spec) or 0), 65_536)
        rng = np.random.default_rng(config.seed)
        sample = np.sort(rng.choice(len(x), min(len(x), wanted), replace=False))
        try:
            index.train(x[sample])
        except RuntimeError as exc:
            raise LoryDataError(f"cannot train FAISS index {spec!r} on {len(sample)} vectors: "
                                f"{str(exc).splitlines()[0]}") from exc
    index.add(x)


def gpu_resources(device_id: int):
    """This thread's FAISS `StandardGpuResources` for GPU `device_id`, created on first use and
    kept for the life of the process, so building many graphs (one per cell) does not allocate
    fresh scratch memory and cuBLAS handles on every GPU each time."""
    import faiss

    cache = _gpu_cache.__dict__.setdefault("resources", {})
    if device_id not in cache:
        cache[device_id] = faiss.StandardGpuResources()
    return cache[device_id]


def _to_all_gpus(index, spec: str):
    """`index` replicated on every visible GPU, with this thread's cached resources."""
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    # fp16 for IVF-PQ lookup tables only (GPU needs them above 48 bytes per vector; PQ
    # candidates are re-scored exactly); on a Flat index it would store the vectors in fp16
    options.useFloat16 = re.search(r"PQ\d", spec) is not None
    gpus = list(range(faiss.get_num_gpus()))
    return faiss.index_cpu_to_gpu_multiple_py([gpu_resources(g) for g in gpus], index, options, gpus)


def _gpu_search_width(k: int, n: int, k_search: int, nprobe: int | None) -> int:
    """`k_search` within what GPU FAISS can return: an error for k (of n documents) or nprobe
    above its limit, fewer re-score candidates (with a warning) when only those exceed it."""
    if min(n, k + 1) > GPU_MAX_K:
        raise LoryDataError(f"k={k} is above what FAISS GPU search returns ({GPU_MAX_K - 1} neighbours "
                            "plus self): use a smaller k or the CPU")
    if nprobe is not None and nprobe > GPU_MAX_K:
        raise LoryDataError(f"nprobe={nprobe} is above what FAISS GPU search probes ({GPU_MAX_K}): "
                            "use a smaller nprobe or the CPU")
    if k_search > GPU_MAX_K:
        warnings.warn(f"FAISS GPU search returns at most {GPU_MAX_K} results: re-scoring {GPU_MAX_K} "
                      f"candidates per document instead of {k_search}", stacklevel=3)
    return min(k_search, GPU_MAX_K)


def _set_search_params(index, spec: str, nprobe: int | None, k_search: int, device: str) -> None:
    import faiss

    space = faiss.GpuParameterSpace() if device == "cuda" else faiss.ParameterSpace()
    if nprobe is not None:
        space.set_index_parameter(index, "nprobe", nprobe)
    if "HNSW" in spec and device == "cpu":
        space.set_index_parameter(index, "efSearch", max(64, 2 * k_search))


def _drop_self(ids: np.ndarray, sims: np.ndarray, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row (or the last column when it is absent)."""
    is_self = ids == query_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    width = ids.shape[1] - 1
    return ids[keep].reshape(-1, width), sims[keep].reshape(-1, width)


def _rescore(x: np.ndarray, query_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact similarities of candidate ids, rows re-sorted best first (-1 ids last)."""
    sims = np.full(ids.shape, -np.inf, dtype=np.float32)
    step = max(1, (1 << 22) // max(1, ids.shape[1] * x.shape[1]))  # ~16 MB of gathered vectors per step
    for start in range(0, len(ids), step):
        block = ids[start: start + step]
        valid = block >= 0
        gathered = x[np.where(valid, block, 0)]
        exact = np.einsum("qkd,qd->qk", gathered, x[query_ids[start: start + step]])
        sims[start: start + step] = np.where(valid, exact, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def build_knn_graph(x: np.ndarray, config: KnnConfig | None = None) -> KnnGraph:
    """The k nearest neighbours (inner product) of every row of `x` among the other rows.

    Args:
        x: (N, d) embeddings, float16/32; rows are L2-normalised if they are not already.
        config: index choice, k, nprobe, device.

    Returns:
        A `KnnGraph` with (N, k) neighbours and similarities, self excluded, best first.
        Rows of corpora with N <= k are padded with -1 / -inf.
    """
    config = config or KnnConfig()
    x = as_unit_float32(x, config.normalize)
    n, d = x.shape
    spec = config.index or choose_index(n, d)
    k = config.k
    if n < 2:
        return KnnGraph(np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32), spec, None, "cpu")
    exact = _EXACT_STORAGE.fullmatch(spec) is not None
    k_search = min(n, (k if exact else config.rerank * k) + 1)
    nprobe = None
    if "IVF" in spec:  # probing more lists than exist probes them all
        nprobe = default_nprobe(spec) if config.nprobe is None else min(config.nprobe, _nlist(spec) or config.nprobe)
    index, device = _new_index(d, spec, config, use_faiss_gpu(config.device))
    if device == "cuda":  # checked before the vectors are added
        k_search = _gpu_search_width(k, n, k_search, nprobe)
    _fill(index, x, spec, config)
    _set_search_params(index, spec, nprobe, k_search, device)
    neighbors = np.full((n, k), -1, dtype=np.int64)
    similarities = np.full((n, k), -np.inf, dtype=np.float32)
    for start in range(0, n, config.query_batch):
        query_ids = np.arange(start, min(n, start + config.query_batch))
        sims, ids = index.search(x[query_ids], k_search)
        ids, sims = _drop_self(ids.astype(np.int64, copy=False), sims, query_ids)
        if not exact:
            ids, sims = _rescore(x, query_ids, ids)
        width = min(k, ids.shape[1])
        neighbors[query_ids, :width] = ids[:, :width]
        similarities[query_ids, :width] = np.where(ids[:, :width] >= 0, sims[:, :width], -np.inf)
    return KnnGraph(neighbors, similarities, spec, nprobe, device)


def exact_neighbors(x: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k neighbours (self excluded) of the rows `query_ids` among all rows of `x`.

    Args:
        x: (N, d) float32 unit vectors.
        query_ids: row ids to search for.
        k: neighbours wanted (at most N-1 are returned).

    Returns:
        (ids, sims), each (len(query_ids), min(k, N-1)), best first.
    """
    import faiss

    query_ids = np.asarray(query_ids, dtype=np.int64)
    sims, ids = faiss.knn(x[query_ids], x, min(len(x), k + 1), metric=faiss.METRIC_INNER_PRODUCT)
    ids, sims = _drop_self(ids.astype(np.int64), sims, query_ids)
    width = min(k, len(x) - 1)
    return ids[:, :width], sims[:, :width]


def knn_recall(x: np.ndarray, neighbors: np.ndarray, sample: int = 1000, seed: int = 0) -> float:
    """Recall@k of a kNN graph against exact search, on a random sample of queries.

    A returned neighbour counts as correct when its true similarity reaches the exact k-th
    neighbour's (minus 1e-5), so ties between equally similar documents are not misses.

    Args:
        x: the (N, d) embeddings the graph was built from.
        neighbors: (N, k) neighbour ids of the graph (-1 = missing, counted as a miss).
        sample: number of query documents.
        seed: seed of the query sample.

    Returns:
        Mean recall@k over the sampled queries, in [0, 1] (1.0 for N < 2).
    """
    x = as_unit_float32(x)
    neighbors = np.asarray(neighbors)
    n = len(x)
    if neighbors.ndim != 2 or len(neighbors) != n:
        raise LoryDataError(f"neighbours of shape {neighbors.shape} do not match {n} embeddings")
    width = min(neighbors.shape[1], n - 1)
    if width <= 0:
        return 1.0
    queries = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    _, exact_sims = exact_neighbors(x, queries, width)
    found = neighbors[queries, :width]
    valid = (found >= 0) & (found != queries[:, None])
    true_sims = np.einsum("qkd,qd->qk", x[np.where(valid, found, 0)], x[queries])
    hits = valid & (true_sims >= exact_sims[:, -1:] - 1e-5)
    return float(hits.sum(axis=1).mean() / width)


def compact_graph(graph: KnnGraph, keep: np.ndarray) -> KnnGraph:
    """The graph of the kept documents only, renumbered 0..n_kept-1.

    Rows of dropped documents go; in the other rows, entries pointing at dropped documents
    go and the rest move left in their order (still best first), padded with -1 / -inf.

    Args:
        graph: a graph of N documents.
        keep: (N,) bool, True for the documents that stay.
    """
    keep = np.asarray(keep, bool)
    new_id = np.full(len(keep), -1, np.int64)
    new_id[keep] = np.arange(int(keep.sum()))
    neighbors, similarities = graph.neighbors[keep], graph.similarities[keep]
    mapped = np.where(neighbors >= 0, new_id[np.maximum(neighbors, 0)], -1)
    shift = np.argsort(mapped < 0, axis=1, kind="stable")  # kept entries first, order unchanged
    mapped = np.take_along_axis(mapped, shift, axis=1)
    similarities = np.where(mapped >= 0, np.take_along_axis(similarities, shift, axis=1), -np.inf)
    return replace(graph, neighbors=mapped, similarities=similarities.astype(np.float32))
