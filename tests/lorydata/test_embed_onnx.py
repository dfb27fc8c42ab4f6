"""The ONNX Runtime backend against torch, on the real MiniLM (export cached in a temporary folder)."""

import itertools

import numpy as np
import pytest

from lorydata.embed import Embedder, EmbedderConfig
from lorydata.errors import LoryDataError
from tests.lorydata.shardkit import read_jsonl_zst


@pytest.fixture(scope="module")
def texts(sample_corpus):
    """Ten sample documents of every length class: short, cut at the window, padded batches."""
    docs = [record["text"] for record in itertools.islice(read_jsonl_zst(sample_corpus), 8)]
    return [*docs, "hello", "git rebase --onto main feature"]


@pytest.fixture(scope="module")
def torch_vectors(texts):
    return Embedder(EmbedderConfig(device="cpu", max_tokens=128, batch_size=4)).encode(texts)


def test_onnx_vectors_equal_torch_vectors(model_cache_dir, texts, torch_vectors):
    onnx = Embedder(EmbedderConfig(backend="onnx", max_tokens=128, batch_size=4))
    assert onnx.window == 128 and onnx.precision == "fp32" and onnx.dim == 384
    vectors = onnx.encode(texts)
    assert vectors.shape == torch_vectors.shape and vectors.dtype == np.float32
    assert np.min(np.sum(vectors * torch_vectors, axis=1)) >= 0.999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # chunk-mean runs its windows through the same backend
    chunked = Embedder(EmbedderConfig(backend="onnx", max_tokens=32, long_documents="chunk-mean"))
    reference = Embedder(EmbedderConfig(device="cpu", max_tokens=32, long_documents="chunk-mean"))
    assert np.min(np.sum(chunked.encode(texts[:3]) * reference.encode(texts[:3]), axis=1)) >= 0.999


def test_int8_stays_close_to_torch(model_cache_dir, texts, torch_vectors):
    vectors = Embedder(EmbedderConfig(backend="onnx-int8", max_tokens=128)).encode(texts)
    assert np.min(np.sum(vectors * torch_vectors, axis=1)) >= 0.98


def test_export_is_cached_and_identity_names_the_backend(model_cache_dir):
    def describe_all():
        return {b: Embedder.describe(EmbedderConfig(backend=b)) for b in ("torch", "onnx", "onnx-int8")}

    def entries():
        return sorted((p.name, p.stat().st_mtime_ns) for p in (model_cache_dir / "onnx").iterdir() if not p.name.startswith("."))

    identities = describe_all()
    made = entries()
    assert len(made) == 2  # the fp32 export and its int8 quantisation
    assert describe_all() == identities and entries() == made  # found again, not re-exported
    assert {i["backend"] for i in identities.values()} == {"torch", "onnx", "onnx-int8"}
    assert len({i["fingerprint"] for i in identities.values()}) == 3
    assert {i["dim"] for i in identities.values()} == {384}


@pytest.mark.parametrize("kwargs", [{"backend": "tensorrt"}, {"backend": "onnx", "device": "cuda"},
                                    {"backend": "onnx", "precision": "fp16"}])
def test_bad_backend_options_are_user_errors(kwargs):
    with pytest.raises(LoryDataError):
        EmbedderConfig(**kwargs)
