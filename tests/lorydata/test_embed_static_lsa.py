"""The LSA static embedder (lorydata.lexical_embed): exact math against naive references,
ids and texts alike, determinism, bad input. Fitted on the bundled sample corpus with the
bundled tokenizer (a few hundred documents: seconds)."""

import io
import json
import pickle

import numpy as np
import pytest
import zstandard

from lorydata import lexical_embed
from lorydata.embed import Embedder, EmbedderConfig, fit_lsa_model
from lorydata.errors import LoryDataError
from lorydata.lexical_embed import embed_lsa, fit_lsa, fit_lsa_table, idf_weights
from lorydata.order_metrics import domain_agreement
from lorydata.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def sample_docs(sample_corpus):
    with open(sample_corpus, "rb") as raw:
        return [json.loads(line)
                for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")]


@pytest.fixture(scope="module")
def sample_ids(sample_docs):
    return Tokenizer().encode_batch([d["text"][:4000] for d in sample_docs])


@pytest.fixture(scope="module")
def lsa_folder(tmp_path_factory, sample_ids):
    """Fitted on every other sample document (the rest stay unseen)."""
    return fit_lsa(sample_ids[::2], tmp_path_factory.mktemp("lsa") / "model", dims=32)


def _naive_sublinear_tfidf(docs: list[list[int]], vocab: int, window: int) -> np.ndarray:
    """Dense (1 + log tf) * smoothed idf rows, one document at a time."""
    rows = np.zeros((len(docs), vocab))
    for i, ids in enumerate(docs):
        for token, count in zip(*np.unique(ids[:window], return_counts=True), strict=True):
            rows[i, token] = 1 + np.log(count)
    df = (rows > 0).sum(axis=0)
    idf = np.log((1 + len(docs)) / (1 + df)) + 1
    return rows * idf


def test_lsa_vector_is_the_sublinear_tf_weighted_sum_of_table_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 6)).astype(np.float32)
    docs = [rng.integers(0, 50, n) for n in (1, 7, 40, 300)] + [np.array([3, 3, 3, 9])]
    for window in (None, 5, 256):
        expected = []
        for ids in docs:
            tokens, counts = np.unique(ids[:window], return_counts=True)
            v = ((1 + np.log(counts))[:, None] * table[tokens].astype(np.float64)).sum(axis=0)
            expected.append(v / np.linalg.norm(v))
        np.testing.assert_allclose(embed_lsa(table, docs, window), np.array(expected), atol=1e-5)
    assert embed_lsa(table, [np.array([], dtype=np.int64)], 8).tolist() == [[0.0] * 6]  # no token: zero


def test_lsa_table_spans_the_top_singular_subspace_of_the_unit_tfidf_rows(sample_ids):
    docs, vocab, dims, window = sample_ids[:60], 8192, 8, 64
    table = fit_lsa_table(docs, vocab, dims=dims, window=window)
    assert table.shape == (vocab, dims) and table.dtype == np.float32
    reference = _naive_sublinear_tfidf(docs, vocab, window)
    unit_rows = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    singular, right = np.linalg.svd(unit_rows, full_matrices=False)[1:]  # exact SVD
    idf = idf_weights((reference > 0).sum(axis=0), len(docs))
    components = table / np.where(idf > 0, idf, 1)[:, None]  # table = idf * V
    np.testing.assert_allclose(components.T @ components, np.eye(dims), atol=1e-5)  # orthonormal columns
    # Eckart-Young: the columns span (nearly) the best rank-dims subspace of the unit rows;
    # the leading, well-separated directions are the exact singular vectors (up to sign).
    captured = np.sum((unit_rows @ components) ** 2)
    assert captured >= 0.995 * np.sum(singular[:dims] ** 2) and captured <= np.sum(singular[:dims] ** 2) + 1e-6
    np.testing.assert_allclose(np.abs(components[:, :3]), np.abs(right[:3].T), atol=5e-4)
    # Documents' vectors: their TF-IDF rows projected on those directions, unit length.
    projected = reference @ components
    np.testing.assert_allclose(embed_lsa(table, docs, window),
                               projected / np.linalg.norm(projected, axis=1, keepdims=True), atol=1e-5)


def test_lsa_table_of_a_low_rank_sample_keeps_its_size():
    table = fit_lsa_table([np.array([5, 6, 6]), np.array([6, 7]), np.array([5, 7, 7, 7])], 10, dims=16, window=None)
    assert table.shape == (10, 16)
    assert np.count_nonzero(np.abs(table).sum(axis=0)) <= 2  # rank <= documents - 1
    assert not table[[0, 1, 2, 3, 4, 8, 9]].any()  # tokens never seen: zero rows


