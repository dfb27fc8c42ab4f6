"""kNN graph: exact equals brute force, approximate indexes return true cosines, recall."""

import numpy as np
import pytest

from lorydata.errors import LoryDataError
from lorydata.knn import KnnConfig, KnnGraph, build_knn_graph, choose_index, default_nprobe, knn_recall


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, clusters, noise, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return _unit(centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)))


def test_exact_graph_equals_brute_force():
    x = _unit(np.random.default_rng(1).standard_normal((200, 16)))
    graph = build_knn_graph(x, KnnConfig(k=7))
    assert graph.index == "Flat" and graph.nprobe is None
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    assert graph.neighbors.dtype == np.int64 and graph.similarities.dtype == np.float32
    np.testing.assert_array_equal(graph.neighbors, expected)
    np.testing.assert_allclose(graph.similarities, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    assert knn_recall(x, graph.neighbors, sample=200) == 1.0


@pytest.mark.parametrize("index", ["IVF32,Flat", "IVF32,SQ8", "HNSW16", "IVF16,PQ8"])
def test_approximate_indexes_give_true_cosines_without_self(index):
    x = _clustered(3000, 32, clusters=20, noise=0.5)
    graph = build_knn_graph(x, KnnConfig(k=10, index=index, nprobe=8))
    ids = graph.neighbors
    rows = np.arange(len(x))[:, None]
    assert (ids >= 0).all() and not (ids == rows).any()
    assert all(len(set(row)) == 10 for row in ids[:200])
    true = np.einsum("nkd,nd->nk", x[ids], x)
    np.testing.assert_allclose(graph.similarities, true, atol=1e-4)  # re-scored exactly for SQ/PQ
    assert (np.diff(graph.similarities, axis=1) <= 1e-6).all()
    recall = knn_recall(x, ids, sample=300)
    assert recall > (0.5 if "PQ" in index else 0.9), recall


def test_random_graph_has_low_recall():
    x = _clustered(2000, 16, clusters=10, noise=0.3)
    fake = np.random.default_rng(0).integers(0, 2000, size=(2000, 10))
    assert knn_recall(x, fake, sample=200) < 0.05


def test_duplicates_tiny_corpora_and_unnormalised_input():
    x = _unit(np.random.default_rng(2).standard_normal((6, 8)))
    x = np.vstack([x, x[:1]])  # row 6 duplicates row 0
    graph = build_knn_graph(3.0 * x, KnnConfig(k=3))
    assert graph.neighbors[0, 0] == 6 and graph.neighbors[6, 0] == 0
    assert graph.similarities[0, 0] == pytest.approx(1.0, abs=1e-5)
    padded = build_knn_graph(x[:3], KnnConfig(k=5))
    assert padded.neighbors.shape == (3, 5)
    assert (padded.neighbors[:, 2:] == -1).all() and np.isneginf(padded.similarities[:, 2:]).all()
    assert build_knn_graph(x[:1], KnnConfig(k=2)).neighbors.tolist() == [[-1, -1]]


def test_save_and_load_roundtrip(tmp_path):
    x = _clustered(300, 8, clusters=5, noise=0.3)
    graph = build_knn_graph(x, KnnConfig(k=4))
    graph.save(tmp_path / "knn")
    loaded = KnnGraph.load(tmp_path / "knn")
    np.testing.assert_array_equal(loaded.neighbors, graph.neighbors)
    np.testing.assert_array_equal(loaded.similarities, graph.similarities)
    assert loaded.describe() == graph.describe()
    with pytest.raises(LoryDataError):
        KnnGraph.load(tmp_path / "missing")


def test_index_choice_by_size():
    assert choose_index(10_000, 384) == "Flat"
    assert choose_index(1_000_000, 384) == "IVF4096,Flat"
    assert choose_index(10_000_000, 384).endswith(",SQ8")
    assert choose_index(100_000_000, 384) == "IVF32768,PQ96"
    assert choose_index(100_000_000, 100).endswith(",PQ25")
    assert default_nprobe("IVF4096,Flat") == 64 and default_nprobe("IVF64,Flat") == 8
    assert default_nprobe("HNSW32") is None


@pytest.mark.parametrize(
    "x, config",
    [
        (np.zeros(5, np.float32), KnnConfig()),
        (np.array([[1.0, np.nan]], np.float32), KnnConfig()),
        (np.ones((10, 4), np.int64), KnnConfig()),
        (np.ones((10, 4), np.float32), KnnConfig(index="NotAnIndex")),
    ],
)
def test_bad_input_is_a_user_error(x, config):
    with pytest.raises(LoryDataError):
        build_knn_graph(x, config)


def test_bad_config_is_a_user_error():
    with pytest.raises(LoryDataError):
        KnnConfig(k=0)
    with pytest.raises(LoryDataError, match="device"):
        KnnConfig(device="gpu")


def test_cuda_without_gpu_faiss_is_a_user_error():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this faiss sees a GPU")
    x = _clustered(50, 4, clusters=2, noise=0.3)
    with pytest.raises(LoryDataError, match="cuda"):
        build_knn_graph(x, KnnConfig(device="cuda"))


def test_ivf_pq_skips_polysemous_training_that_search_never_uses():
    import faiss

    from lorydata.knn import _new_index

    index, _ = _new_index(64, "IVF16,PQ8", KnnConfig(index="IVF16,PQ8"), gpu=False)
    assert faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training is False
