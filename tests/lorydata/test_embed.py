"""The real MiniLM embedder on a few dozen sample documents (kept short so the test is fast)."""

import json
import pickle

import numpy as np
import pytest

from lorydata.embed import Embedder, EmbedderConfig, embedding_dim
from lorydata.errors import LoryDataError
from tests.lorydata.shardkit import read_jsonl_zst

PER_DOMAIN = 6
CHARS = 1500


def _sample_docs(path, per_domain=PER_DOMAIN):
    docs, seen = [], {}
    for record in read_jsonl_zst(path):
        if seen.get(record["domain"], 0) < per_domain:
            seen[record["domain"]] = seen.get(record["domain"], 0) + 1
            docs.append(record)
    return docs


@pytest.fixture(scope="module")
def docs(sample_corpus):
    return _sample_docs(sample_corpus)


@pytest.fixture(scope="module")
def embedder():
    return Embedder(EmbedderConfig(max_tokens=128, batch_size=16))


def test_vectors_are_unit_float32_in_input_order(embedder, docs):
    texts = [d["text"][:CHARS] for d in docs[:5]]
    vectors = embedder.encode(texts)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reversed_vectors = embedder.encode(texts[::-1])
    np.testing.assert_allclose(reversed_vectors[::-1], vectors, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_within_domain_similarity_beats_across_domain(embedder, docs):
    vectors = embedder.encode([d["text"][:CHARS] for d in docs])
    domains = np.array([d["domain"] for d in docs])
    sims = vectors @ vectors.T
    same = domains[:, None] == domains[None, :]
    off_diagonal = ~np.eye(len(docs), dtype=bool)
    within = sims[same & off_diagonal].mean()
    across = sims[~same].mean()
    assert within > across + 0.1, (within, across)
    for domain in np.unique(domains):
        rows = domains == domain
        own = sims[np.ix_(rows, rows)][~np.eye(rows.sum(), dtype=bool)].mean()
        others = sims[np.ix_(rows, ~rows)].mean()
        assert own > others, (domain, own, others)


def test_chunk_mean_covers_the_whole_document(embedder, docs):
    bible = next(d["text"] for d in docs if d["domain"] == "bible")[:1200]
    git = next(d["text"] for d in docs if d["domain"] == "git")[:1200]
    chunked = Embedder(EmbedderConfig(max_tokens=128, long_documents="chunk-mean", max_chunks=8))
    git_vec = embedder.encode([git])[0]
    start_vec = embedder.encode([bible + "\n" + git])[0]
    mean_vec = chunked.encode([bible + "\n" + git])[0]
    assert abs(np.linalg.norm(mean_vec) - 1) < 1e-5
    # The start window sees only the Bible half; the chunk mean also sees the git half.
    assert mean_vec @ git_vec > start_vec @ git_vec + 0.1
    # A text that fits one window is embedded exactly as with "start".
    short = "A short note about git rebase."
    np.testing.assert_allclose(chunked.encode([short])[0], embedder.encode([short])[0], atol=1e-5)


def test_float16_output(docs):
    vectors = Embedder(EmbedderConfig(max_tokens=32, output_dtype="float16")).encode(["hello", "world"])
    assert vectors.dtype == np.float16 and vectors.shape == (2, 384)


def test_describe_is_cheap_stable_and_config_pickles():
    config = EmbedderConfig(max_tokens=128, long_documents="chunk-mean")
    identity = Embedder.describe(config)
    assert identity["model"] == "all-MiniLM-L6-v2" and identity["dim"] == 384
    assert identity["long_documents"] == "chunk-mean" and identity["max_tokens"] == 128
    assert len(identity["fingerprint"]) == 16 and identity == Embedder.describe(config)
    json.dumps(identity)
    assert pickle.loads(pickle.dumps(config)) == config
    assert embedding_dim() == 384


@pytest.mark.parametrize(
    "kwargs",
    [{"device": "tpu"}, {"long_documents": "end"}, {"batch_size": 0}, {"output_dtype": "int8"}, {"max_tokens": 2}],
)
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(LoryDataError):
        EmbedderConfig(**kwargs)


def test_missing_model_and_cpu_half_precision_are_user_errors(tmp_path):
    with pytest.raises(LoryDataError, match="cannot load embedding model"):
        Embedder(EmbedderConfig(model=str(tmp_path), device="cpu"))
    with pytest.raises(LoryDataError, match="needs a CUDA device"):
        Embedder(EmbedderConfig(device="cpu", precision="fp16"))
