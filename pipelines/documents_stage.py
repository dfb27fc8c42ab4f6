"""Stage 1 on Beam: read → clean → exact dedup → tokenize, through content-hash bucket files.

No step sees every document at once (the shape datatrove uses for its dedup): documents
travel between the two steps as files partitioned by destination, and Beam only carries
file indices and bucket numbers.

1. **read** (`ReadToBucketsFn`, one element per input file): read, decode, clean; every
   surviving document goes to the bucket of its content hash, in files
   `raw/b<bucket>/f<file>-<flush>.parquet` written every `FLUSH_CHARS` characters, so a
   reader holds a bounded buffer whatever the size of its file.
2. **dedup** (`DedupBucketFn`, one element per bucket): all raw files of one bucket; exact
   dedup (the first copy by (source, line) wins, whatever the scheduling), train/held-out
   split by id hash, tokenization; writes `b<bucket>.parquet`.

Output of the stage, the seam for the stages after it (`_work/documents/`):

- `b00000.parquet`, `b00001.parquet`, ...: the deduplicated documents of each bucket with
  `DOCUMENT_SCHEMA` (both splits, `split` column), sorted by content hash. Buckets are
  ranges of the hash (`bucket_of`), so the files in name order list the documents in
  global hash order. A bucket with no document has no file.
- `dead_letters/*.jsonl`: one JSON dead letter per line (`DeadLetter.to_json`); every step
  writes files of its own name prefix (`read-`, `dedup-`), so a step inserted after this
  stage adds its reasons by writing its own files (see `write_dead_letters`).
- the stage result (`_DONE.json`): counts, with `buckets`.

Unless `--near-dedup off`, a last step drops near-duplicates from the bucket files
(`pipelines.near_dedup_stage`; its dead letters are `near_dedup-*.jsonl`, its counts under
`near_dedup`).

Per worker, memory is bounded by one bucket (`buckets_for` aims at `BUCKET_BYTES` of input
per bucket) or one read buffer; the driver holds only counters.
"""

from __future__ import annotations

import math
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import DeadLetter, DropReason
from lorydata.readers import ReaderConfig, file_format, read_file
from pipelines import fileio
from pipelines.options import BuildOptions
from pipelines.transforms import count, heldout_split, run_steps

SPLITS = ("train", "heldout")
RAW = "raw"
DEAD_LETTERS = "dead_letters"
BUCKET_BYTES = 16 << 20  # input bytes per bucket (compressed inputs count 4x)
MAX_BUCKETS = 4096
FLUSH_CHARS = 32 << 20  # a reader writes its buffered documents out at this many characters
TOKENIZE_ROWS = 256

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
# The bucket files after dedup: the raw columns with the split before the text and the tokens after it.
DOCUMENT_SCHEMA = RAW_SCHEMA.insert(RAW_SCHEMA.get_field_index("text"), pa.field("split", pa.string())).append(
    pa.field("tokens", pa.list_(pa.int32())))


def bucket_of(content_hash: str, buckets: int) -> int:
    """The bucket of a document: a range of its (uniform) content hash, so buckets in order
    hold the documents in hash order."""
    return (int(content_hash[:12], 16) * buckets) >> 48


def bucket_name(bucket: int) -> str:
    return f"b{bucket:05d}"


def bucket_files(folder: str) -> list[str]:
    """The documents files of a finished documents stage, in bucket (= hash) order."""
    return fileio.match(fileio.join(str(folder), "b*.parquet"))


def buckets_for(files: list[str], requested: int | None = None) -> int:
    """Buckets of a build: the requested number, or about one per `BUCKET_BYTES` of input
    (remote inputs of unknown size count as one bucket's worth each)."""
    if requested:
        return requested
    total = 0
    for path in files:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = BUCKET_BYTES
        total += size * (4 if file_format(path) in ("jsonl.zst", "jsonl.gz") else 1)
    return max(1, min(MAX_BUCKETS, math.ceil(total / BUCKET_BYTES)))


def write_dead_letters(path: str, letters: list[DeadLetter]) -> None:
    """One dead-letter file (JSON lines); steps name theirs `<step>-<part>.jsonl`."""
    if letters:
        fileio.write_bytes(path, "".join(letter.to_json() + "\n" for letter in letters).encode())


