"""Read step of the documents stage: input files → clean documents in content-hash bucket files."""

from __future__ import annotations

import math
import os

import pyarrow as pa

from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import DeadLetter
from lorydata.inputs import file_format
from lorydata.read_summary import FileSummary
from lorydata.readers import ReaderConfig, read_file
from pipelines import dead_letters, fileio, layout
from pipelines.commits import Commit, PartitionFn

BUCKET_BYTES = 16 << 20  # input bytes per bucket (compressed inputs count 4x)
MAX_BUCKETS = 4096
FLUSH_CHARS = 32 << 20  # a reader writes its buffered documents out at this many characters

RAW_SCHEMA = pa.schema(
    [
        ("content_hash", pa.string()),
        ("id", pa.string()),
        ("domain", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("text", pa.string()),
    ]
)


def bucket_of(content_hash: str, buckets: int) -> int:
    """The bucket of a document: a range of its (uniform) content hash, so buckets in order
    hold the documents in hash order."""
    return (int(content_hash[:12], 16) * buckets) >> 48


def input_bytes(files: list[str]) -> int:
    """The size of the input as the stage weighs it: bytes, compressed inputs counted 4x."""
    total = 0
    for path in files:
        size = os.stat(path).st_size if fileio.is_local(path) else fileio.size(path)
        total += size * (4 if file_format(path) in ("jsonl.zst", "jsonl.gz") else 1)
    return total


def buckets_for(weight: int, requested: int | None = None) -> int:
    """Buckets of a build: the requested number, or about one per `BUCKET_BYTES` of input.

    Args:
        weight: the input's `input_bytes`.
        requested: `--buckets`, if given.
    """
    if requested:
        return requested
    return max(1, min(MAX_BUCKETS, math.ceil(weight / BUCKET_BYTES)))


class ReadToBucketsFn(PartitionFn):
    """(file index, path) → the file's clean documents in raw bucket files
    (`layout.raw_file`), flushed every `FLUSH_CHARS` characters so a reader holds a bounded
    buffer whatever the size of its file; dead letters to `read-f<file>-<flush>.jsonl`; what
    reading the file gave (`FileSummary`) to its summary file. Names depend only on the file
    index, so a retried bundle overwrites its own files. Files are opened through the file
    layer, so inputs may be object-store URLs.

    Args:
        folder: the stage folder.
        reader: field names and size limits.
        cleaner: normalisation and length filters.
        buckets: number of buckets.
    """

    def __init__(self, folder: str, reader: ReaderConfig, cleaner: CleanConfig, buckets: int):
        self.folder, self.reader, self.cleaner, self.buckets = folder, reader, cleaner, buckets

    def key(self, element: tuple[int, str]) -> str:
        return f"f{element[0]:06d}"

    def run(self, element: tuple[int, str], out: Commit) -> None:
        index, path = element
        rows: dict[int, list[dict]] = {}
        letters: list[DeadLetter] = []
        chars, flush = 0, 0
        summary = FileSummary(path)
        for record in read_file(path, self.reader, opener=fileio.opener):
            out.count("records_read", record.records if isinstance(record, DeadLetter) else 1)
            if not isinstance(record, DeadLetter):
                record = clean_document(record, self.cleaner)
            summary.add(record)
            if isinstance(record, DeadLetter):
                dead_letters.drop(record, letters, out)
                continue
            if record.replacements:
                out.count("utf8_replacements", record.replacements)
                out.count("documents_with_replacements")
            rows.setdefault(bucket_of(record.content_hash, self.buckets), []).append(
                {"content_hash": record.content_hash, "id": record.id, "domain": record.domain,
                 "source": record.source, "line": record.line, "text": record.text})
            chars += len(record.text)
            if chars >= FLUSH_CHARS:
                self._flush(out, index, flush, rows, letters)
                rows, letters, chars, flush = {}, [], 0, flush + 1
        self._flush(out, index, flush, rows, letters)
        out.save_json(layout.read_summary_file(self.folder, index), summary.to_dict())

    def _flush(self, out: Commit, index: int, flush: int, rows: dict[int, list[dict]],
               letters: list[DeadLetter]) -> None:
        name = f"f{index:06d}-{flush:04d}"
        for bucket, docs in rows.items():
            out.write_scratch(layout.raw_file(self.folder, bucket, name), pa.Table.from_pylist(docs, schema=RAW_SCHEMA))
        dead_letters.write(out, layout.dead_letter_file(self.folder, f"read-{name}"), letters)
