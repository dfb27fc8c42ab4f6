"""Beam DoFns and the RunInference model handler, each a thin shell around a lorydata block."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

NAMESPACE = "lory"


def count(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


def heldout_split(doc_id: str, fraction: float) -> str:
    """'heldout' for a stable `fraction` of document ids (by hash), else 'train'."""
    if fraction <= 0:
        return "train"
    value = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return "heldout" if value < fraction * 2**64 else "train"


def embedding_bucket(content_hash: str, buckets: int) -> int:
    """The embedding batch of a document: fixed by its hash, so batches never depend on
    how the runner schedules work (and embeddings are reproducible to the bit)."""
    return int(content_hash[:12], 16) % buckets


class EmbedModelHandler(ModelHandler):
    """RunInference handler for sentence-transformers via `lorydata.embed.Embedder`.

    Elements are pre-made batches (lists of (content_hash, split, text)); the model is
    loaded once per worker process by RunInference, or shared across processes on a GPU
    (`large_model`).

    Args:
        config: the embedder config (pickled to the workers).
        large_model: share one model across worker processes (GPU) instead of one each.
    """

    def __init__(self, config, large_model: bool = False):
        super().__init__(large_model=large_model, model_copies=1 if large_model else None)
        self.config = config

    def load_model(self):
        from lorydata.embed import Embedder

        return Embedder(self.config)

    def run_inference(self, batch: Sequence[list], model, inference_args=None):
        for records in batch:
            records = sorted(records)
            vectors = model.encode([text for _, _, text in records])
            count("documents_embedded", len(records))
            for (content_hash, split, _), vector in zip(records, vectors, strict=True):
                yield {"content_hash": content_hash, "split": split, "embedding": vector.tolist()}

    def batch_elements_kwargs(self):
        # Elements already are batches of fixed composition; hand them over one at a time.
        return {"min_batch_size": 1, "max_batch_size": 1}

    def get_num_bytes(self, batch) -> int:
        return sum(len(text) for records in batch for _, _, text in records)

    def get_metrics_namespace(self) -> str:
        return "lory.embed"


class OrderCellFn(beam.DoFn):
    """(cell id, stream start) → that cell's kNN graph and walk, written as files.

    A cell's embeddings and token counts come from `<folder>/<cell>.x.npy` and
    `<cell>.lengths.npy` (written by the driver: arrays travel as files, not as pickled
    elements), and the results go to `<folder>/<cell>/`: the graph (`KnnGraph.save`),
    `order.npy` and `walk.json`. Results are written into a temp folder and renamed, so a
    retried bundle replaces a cell's output whole. Yields the cell id.

    Args:
        folder: the cells folder (shared by the driver and the workers).
        knn_config: kNN options of every cell (an explicit index falls back to exact search
            in a cell too small to train it).
        walk_config: walk options of every cell.
    """

    def __init__(self, folder: str, knn_config, walk_config):
        self.folder = folder
        self.knn_config = knn_config
        self.walk_config = walk_config

    def process(self, element: tuple[int, int]):
        import dataclasses
        import json
        import os
        import shutil

        import numpy as np

        from lorydata.partition import order_cell
        from pipelines.similarity_order import index_for

        cell, stream_start = element
        base = os.path.join(self.folder, cell_name(cell))
        x = np.load(base + ".x.npy")
        lengths = np.load(base + ".lengths.npy")
        knn_config = dataclasses.replace(self.knn_config, index=index_for(self.knn_config.index, len(x)))
        result = order_cell(x, knn_config, self.walk_config, token_lengths=lengths, stream_start=stream_start)
        tmp = base + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        result.graph.save(tmp)
        np.save(os.path.join(tmp, "order.npy"), result.order)
        with open(os.path.join(tmp, "walk.json"), "w") as f:
            json.dump(result.stats, f)
        shutil.rmtree(base, ignore_errors=True)
        os.rename(tmp, base)
        count("cells_ordered")
        count("cell_documents", len(x))
        yield cell


def cell_name(cell: int) -> str:
    """File stem of a partition cell's inputs and output folder."""
    return f"cell-{cell:06d}"


def run_pipeline(pipeline):
    """Run a pipeline to the end; a `LoryDataError` raised inside a worker process comes back
    as one, with its message only.

    In-process, Beam re-raises the worker's exception itself; from worker processes it
    raises a RuntimeError whose text is the worker's whole traceback, which the CLI would
    print in full for a plain user mistake.
    """
    import re

    from lorydata.errors import LoryDataError

    try:
        result = pipeline.run()
        result.wait_until_finish()
    except LoryDataError:
        raise
    except Exception as exc:
        found = re.findall(r"(?:LoryDataError|InputNotFoundError|ShardError|MismatchError): (.+)", str(exc))
        if found:
            raise LoryDataError(re.sub(r" \[while running .*\]$", "", found[-1].strip())) from exc
        raise
    return result