def test_lsa_folder_embeds_ids_and_texts_alike_and_deterministically(lsa_folder, sample_docs, sample_ids, tmp_path):
    texts = [d["text"][:4000] for d in sample_docs[1:40:2]]
    ids = [np.asarray(i, dtype=np.int32) for i in sample_ids[1:40:2]]
    embedder = Embedder(EmbedderConfig(model=str(lsa_folder)))
    bpe = Tokenizer()
    assert embedder.static and embedder.lexical and embedder.dim == 32 and embedder.window == 256
    assert embedder.tokenizer_sha256 == bpe.sha256
    from_ids = embedder.encode_ids(ids)
    assert from_ids.shape == (20, 32) and from_ids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_ids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.encode(texts), from_ids)
    np.testing.assert_array_equal(Embedder(EmbedderConfig(model=str(lsa_folder))).encode_ids(ids[::-1])[::-1], from_ids)
    # EOS / pad rows are zero: appending them changes nothing.
    np.testing.assert_array_equal(embedder.encode_ids([np.append(ids[0][:10], [bpe.eos_id, bpe.pad_id])]),
                                  embedder.encode_ids([ids[0][:10]]))
    # The same documents fit the same table, bit for bit.
    again = fit_lsa(sample_ids[::2], tmp_path / "again", dims=32)
    assert (again / lexical_embed.TABLE_FILE).read_bytes() == (lsa_folder / lexical_embed.TABLE_FILE).read_bytes()
    identity = Embedder.describe(EmbedderConfig(model=str(lsa_folder)))
    assert identity["dim"] == 32 and identity["max_tokens"] == 256 and identity["tokenizer_sha256"] == bpe.sha256
    assert Embedder.describe(EmbedderConfig(model=str(again)))["fingerprint"] == identity["fingerprint"]
    other = fit_lsa(sample_ids[1::2], tmp_path / "other", dims=32)
    assert Embedder.describe(EmbedderConfig(model=str(other)))["fingerprint"] != identity["fingerprint"]
    assert Embedder.describe(EmbedderConfig(model=str(lsa_folder), long_documents="whole"))["max_tokens"] is None
    whole = Embedder(EmbedderConfig(model=str(lsa_folder), long_documents="whole"))
    np.testing.assert_allclose(whole.encode_ids(ids[:3]), embed_lsa(embedder.model.table, ids[:3], None), atol=1e-6)
    config = EmbedderConfig(model=str(lsa_folder), max_tokens=64)
    assert pickle.loads(pickle.dumps(config)) == config and Embedder(config).window == 64


def test_lsa_keeps_the_sample_domains_together(lsa_folder, sample_docs, sample_ids):
    unseen = slice(1, None, 2)
    vectors = Embedder(EmbedderConfig(model=str(lsa_folder))).encode_ids(sample_ids[unseen])
    quality = domain_agreement(vectors, [d["domain"] for d in sample_docs[unseen]])
    assert quality["nearest_same_domain"] > 0.9 and quality["walk_same_domain"] > 0.85
    assert quality["random_same_domain"] < 0.25


def test_lsa_user_errors(lsa_folder, tmp_path):
    embedder = Embedder(EmbedderConfig(model=str(lsa_folder)))
    with pytest.raises(LoryDataError, match="token ids must lie in"):
        embedder.encode_ids([np.array([0, 10**6])])
    with pytest.raises(LoryDataError, match="runs on CPU"):
        Embedder(EmbedderConfig(model=str(lsa_folder), device="cuda"))
    with pytest.raises(LoryDataError, match="backend is for transformer models"):
        Embedder(EmbedderConfig(model=str(lsa_folder), backend="onnx"))
    with pytest.raises(LoryDataError, match="at least 2 documents"):
        fit_lsa_table([np.array([3, 4]), np.array([], dtype=np.int64)], 10)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in lsa_folder.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    table = np.load(damaged / lexical_embed.TABLE_FILE)
    table[5] += 1
    np.save(damaged / lexical_embed.TABLE_FILE, table)
    with pytest.raises(LoryDataError, match="does not match its recorded sha256"):
        Embedder(EmbedderConfig(model=str(damaged)))


def test_model_lsa_is_fitted_on_the_documents_then_loads(sample_ids, tmp_path):
    config = EmbedderConfig(model="lsa", static_dims=24, max_tokens=128)
    planned = Embedder.describe(config)
    assert planned["model"] == "lsa" and planned["dim"] == 24 and planned["max_tokens"] == 128
    assert planned["tokenizer_sha256"] == Tokenizer().sha256
    assert Embedder.describe(EmbedderConfig(model="lsa", static_dims=16))["fingerprint"] != planned["fingerprint"]
    with pytest.raises(LoryDataError, match="fitted on the documents it embeds"):
        Embedder(config)
    fitted = fit_lsa_model(config, sample_ids[:100], tmp_path / "lsa")
    assert fitted.model == str((tmp_path / "lsa").resolve()) and fitted.max_tokens == 128
    embedder = Embedder(fitted)
    assert embedder.lexical and embedder.dim == 24 and embedder.window == 128
    assert lexical_embed.lsa_info(tmp_path / "lsa")["window"] == 128
    assert Embedder.describe(fitted)["dim"] == 24
    np.testing.assert_allclose(embedder.encode_ids(sample_ids[100:103]),
                               embed_lsa(embedder.model.table, sample_ids[100:103], 128), atol=1e-6)
    with pytest.raises(LoryDataError, match="fits model 'lsa'"):
        fit_lsa_model(EmbedderConfig(model="static"), sample_ids[:10], tmp_path / "x")


def test_encode_ids_equals_an_explicit_loop_over_tokens(lsa_folder, sample_ids):
    embedder = Embedder(EmbedderConfig(model=str(lsa_folder), max_tokens=100))
    table = np.load(lsa_folder / lexical_embed.TABLE_FILE).astype(np.float64)
    docs = sample_ids[1:30:3]
    expected = []
    for ids in docs:
        counts = {}
        for token in ids[:100]:
            counts[int(token)] = counts.get(int(token), 0) + 1
        v = np.zeros(table.shape[1])
        for token, count in counts.items():
            v += (1 + np.log(count)) * table[token]
        expected.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(embedder.encode_ids(docs), np.array(expected), atol=1e-5)


def test_fitting_without_scikit_learn_is_one_clear_error(sample_ids, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)  # as if scikit-learn were not installed
    with pytest.raises(LoryDataError, match=r"needs scikit-learn: install the static extra"):
        fit_lsa_table(sample_ids[:10], 8192, dims=4)
    with pytest.raises(LoryDataError, match=r"needs scikit-learn"):
        Embedder.describe(EmbedderConfig(model="lsa"))  # what build-corpus checks before its first stage
