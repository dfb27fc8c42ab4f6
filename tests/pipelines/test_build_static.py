"""`build-corpus --order similarity` with static embedders: a StaticEmbedding folder, and
`static-bpe` over the build's own tokenizer, which embeds the token ids the documents stage
stored (no second tokenization). Both distilled for real from the bundled MiniLM, over tiny
vocabularies so each takes seconds."""

import numpy as np
import pytest

from lorydata.embed import Embedder, EmbedderConfig
from lorydata.manifest import Manifest
from lorydata.model_cache import CACHE_ENV
from pipelines.build_corpus import build_corpus
from pipelines.options import BuildOptions
from tests.lorydata.test_embed_static import MINILM, TINY_VOCAB, sample_texts, tiny_bpe  # noqa: F401 (fixtures)
from tests.pipelines.test_build_s3 import COMMON, cut, quiet  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def static_folder(tmp_path_factory):
    from lorydata import static_embed

    return static_embed.distill_static(MINILM, tmp_path_factory.mktemp("static") / "model", dims=8,
                                      remove_tokens=TINY_VOCAB, device="cpu")


def embeddings(out) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((out / "_work" / "embeddings").glob("b*.npy"))])


@pytest.mark.slow
def test_a_static_embedding_folder_builds_a_corpus(static_folder, cut, tmp_path):  # noqa: F811
    out = tmp_path / "corpus"
    summary = build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), embedder=str(static_folder), **COMMON),
                           log=quiet)
    manifest = Manifest.read(out / "train")
    assert manifest.embedder["dim"] == 8 and manifest.embedder["source"] == str(static_folder)
    assert manifest.num_rows > 0 and summary.stages["embeddings"]["status"] == "ran"
    x = embeddings(out)
    assert x.shape[1] == 8 and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    other = build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), overwrite=True, **COMMON), log=quiet)
    assert other.stages["embeddings"]["status"] == "ran", "another embedder never reuses the vectors"
    assert embeddings(out).shape[1] == 384


@pytest.mark.slow
def test_static_bpe_embeds_the_stored_token_ids(cut, tiny_bpe, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    texts_used = []
    real_encode = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, texts: texts_used.append(len(texts)) or real_encode(self, texts))
    out = tmp_path / "corpus"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), embedder="static-bpe", tokenizer=str(tiny_bpe),
                              **COMMON), log=quiet)
    assert texts_used == [], "static-bpe must embed the stored ids, not tokenize the texts again"
    import pyarrow.parquet as pq

    texts = [t for p in sorted((out / "_work" / "documents").glob("b*.parquet"))
             for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    config = EmbedderConfig(model="static-bpe", static_tokenizer=str(tiny_bpe), max_tokens=COMMON["embed_max_tokens"])
    expected = Embedder(config).encode(texts)
    np.testing.assert_allclose(embeddings(out), expected, atol=1e-5)
    assert Manifest.read(out / "train").embedder["tokenizer_sha256"] == Manifest.read(out / "train").tokenizer["sha256"]


@pytest.mark.slow
def test_workers_load_the_static_model_the_build_publishes(cut, tiny_bpe, dask_cluster, tmp_path,  # noqa: F811
                                                          monkeypatch):
    """On Dask the distilled model goes through the build folder: the workers' shards equal
    the in-process build's, and the copy is gone once the stage is done."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    common = {**COMMON, "embedder": "static-bpe", "tokenizer": str(tiny_bpe)}
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(tmp_path / "local"), **common), log=quiet)
    out = tmp_path / "dask"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), runner="dask",
                              beam_args=[f"--dask_client_address={dask_cluster.scheduler_address}"], **common),
                 log=quiet)
    for split in ("train", "heldout"):
        assert [s.sha256 for s in Manifest.read(out / split).shards] == \
            [s.sha256 for s in Manifest.read(tmp_path / "local" / split).shards]
    assert not (out / "_work" / "embeddings" / "model").exists()
