"""CUDA checks of the data side (skipped without CUDA; `-m gpu` runs them on a GPU machine):
faiss-gpu kNN against exact CPU search, fp16 MiniLM embeddings on CUDA against fp32 on CPU."""

import numpy as np
import pytest

from lorydata.embed import Embedder, EmbedderConfig
from lorydata.knn import KnnConfig, build_knn_graph, knn_recall
from tests.lorydata.test_embed import CHARS, _sample_docs

pytestmark = pytest.mark.gpu


def _needs_faiss_gpu():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("the installed faiss has no GPU support (install faiss-gpu)")


def _clustered(n, d, clusters, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((clusters, d))[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_faiss_gpu_exact_graph_equals_cpu_and_ivf_recall():
    _needs_faiss_gpu()
    x = _clustered(20_000, 64, clusters=50, noise=0.4)
    gpu = build_knn_graph(x, KnnConfig(k=20, device="cuda"))
    cpu = build_knn_graph(x, KnnConfig(k=20, device="cpu"))
    assert gpu.device == "cuda" and gpu.index == "Flat"
    assert knn_recall(x, gpu.neighbors, sample=2000) == 1.0
    true = np.einsum("nkd,nd->nk", x[gpu.neighbors], x)
    np.testing.assert_allclose(gpu.similarities, true, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gpu.similarities, cpu.similarities, rtol=0, atol=1e-5)
    ivf = build_knn_graph(x, KnnConfig(k=20, index="IVF256,Flat", nprobe=32, device="cuda"))
    assert ivf.device == "cuda" and knn_recall(x, ivf.neighbors, sample=2000) > 0.9
    np.testing.assert_allclose(ivf.similarities, np.einsum("nkd,nd->nk", x[ivf.neighbors], x), rtol=0, atol=1e-5)


def test_fp16_embeddings_on_cuda_match_fp32_on_cpu(sample_corpus):
    texts = [d["text"][:CHARS] for d in _sample_docs(sample_corpus, per_domain=4)]
    cuda = Embedder(EmbedderConfig(device="cuda", precision="fp16", max_tokens=128)).encode(texts)
    cpu = Embedder(EmbedderConfig(device="cpu", precision="fp32", max_tokens=128)).encode(texts)
    cosine = (cuda * cpu).sum(axis=1) / np.linalg.norm(cuda, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
