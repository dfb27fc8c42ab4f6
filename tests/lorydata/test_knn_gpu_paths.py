"""The GPU branch of the kNN graph, run on CPU against an emulation of faiss's GPU API:
exact search stays exact, GPU limits on k and nprobe are user errors, and GPU resources are
created once per device however many graphs a process builds."""

import faiss
import numpy as np
import pytest

from lorydata import knn
from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, build_knn_graph


class FakeGpuFaiss:
    """The parts of faiss's GPU API that lorydata.knn may call, on CPU.

    Cloning follows faiss/gpu/GpuCloner.cpp where it matters for results: a Flat index cloned
    with `useFloat16` keeps its vectors in fp16 (GpuIndexFlat's fp16 storage is the CPU's
    `IndexScalarQuantizer(QT_fp16)`); other indexes keep their encoding. `index_cpu_to_all_gpus`
    creates fresh resources per GPU, as faiss's Python helper does.
    """

    def __init__(self, monkeypatch, gpus: int = 2):
        self.resources, self.gpus = [], gpus
        fake = self

        class StandardGpuResources:
            def __init__(self):
                fake.resources.append(self)

        class GpuMultipleClonerOptions:
            useFloat16 = False

        def to_gpus(resources, index, co=None, gpus=None):
            assert len(resources) == fake.gpus and all(isinstance(r, StandardGpuResources) for r in resources)
            if isinstance(index, faiss.IndexFlat) and co is not None and co.useFloat16:
                return faiss.IndexScalarQuantizer(index.d, faiss.ScalarQuantizer.QT_fp16, index.metric_type)
            return faiss.clone_index(index)

        def to_all_gpus(index, co=None, ngpu=-1):
            return to_gpus([StandardGpuResources() for _ in range(fake.gpus)], index, co)

        for name, value in [("StandardGpuResources", StandardGpuResources), ("get_num_gpus", lambda: fake.gpus),
                            ("GpuMultipleClonerOptions", GpuMultipleClonerOptions),
                            ("GpuParameterSpace", faiss.ParameterSpace), ("index_cpu_to_gpu_multiple_py", to_gpus),
                            ("index_cpu_to_all_gpus", to_all_gpus)]:
            monkeypatch.setattr(faiss, name, value, raising=False)
        # a fresh per-thread resource cache, so other tests' fakes are not reused
        monkeypatch.setattr(knn, "_gpu_cache", type("Cache", (), {})(), raising=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    return FakeGpuFaiss(monkeypatch)


def _close_pairs(n=1500, d=32, seed=0):
    """Unit vectors in near-duplicate pairs: neighbour ranks hinge on the 4th decimal of the
    similarities, where fp16 storage errs."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n // 2, d))
    x = np.concatenate([base, base + 0.01 * rng.standard_normal(base.shape)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_on_gpu_is_exact(fake_gpu):
    x = _close_pairs()
    graph = build_knn_graph(x, KnnConfig(k=8, device="cuda"))
    assert graph.device == "cuda" and graph.index == "Flat"
    cpu = build_knn_graph(x, KnnConfig(k=8, device="cpu"))
    np.testing.assert_array_equal(graph.neighbors, cpu.neighbors)
    true = np.einsum("nkd,nd->nk", x[graph.neighbors], x)
    np.testing.assert_allclose(graph.similarities, true, rtol=0, atol=2e-6)


def test_lossy_gpu_index_is_rescored_to_true_cosines(fake_gpu):
    x = _close_pairs()
    graph = build_knn_graph(x, KnnConfig(k=8, index="IVF8,SQ8", nprobe=8, device="cuda"))
    assert graph.device == "cuda"
    true = np.einsum("nkd,nd->nk", x[graph.neighbors], x)
    np.testing.assert_allclose(graph.similarities, true, rtol=0, atol=2e-6)


def test_gpu_limits_on_k_and_nprobe_are_user_errors(fake_gpu):
    x = _close_pairs(n=2200, d=8)
    with pytest.raises(LoryDataError, match=r"k=2048 .*GPU"):
        build_knn_graph(x, KnnConfig(k=2048, device="cuda"))
    with pytest.raises(LoryDataError, match=r"nprobe=3000 .*GPU"):
        build_knn_graph(x, KnnConfig(k=10, index="IVF4096,Flat", nprobe=3000, device="cuda"))
    # only the re-score candidates (rerank x k) exceed the limit: fewer of them, with a warning
    with pytest.warns(UserWarning, match="2048"):
        graph = build_knn_graph(x, KnnConfig(k=1100, index="IVF16,SQ8", nprobe=16, device="cuda"))
    assert (graph.neighbors >= 0).all()
    # the CPU has no such limit
    assert build_knn_graph(x[:300], KnnConfig(k=10, index="IVF16,Flat", nprobe=3000, device="cpu")).nprobe == 16


def test_gpu_resources_are_made_once_per_device(fake_gpu):
    x = _close_pairs(n=200, d=8)
    for cell in range(3):  # e.g. the cells of a partitioned corpus, one worker process
        build_knn_graph(x[cell * 50: cell * 50 + 80], KnnConfig(k=4, device="cuda"))
    assert len(fake_gpu.resources) == fake_gpu.gpus
