"""Stage 2 on Beam: embed the documents of every bucket → `_work/embeddings/b<bucket>.npy`.

One element per documents bucket file; its worker reads the texts a chunk at a time and
writes one (n, d) float32 `.npy`, row-aligned with the bucket's documents file. Chunks are
`CHUNK_BATCHES` embedding batches of consecutive documents in hash order (the encoder sorts
each chunk by length, so batches carry little padding), so which documents share a batch,
and with it every embedding bit, depends on the documents alone, never on the runner or the
worker count. Memory per worker: one chunk of texts plus the bucket's vectors.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.utils import shared

from pipelines import fileio
from pipelines.documents_stage import bucket_files
from pipelines.options import BuildOptions
from pipelines.transforms import run_each

CHUNK_BATCHES = 16


def embedder_config(options: BuildOptions):
    """The `lorydata.embed` config that the build options describe."""
    from lorydata.embed import EmbedderConfig

    return EmbedderConfig(
        model=options.embedder,
        device=options.device,
        batch_size=options.embed_batch_size,
        max_tokens=options.embed_max_tokens,
        long_documents=options.embed_long,
    )


def embeddings_file(embeddings_dir: str, documents_file: str) -> str:
    """The `.npy` of a documents bucket file."""
    return fileio.join(str(embeddings_dir), f"{fileio.stem(documents_file)}.npy")


class _Model:
    """A holder that `beam.utils.shared` can keep one of per worker process."""

    def __init__(self, embedder):
        self.embedder = embedder


class EmbedBucketFn(beam.DoFn):
    """documents file → its embeddings `.npy` (see the module docstring). Yields the count.

    Args:
        out: the stage folder.
        config: the embedder config.
    """

    def __init__(self, out: str, config):
        self.out, self.config = out, config
        self._shared = shared.Shared()
        self.embedder = None

    def setup(self):
        from lorydata.embed import Embedder

        self.embedder = self._shared.acquire(lambda: _Model(Embedder(self.config))).embedder

    def process(self, path: str):
        from pipelines.transforms import count

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
        fileio.save_npy(embeddings_file(self.out, path), x.astype(np.float32, copy=False))
        count("documents_embedded", len(x))
        yield len(x)


def run_embed_stage(options: BuildOptions, documents_dir: Path, out: Path, counts: dict) -> dict:
    """Embed the documents of every bucket into `out/b<bucket>.npy`.

    Returns:
        {"documents_embedded", "embedder": identity dict}.
    """
    from lorydata.embed import Embedder

    config = embedder_config(options)
    files = bucket_files(str(documents_dir))
    # Largest buckets first would need their sizes; hash buckets are of even size anyway.
    totals = run_each(options, "Embed", files, EmbedBucketFn(str(out), config))
    return {"documents_embedded": totals.get("documents_embedded", 0), "embedder": Embedder.describe(config)}
