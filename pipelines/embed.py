"""Stage 2, embeddings (similarity order only): every documents file → its vectors.

On a runner whose workers may be other machines, a static model (distilled into this
machine's model cache, or a folder the user named) travels with the build: the driver
copies it into the stage folder (`model/`) and each worker loads that copy (downloading it
first from an object store), so no worker distils its own or needs a path it cannot see.

One element per documents file; its worker reads the texts a chunk at a time and writes one
(n, d) float32 `.npy` (`layout.embeddings_file`), row-aligned with the documents file.
Chunks are `CHUNK_BATCHES` embedding batches of consecutive documents in hash order (the
encoder sorts each chunk by length, so batches carry little padding), so which documents
share a batch, and with it every embedding bit, depends on the documents alone, never on the
runner or the worker count. Memory per worker: one chunk of texts plus the file's vectors.

Model "lsa" (`lorydata.lexical_embed`) is fitted here, once, by the driver: on at most
`LSA_FIT_DOCS` train documents' stored token ids, the first ones (in hash order, so a
pseudo-random draw) of every documents file in equal shares. The fitted folder is written to
`model/` like a published static model (its info file last: present = a complete fit, which
a resumed stage reuses), and every worker embeds the stored ids with it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from apache_beam.utils import shared

from lorydata import lexical_embed
from lorydata.embed import (
    LSA_MODEL,
    Embedder,
    EmbedderConfig,
    fit_lsa_model,
    is_static_folder,
    lsa_fit_window,
    resolve_model,
)
from lorydata.errors import LoryDataError
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.runner.beam import LOCAL_RUNNER, BeamRunner

CHUNK_BATCHES = 16
LSA_SPLIT = "train"  # the split model "lsa" is fitted on (held-out documents stay unseen)


class _Model:
    """A holder that `beam.utils.shared` can keep one of per worker process."""

    def __init__(self, embedder):
        self.embedder = embedder


class EmbedBucketFn(PartitionFn):
    """documents file → its embeddings `.npy` (see the module docstring). A static model
    indexed by the build's own tokenizer ("static-bpe") embeds the token ids the documents
    stage stored: no second tokenization.

    Args:
        out: the stage folder.
        config: the embedder config.
        ids_tokenizer: sha256 of the tokenizer the documents were tokenized with.
    """

    def __init__(self, out: str, config: EmbedderConfig, ids_tokenizer: str | None = None):
        self.out, self.config, self.ids_tokenizer = out, config, ids_tokenizer
        self._shared = shared.Shared()
        self.embedder = None

    def setup(self):
        self.embedder = self._shared.acquire(lambda: _Model(Embedder(_local_copy(self.config)))).embedder

    def run(self, path: str, out: Commit) -> None:
        chunk = CHUNK_BATCHES * self.config.batch_size
        ids = self.ids_tokenizer is not None and self.embedder.tokenizer_sha256 == self.ids_tokenizer
        encode = self.embedder.encode_ids if ids else self.embedder.encode
        vectors, items = [], []
        with fileio.open_read(path) as f:
            # Batches of the reader may end at row-group ends: chunks are cut here, exactly.
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk, columns=["tokens" if ids else "text"]):
                column = batch.column(0)
                items.extend(_token_arrays(column) if ids else column.to_pylist())
                while len(items) >= chunk:
                    vectors.append(encode(items[:chunk]))
                    del items[:chunk]
        if items:
            vectors.append(encode(items))
        x = np.concatenate(vectors) if vectors else np.zeros((0, self.embedder.dim), np.float32)
        out.save_npy(layout.embeddings_file(self.out, path), x.astype(np.float32, copy=False))
        out.count("documents_embedded", len(x))


def _local_copy(config: EmbedderConfig) -> EmbedderConfig:
    """`config` with a model published on an object store downloaded to a local folder."""
    if config.model is None or fileio.is_local(config.model):
        return config
    folder = Path(tempfile.mkdtemp(prefix="lory-model-"))
    for path in sorted(fileio.sizes(config.model)):
        target = folder / fileio.relative(path, config.model)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fileio.read_bytes(path))
    return dataclasses.replace(config, model=str(folder))


def publish_model(config: EmbedderConfig, folder: str) -> EmbedderConfig:
    """For workers that may not share this machine's disk: a static model's files copied
    into the stage folder (once), and the config that loads that copy. Other models (the
    bundled MiniLM, which every lory install carries; hub names) are left as they are."""
    _, source = resolve_model(config.model, config.static_dims, config.static_tokenizer)
    local = Path(source)
    if config.model is None or not local.is_dir() or not is_static_folder(local):
        return config
    target = layout.published_model(folder)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        name = fileio.join(target, *path.relative_to(local).parts)
        if not fileio.exists(name) or fileio.size(name) != path.stat().st_size:
            fileio.write_bytes(name, path.read_bytes())
    return dataclasses.replace(config, model=target)


def lsa_fit_sample(files: list[str], window: int | None,
                   max_documents: int = lexical_embed.LSA_FIT_DOCS) -> list[np.ndarray]:
    """The token ids model "lsa" is fitted on: the first train documents of every documents
    file, an equal share of `max_documents` from each (fewer where a file holds fewer),
    each cut at `window`. Files are read a row batch at a time; only the sample is kept.

    Args:
        files: the documents files, in name (hash) order.
        window: ids kept per document (None: all).
        max_documents: at most this many documents in all.

    Returns:
        One int32 array per sampled document, in file order then row order.
    """
    share = -(-max_documents // max(1, len(files)))
    sample = []
    for path in files:
        taken = 0
        with fileio.open_read(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=min(share, 1024), columns=["split", "tokens"]):
                splits = batch.column(0).to_pylist()
                for split, ids in zip(splits, _token_arrays(batch.column(1)), strict=True):
                    if split == LSA_SPLIT and taken < share:
                        sample.append(np.array(ids[:window], dtype=np.int32))  # a copy: the batch is freed
                        taken += 1
                if taken >= share:
                    break
    return sample[:max_documents]


def fit_build_lsa(config: EmbedderConfig, files: list[str], folder: str) -> tuple[EmbedderConfig, dict]:
    """Fit model "lsa" on the build's documents into the stage's `model/` (or reuse the fit
    a resumed stage committed there).

    Args:
        config: model "lsa" over the build's tokenizer.
        files: the documents files.
        folder: the embeddings stage folder.

    Returns:
        (the config that loads the fit, its identity for the manifest: model "lsa", the
        fitted folder's fingerprint, which covers the table's sha256).

    Raises:
        LoryDataError: too few train documents with tokens to fit on.
    """
    target = layout.published_model(folder)
    if not fileio.exists(fileio.join(target, lexical_embed.INFO_FILE)):
        sample = lsa_fit_sample(files, lsa_fit_window(config))
        with tempfile.TemporaryDirectory(prefix="lory-lsa-") as tmp:
            try:
                local = Path(fit_lsa_model(config, sample, tmp).model)
            except LoryDataError as exc:
                raise LoryDataError(f"--embedder lsa is fitted on the {LSA_SPLIT} split: {exc}") from None
            for name in (lexical_embed.TABLE_FILE, "tokenizer.json", lexical_embed.INFO_FILE):  # info last: commit
                fileio.write_bytes(fileio.join(target, name), (local / name).read_bytes())
    # --device cuda is for FAISS then: LSA is a sparse product, on CPU everywhere.
    fitted = dataclasses.replace(config, model=target, device="cpu")
    local = _local_copy(fitted)
    documents = lexical_embed.lsa_info(Path(local.model))["fit_documents"]
    # The folder is the stage's scratch: the manifest says what the fit was, not where it was.
    identity = {**Embedder.describe(local), "model": LSA_MODEL, "fit_documents": documents,
                "source": f"fitted by the embeddings stage on {documents} {LSA_SPLIT} documents"}
    return fitted, identity


def _token_arrays(column) -> list[np.ndarray]:
    """The int32 token ids of every row of a list<int32> column, as numpy views."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return [values[offsets[i]: offsets[i + 1]] for i in range(len(column))]


def run_embed_stage(config: EmbedderConfig, runner: BeamRunner, documents_dir: str, folder: str,
                    ids_tokenizer: str | None = None) -> dict:
    """Embed the documents of every documents file into `folder`.

    Args:
        config: the embedder.
        runner: where the Beam step runs.
        documents_dir: the finished documents stage folder.
        folder: the stage's folder.
        ids_tokenizer: sha256 of the documents' tokenizer (a static model over it embeds ids;
            model "lsa" is fitted over it).

    Returns:
        {"documents_embedded", "embedder": identity dict}.
    """
    files = layout.documents_files(str(documents_dir))
    if config.model == LSA_MODEL:  # fitted here, in the driver; published where every worker reads it
        config, identity = fit_build_lsa(config, files, str(folder))
    else:
        identity = Embedder.describe(config)
        if runner.name != LOCAL_RUNNER:  # workers may be other machines
            config = publish_model(config, str(folder))
    # Largest files first would need their sizes; hash buckets are of even size anyway.
    totals = runner.run_each(str(folder), "Embed", files, EmbedBucketFn(str(folder), config, ids_tokenizer))
    return {"documents_embedded": totals.get("documents_embedded", 0), "embedder": identity}
