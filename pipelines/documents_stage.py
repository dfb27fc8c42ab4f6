"""Stage 1 on Beam: read → clean → exact dedup → tokenize → documents Parquet + dead letters."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics.metric import MetricsFilter

from lorydata.clean import CleanConfig
from lorydata.readers import ReaderConfig
from pipelines.options import BuildOptions, make_pipeline
from pipelines.transforms import DEAD, NAMESPACE, CleanFn, KeepFirstFn, ReadFileFn, TokenizeFn

SPLITS = ("train", "heldout")

DOCUMENT_SCHEMA = pa.schema(
    [
        ("content_hash", pa.string()),
        ("id", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int32())),
    ]
)


def counters(result) -> dict[str, int]:
    """The committed values of the `lory` Beam counters of a finished pipeline."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def run_documents_stage(options: BuildOptions, files: list[str], tokenizer_path: str | None, out: Path) -> dict:
    """Run stage 1 into `out` (<split>-*.parquet, dead_letters/*.jsonl).

    Args:
        options: the build options.
        files: the expanded input files (checked to exist).
        tokenizer_path: tokenizer to use (None: the bundled one).
        out: the stage's temp folder.

    Returns:
        Counts: records read, kept, dropped per reason, duplicates, tokens, per-split documents.
    """
    reader = ReaderConfig(options.text_field, options.domain_field, options.id_field, options.max_chars)
    cleaner = CleanConfig(min_chars=options.min_chars, max_chars=options.max_chars)
    pipeline = make_pipeline(options)
    read = (
        pipeline
        | "Files" >> beam.Create(sorted(files))
        # One file per element, redistributed so workers share the reading.
        | "SpreadFiles" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadFileFn(reader)).with_outputs(DEAD, main="docs")
    )
    cleaned = (
        read.docs
        | "SpreadDocs" >> beam.Reshuffle()
        | "Clean" >> beam.ParDo(CleanFn(cleaner)).with_outputs(DEAD, main="docs")
    )
    kept = (
        cleaned.docs
        | "ByHash" >> beam.Map(lambda doc: (doc.content_hash, doc))
        | "GroupCopies" >> beam.GroupByKey()
        | "KeepFirst" >> beam.ParDo(KeepFirstFn()).with_outputs(DEAD, main="docs")
    )
    rows = kept.docs | "Tokenize" >> beam.ParDo(TokenizeFn(tokenizer_path, options.heldout_fraction))
    for split in SPLITS:
        (
            rows
            | f"Only{split}" >> beam.Filter(lambda row, s=split: row["split"] == s)
            | f"Write{split}"
            >> beam.io.WriteToParquet(
                str(out / split), DOCUMENT_SCHEMA, file_name_suffix=".parquet", codec="zstd"
            )
        )
    (
        (read[DEAD], cleaned[DEAD], kept[DEAD])
        | "AllDead" >> beam.Flatten()
        | "DeadJson" >> beam.Map(lambda letter: letter.to_json())
        | "WriteDead" >> beam.io.WriteToText(str(out / "dead_letters" / "dead_letters"), file_name_suffix=".jsonl")
    )
    result = pipeline.run()
    result.wait_until_finish()
    totals = counters(result)
    dropped = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("dropped.")}
    return {
        "input_files": len(files),
        "records_read": totals.get("records_read", 0),
        "documents_kept": totals.get("documents_kept", 0),
        "dropped": dict(sorted(dropped.items())),
        "utf8_replacements": totals.get("utf8_replacements", 0),
        "documents_with_replacements": totals.get("documents_with_replacements", 0),
        "tokens": totals.get("tokens", 0),
        "documents_per_split": {s: totals.get(f"documents.{s}", 0) for s in SPLITS},
    }
