"""Stage 2, embeddings (similarity order only): every documents file → its vectors.

One element per documents file; its worker reads the texts a chunk at a time and writes one
(n, d) float32 `.npy` (`layout.embeddings_file`), row-aligned with the documents file.
Chunks are `CHUNK_BATCHES` embedding batches of consecutive documents in hash order (the
encoder sorts each chunk by length, so batches carry little padding), so which documents
share a batch, and with it every embedding bit, depends on the documents alone, never on the
runner or the worker count. Memory per worker: one chunk of texts plus the file's vectors.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from apache_beam.utils import shared

from lorydata.embed import Embedder, EmbedderConfig
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.runner.beam import BeamRunner

CHUNK_BATCHES = 16


class _Model:
    """A holder that `beam.utils.shared` can keep one of per worker process."""

    def __init__(self, embedder):
        self.embedder = embedder


class EmbedBucketFn(PartitionFn):
    """documents file → its embeddings `.npy` (see the module docstring).

    Args:
        out: the stage folder.
        config: the embedder config.
    """

    def __init__(self, out: str, config: EmbedderConfig):
        self.out, self.config = out, config
        self._shared = shared.Shared()
        self.embedder = None

    def setup(self):
        self.embedder = self._shared.acquire(lambda: _Model(Embedder(self.config))).embedder

    def run(self, path: str, out: Commit) -> None:
        chunk = CHUNK_BATCHES * self.config.batch_size
        vectors, texts = [], []
        with fileio.open_read(path) as f:
            # Batches of the reader may end at row-group ends: chunks are cut here, exactly.
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk, columns=["text"]):
                texts.extend(batch.column(0).to_pylist())
                while len(texts) >= chunk:
                    vectors.append(self.embedder.encode(texts[:chunk]))
                    del texts[:chunk]
        if texts:
            vectors.append(self.embedder.encode(texts))
        x = np.concatenate(vectors) if vectors else np.zeros((0, self.embedder.dim), np.float32)
        out.save_npy(layout.embeddings_file(self.out, path), x.astype(np.float32, copy=False))
        out.count("documents_embedded", len(x))


def run_embed_stage(config: EmbedderConfig, runner: BeamRunner, documents_dir: str, folder: str) -> dict:
    """Embed the documents of every documents file into `folder`.

    Args:
        config: the embedder.
        runner: where the Beam step runs.
        documents_dir: the finished documents stage folder.
        folder: the stage's (temp) folder.

    Returns:
        {"documents_embedded", "embedder": identity dict}.
    """
    files = layout.documents_files(str(documents_dir))
    # Largest files first would need their sizes; hash buckets are of even size anyway.
    totals = runner.run_each(str(folder), "Embed", files, EmbedBucketFn(str(folder), config))
    return {"documents_embedded": totals.get("documents_embedded", 0), "embedder": Embedder.describe(config)}
