"""`build-corpus --embedder lsa`: the embeddings stage fits LSA (`lorydata.lexical_embed`) once,
in the driver, on a bounded sample of the train split's stored token ids, publishes the fit in
its folder and embeds the stored ids with it. Fitted for real on a cut of the bundled sample
(100 documents: seconds per build)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lorydata import lexical_embed
from lorydata.embed import Embedder, EmbedderConfig, fit_lsa_model
from lorydata.errors import LoryDataError
from lorydata.manifest import Manifest
from lorydata.tokenizer import Tokenizer
from pipelines import embed as embed_stage
from pipelines.build_corpus import build_corpus
from pipelines.options import BuildOptions
from pipelines.runner.beam import BeamRunner
from tests.pipelines.test_build_s3 import COMMON, cut, local_hashes, quiet, s3_hashes  # noqa: F401 (fixture)

LSA = {**COMMON, "embedder": "lsa", "buckets": 3}  # several documents files to sample from


def documents_files(out) -> list[str]:
    return [str(p) for p in sorted((out / "_work" / "documents").glob("b*.parquet"))]


def embeddings(out) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((out / "_work" / "embeddings").glob("b*.npy"))])


@pytest.fixture(scope="module")
def built(cut, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lsa") / "corpus"
    summary = build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), **LSA), log=quiet)
    return out, summary


def test_the_fit_sample_is_bounded_train_only_and_spread_over_the_files(built):
    out, _ = built
    files = documents_files(out)
    assert len(files) >= 2
    rows = [pq.read_table(p, columns=["split", "tokens"]).to_pylist() for p in files]
    # Naive reference: the first `share` train rows of every file, cut at the window.
    for budget, window in ((7, 5), (1000, None), (len(files), 64)):
        share = -(-budget // len(files))
        expected = [r["tokens"][:window] for file_rows in rows
                    for r in [r for r in file_rows if r["split"] == "train"][:share]][:budget]
        sample = embed_stage.lsa_fit_sample(files, window, max_documents=budget)
        assert [s.tolist() for s in sample] == expected
        assert all(s.dtype == np.int32 for s in sample)
    assert len(embed_stage.lsa_fit_sample(files, None, max_documents=7)) == 7
    heldout = sum(r["split"] == "heldout" for file_rows in rows for r in file_rows)
    assert heldout > 0 and len(embed_stage.lsa_fit_sample(files, None)) == sum(map(len, rows)) - heldout


@pytest.mark.slow
def test_lsa_build_embeds_the_stored_ids_with_the_fit_it_records(built, cut, tmp_path):  # noqa: F811
    out, summary = built
    assert summary.stages["embeddings"]["status"] == "ran" and summary.splits["train"]["shards"] > 0
    manifest = Manifest.read(out / "train")
    assert manifest.num_rows > 0 and manifest.shards
    assert manifest.embedder["model"] == "lsa" and manifest.embedder["backend"] == "torch"
    assert manifest.embedder["dim"] == lexical_embed.DEFAULT_LSA_DIMS
    assert manifest.embedder["tokenizer_sha256"] == manifest.tokenizer["sha256"]
    assert manifest.embedder["max_tokens"] == COMMON["embed_max_tokens"]
    train_documents = summary.splits["train"]["documents"]
    assert manifest.embedder["fit_documents"] == train_documents
    assert manifest.embedder["source"] == f"fitted by the embeddings stage on {train_documents} train documents"
    assert not (out / "_work" / "embeddings" / "model").exists(), "the published fit is scratch of the stage"
    # The same fit, made here from the same sample: the recorded fingerprint is that of its bits.
    files = documents_files(out)
    config = EmbedderConfig(model="lsa", max_tokens=COMMON["embed_max_tokens"], static_tokenizer=str(Tokenizer().path))
    fitted = fit_lsa_model(config, embed_stage.lsa_fit_sample(files, COMMON["embed_max_tokens"]), tmp_path / "fit")
    assert Embedder.describe(fitted)["fingerprint"] == manifest.embedder["fingerprint"]
    # Every document's vector: the fitted table over its stored ids (the first max_tokens).
    table = np.load(tmp_path / "fit" / lexical_embed.TABLE_FILE)
    ids = [t for p in files for t in pq.read_table(p, columns=["tokens"]).column("tokens").to_pylist()]
    np.testing.assert_allclose(embeddings(out), lexical_embed.embed_lsa(table, ids, COMMON["embed_max_tokens"]),
                               atol=1e-6)
    # The fitted folder as --embedder PATH: the same vectors, so the same shards.
    again = tmp_path / "by-path"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(again), **{**LSA, "embedder": fitted.model}), log=quiet)
    assert local_hashes(again) == local_hashes(out)
    assert Manifest.read(again / "train").embedder["fingerprint"] == manifest.embedder["fingerprint"]


@pytest.mark.slow
def test_a_rerun_skips_and_a_resumed_stage_reuses_its_fit(cut, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "corpus"
    fits = []
    real_fit = embed_stage.fit_lsa_model
    monkeypatch.setattr(embed_stage, "fit_lsa_model", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    real_run_each = BeamRunner.run_each

    def killed_at_embed(self, folder, step, *args, **kwargs):
        if step == "Embed":
            raise KeyboardInterrupt("killed after the fit")
        return real_run_each(self, folder, step, *args, **kwargs)

    monkeypatch.setattr(BeamRunner, "run_each", killed_at_embed)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), **LSA), log=quiet)
    model = out / "_work" / "embeddings" / "model"
    committed = {p.name: p.read_bytes() for p in model.iterdir()}
    assert fits == [1] and lexical_embed.INFO_FILE in committed
    monkeypatch.setattr(BeamRunner, "run_each", real_run_each)
    resumed = build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), **LSA), log=quiet)
    assert fits == [1], "a resumed stage reuses the committed fit"
    assert resumed.stages["embeddings"]["status"] == "ran"
    assert json.loads(committed[lexical_embed.INFO_FILE])["fit_documents"] == len(
        embed_stage.lsa_fit_sample(documents_files(out), COMMON["embed_max_tokens"]))
    fresh = tmp_path / "fresh"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(fresh), **LSA), log=quiet)
    assert fits == [1, 1] and local_hashes(fresh) == local_hashes(out)
    assert Manifest.read(fresh / "train").embedder == Manifest.read(out / "train").embedder
    rerun = build_corpus(BuildOptions(inputs=[str(cut)], out=str(out), **LSA), log=quiet)
    assert all(stage["status"].startswith("skipped") for stage in rerun.stages.values()) and fits == [1, 1]


@pytest.mark.slow
def test_other_inputs_refit_and_change_the_fingerprint(built, cut, tmp_path):  # noqa: F811
    out, _ = built
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(cut.read_text().splitlines(keepends=True)[:60]))
    other = tmp_path / "other"
    build_corpus(BuildOptions(inputs=[str(fewer)], out=str(other), **LSA), log=quiet)
    before, after = Manifest.read(out / "train").embedder, Manifest.read(other / "train").embedder
    assert before["fingerprint"] != after["fingerprint"]
    # The same --out with other inputs: the stage runs again (never the stale vectors).
    copy = tmp_path / "copy"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(copy), **LSA), log=quiet)
    rerun = build_corpus(BuildOptions(inputs=[str(fewer)], out=str(copy), overwrite=True, **LSA), log=quiet)
    assert rerun.stages["embeddings"]["status"] == "ran"
    assert Manifest.read(copy / "train").embedder["fingerprint"] == after["fingerprint"]
    assert embeddings(copy).shape[0] == embeddings(other).shape[0] < embeddings(out).shape[0]


def test_too_few_train_documents_is_one_clear_error(cut, tmp_path):  # noqa: F811
    one = tmp_path / "one.jsonl"
    one.write_text(cut.read_text().splitlines(keepends=True)[0])
    with pytest.raises(LoryDataError, match=r"^--embedder lsa is fitted on the train split: fitting an LSA table "
                                            r"needs at least 2 documents with tokens, got 1$"):
        build_corpus(BuildOptions(inputs=[str(one)], out=str(tmp_path / "out"), **{**LSA, "heldout_fraction": 0.0}),
                     log=quiet)
    with pytest.raises(LoryDataError, match="fitted on the documents it embeds"):
        Embedder(EmbedderConfig(model="lsa"))


@pytest.mark.slow
def test_lsa_build_to_s3_gives_the_local_shards(built, cut, s3):  # noqa: F811
    out, _ = built
    prefix = "lsa/corpus"
    build_corpus(BuildOptions(inputs=[str(cut)], out=s3.url(prefix), **LSA), log=quiet)
    assert s3_hashes(s3, prefix) == local_hashes(out)
    assert not [k for k in s3.keys(prefix) if "/_work/embeddings/model/" in k]


@pytest.mark.slow
def test_dask_workers_embed_with_the_fit_the_driver_published(built, cut, dask_cluster, tmp_path):  # noqa: F811
    out, _ = built
    dask = tmp_path / "dask"
    build_corpus(BuildOptions(inputs=[str(cut)], out=str(dask), runner="dask",
                              beam_args=[f"--dask_client_address={dask_cluster.scheduler_address}"], **LSA),
                 log=quiet)
    assert local_hashes(dask) == local_hashes(out)
    assert Manifest.read(dask / "train").embedder == Manifest.read(out / "train").embedder
    assert not (dask / "_work" / "embeddings" / "model").exists()
