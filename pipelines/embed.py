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
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from apache_beam.utils import shared

from lorydata.embed import Embedder, EmbedderConfig, is_static_folder, resolve_model
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.runner.beam import LOCAL_RUNNER, BeamRunner

CHUNK_BATCHES = 16


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
        ids_tokenizer: sha256 of the documents' tokenizer (a static model over it embeds ids).

    Returns:
        {"documents_embedded", "embedder": identity dict}.
    """
    files = layout.documents_files(str(documents_dir))
    identity = Embedder.describe(config)
    if runner.name != LOCAL_RUNNER:  # workers may be other machines
        config = publish_model(config, str(folder))
    # Largest files first would need their sizes; hash buckets are of even size anyway.
    totals = runner.run_each(str(folder), "Embed", files, EmbedBucketFn(str(folder), config, ids_tokenizer))
    return {"documents_embedded": totals.get("documents_embedded", 0), "embedder": identity}
