"""Stage 2 on Beam: embed every document with RunInference → `_work/embeddings/*.parquet`."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import RunInference

from pipelines.documents_stage import SPLITS, counters
from pipelines.options import BuildOptions, make_pipeline
from pipelines.transforms import EmbedModelHandler, embedding_bucket, run_pipeline


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


def embedding_schema() -> pa.Schema:
    return pa.schema([("content_hash", pa.string()), ("split", pa.string()), ("embedding", pa.list_(pa.float32()))])


def run_embed_stage(options: BuildOptions, documents_dir: Path, out: Path, counts: dict) -> dict:
    """Embed the documents of every split into `out/<split>-*.parquet`.

    Documents are grouped into batches by their hash (`embedding_bucket`), so batch
    composition, and with it every embedding bit, is the same on any runner and worker
    count. The model is loaded once per worker by RunInference (shared across processes on
    a GPU).

    Returns:
        {"documents_embedded", "embedder": identity dict}.
    """
    config = embedder_config(options)
    total = sum(counts["documents_per_split"].values())
    buckets = max(1, total // options.embed_batch_size)
    on_gpu = options.device == "cuda"
    pipeline = make_pipeline(options)
    embedded = (
        pipeline
        | "ReadDocs" >> beam.io.ReadFromParquet(str(documents_dir / "*.parquet"), columns=["content_hash", "split", "text"])
        | "ToBucket" >> beam.Map(lambda r: (embedding_bucket(r["content_hash"], buckets),
                                            (r["content_hash"], r["split"], r["text"])))
        | "GroupBatches" >> beam.GroupByKey()
        | "Batch" >> beam.Map(lambda kv: list(kv[1]))
        | "Embed" >> RunInference(EmbedModelHandler(config, large_model=on_gpu))
    )
    for split in SPLITS:
        (
            embedded
            | f"Only{split}" >> beam.Filter(lambda row, s=split: row["split"] == s)
            | f"Write{split}" >> beam.io.WriteToParquet(str(out / split), embedding_schema(), file_name_suffix=".parquet")
        )
    result = run_pipeline(pipeline)
    from lorydata.embed import Embedder

    return {
        "documents_embedded": counters(result).get("documents_embedded", 0),
        "embedder": Embedder.describe(config),
    }