def drop(letter: DeadLetter, letters: list[DeadLetter]) -> None:
    count(f"dropped.{letter.reason}")
    letters.append(letter)


class ReadToBucketsFn(beam.DoFn):
    """(file index, path) → the file's clean documents in raw bucket files; dead letters to
    `dead_letters/read-f<file>-<flush>.jsonl`. Names depend only on the file index, so a
    retried bundle overwrites its own files.

    Args:
        folder: the stage folder.
        reader: field names and size limits.
        cleaner: normalisation and length filters.
        buckets: number of buckets.
    """

    def __init__(self, folder: str, reader: ReaderConfig, cleaner: CleanConfig, buckets: int):
        self.folder, self.reader, self.cleaner, self.buckets = folder, reader, cleaner, buckets

    def process(self, element: tuple[int, str]):
        index, path = element
        rows: dict[int, list[dict]] = {}
        letters: list[DeadLetter] = []
        chars, flush = 0, 0
        for record in read_file(path, self.reader):
            count("records_read")
            if not isinstance(record, DeadLetter):
                record = clean_document(record, self.cleaner)
            if isinstance(record, DeadLetter):
                drop(record, letters)
                continue
            if record.replacements:
                count("utf8_replacements", record.replacements)
                count("documents_with_replacements")
            rows.setdefault(bucket_of(record.content_hash, self.buckets), []).append(
                {"content_hash": record.content_hash, "id": record.id, "domain": record.domain,
                 "source": record.source, "line": record.line, "text": record.text})
            chars += len(record.text)
            if chars >= FLUSH_CHARS:
                self._flush(index, flush, rows, letters)
                rows, letters, chars, flush = {}, [], 0, flush + 1
        self._flush(index, flush, rows, letters)
        yield index

    def _flush(self, index: int, flush: int, rows: dict[int, list[dict]], letters: list[DeadLetter]) -> None:
        name = f"f{index:06d}-{flush:04d}"
        for bucket, docs in rows.items():
            path = fileio.join(self.folder, RAW, bucket_name(bucket), f"{name}.parquet")
            fileio.write_table(path, pa.Table.from_pylist(docs, schema=RAW_SCHEMA))
        write_dead_letters(fileio.join(self.folder, DEAD_LETTERS, f"read-{name}.jsonl"), letters)


def first_copies(table: pa.Table) -> tuple[pa.Table, list[DeadLetter]]:
    """Exact dedup of one bucket: the copy of every content hash that comes first by
    (source, line) is kept, the others become `duplicate` dead letters naming it.

    Returns:
        (kept rows sorted by content hash, dead letters).
    """
    table = table.sort_by([("content_hash", "ascending"), ("source", "ascending"), ("line", "ascending")])
    hashes = table.column("content_hash")
    first = np.ones(table.num_rows, bool)
    if table.num_rows > 1:
        first[1:] = pc.not_equal(hashes.slice(1), hashes.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    letters = []
    if not first.all():
        kept_at = np.maximum.accumulate(np.where(first, np.arange(table.num_rows), 0))
        sources, lines = table.column("source").to_pylist(), table.column("line").to_pylist()
        texts = table.column("text")
        for i in np.flatnonzero(~first):
            k = kept_at[i]
            letters.append(DeadLetter(sources[i], lines[i], DropReason.DUPLICATE,
                                      f"same text as {sources[k]}:{lines[k]}", texts[int(i)].as_py()[:200]))
    return table.filter(pa.array(first)), letters


class DedupBucketFn(beam.DoFn):
    """bucket → `b<bucket>.parquet`: exact dedup, split and tokens of the bucket's documents;
    duplicates to `dead_letters/dedup-b<bucket>.jsonl`. Yields the bucket.

    Args:
        folder: the stage folder.
        tokenizer_path: tokenizer (None: the bundled one).
        heldout_fraction: share of documents (by id hash) in the held-out split.
    """

    def __init__(self, folder: str, tokenizer_path: str | None, heldout_fraction: float):
        self.folder, self.tokenizer_path, self.heldout_fraction = folder, tokenizer_path, heldout_fraction
        self.tokenizer = None

    def setup(self):
        from lorydata.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(self.tokenizer_path)

    def process(self, bucket: int, after=None):
        parts = fileio.match(fileio.join(self.folder, RAW, bucket_name(bucket), "*.parquet"))
        if not parts:
            return
        kept, letters = first_copies(fileio.read_tables(parts))
        for letter in letters:
            count(f"dropped.{letter.reason}")
        write_dead_letters(fileio.join(self.folder, DEAD_LETTERS, f"dedup-{bucket_name(bucket)}.jsonl"), letters)
        splits = [heldout_split(doc_id, self.heldout_fraction) for doc_id in kept.column("id").to_pylist()]
        # Token lists become Arrow int32 a chunk at a time (as Python ints they take ~9x more).
        chunks = [pa.array(self.tokenizer.encode_batch(kept.column("text").slice(start, TOKENIZE_ROWS).to_pylist()),
                           pa.list_(pa.int32()))
                  for start in range(0, kept.num_rows, TOKENIZE_ROWS)]
        tokens = pa.chunked_array(chunks, pa.list_(pa.int32()))
        lengths = pc.list_value_length(tokens).to_numpy().astype(np.int64)
        for split in SPLITS:
            chosen = np.fromiter((s == split for s in splits), bool, len(splits))
            count(f"documents.{split}", int(chosen.sum()))
            count(f"tokens.{split}", int(lengths[chosen].sum()))
        count("documents_kept", kept.num_rows)
        count("tokens", int(lengths.sum()))
        table = (kept.append_column("split", pa.array(splits, pa.string()))
                 .append_column("tokens", tokens)
                 .select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA))
        fileio.write_table(fileio.join(self.folder, f"{bucket_name(bucket)}.parquet"), table)
        yield bucket


def read_and_dedup(options: BuildOptions, files: list[str], tokenizer_path: str | None, folder: str,
                   buckets: int) -> dict[str, int]:
    """Both steps, the second after the first (see the module docstring); the raw files are
    removed after. Returns the Beam counters."""
    reader = ReaderConfig(options.text_field, options.domain_field, options.id_field, options.max_chars)
    cleaner = CleanConfig(min_chars=options.min_chars, max_chars=options.max_chars)
    totals = run_steps(options, [
        ("Read", list(enumerate(files)), ReadToBucketsFn(folder, reader, cleaner, buckets)),
        ("Dedup", list(range(buckets)), DedupBucketFn(folder, tokenizer_path, options.heldout_fraction)),
    ])
    fileio.delete_tree(fileio.join(folder, RAW))
    return totals


def run_documents_stage(options: BuildOptions, files: list[str], tokenizer_path: str | None, out) -> dict:
    """Run stage 1 into `out` (bucket files and dead letters, see the module docstring).

    Args:
        options: the build options.
        files: the expanded input files (checked to exist).
        tokenizer_path: tokenizer to use (None: the bundled one).
        out: the stage's temp folder.

    Returns:
        Counts: records read, kept, dropped per reason, tokens, per-split documents and
        tokens, and the number of buckets.
    """
    folder = str(out)
    buckets = buckets_for(files, options.buckets)
    totals = read_and_dedup(options, files, tokenizer_path, folder, buckets)
    near_dedup = None
    if options.near_dedup == "on":
        from pipelines.near_dedup_stage import FOLDER, drop_near_duplicates

        near_dedup, changes = drop_near_duplicates(options, bucket_files(folder), totals.get("documents_kept", 0),
                                                   fileio.join(folder, DEAD_LETTERS), fileio.join(folder, FOLDER))
        for name, value in changes.items():
            totals[name] = totals.get(name, 0) + value
    dropped = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("dropped.")}
    return {
        "input_files": len(files),
        "buckets": buckets,
        "records_read": totals.get("records_read", 0),
        "documents_kept": totals.get("documents_kept", 0),
        "dropped": dict(sorted(dropped.items())),
        "utf8_replacements": totals.get("utf8_replacements", 0),
        "documents_with_replacements": totals.get("documents_with_replacements", 0),
        "tokens": totals.get("tokens", 0),
        "documents_per_split": {s: totals.get(f"documents.{s}", 0) for s in SPLITS},
        "tokens_per_split": {s: totals.get(f"tokens.{s}", 0) for s in SPLITS},
        **({"near_dedup": near_dedup} if near_dedup else {}),
    }
