"""Dedup step of the documents stage: one content-hash bucket → exact dedup, split, tokens."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.documents import DeadLetter, DropReason
from lorydata.tokenizer import Tokenizer
from pipelines import dead_letters, fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.documents.read import RAW_SCHEMA

TOKENIZE_ROWS = 1024  # documents per tokenizer call (a bounded list of texts)
# The bucket files after dedup: the raw columns with the split before the text and the tokens after it.
DOCUMENT_SCHEMA = RAW_SCHEMA.insert(RAW_SCHEMA.get_field_index("text"), pa.field("split", pa.string())).append(
    pa.field("tokens", pa.list_(pa.int32())))


def heldout_split(doc_id: str, fraction: float) -> str:
    """'heldout' for a stable `fraction` of document ids (by hash), else 'train'."""
    if fraction <= 0:
        return "train"
    value = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return "heldout" if value < fraction * 2**64 else "train"


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


class DedupBucketFn(PartitionFn):
    """bucket → its documents file (`DOCUMENT_SCHEMA`, sorted by content hash): exact dedup
    (the first copy by (source, line) wins, whatever the scheduling), train/held-out split by
    id hash, tokens; duplicates to `dedup-b<bucket>.jsonl`.

    Args:
        folder: the stage folder.
        tokenizer_path: tokenizer (None: the bundled one).
        heldout_fraction: share of documents (by id hash) in the held-out split.
        final: write the stage's documents file (`layout.documents_file`); False: the
            deduplicated file that near-dedup reads (`layout.deduped_file`).
        threads: tokenizer threads (None: every core; 1 in a worker of a multi-process runner).
    """

    def __init__(self, folder: str, tokenizer_path: str | None, heldout_fraction: float, final: bool = True,
                 threads: int | None = None):
        self.folder, self.tokenizer_path, self.heldout_fraction = folder, tokenizer_path, heldout_fraction
        self.final, self.threads = final, threads
        self.tokenizer = None

    def setup(self):
        self.tokenizer = Tokenizer(self.tokenizer_path)

    def run(self, bucket: int, out: Commit) -> None:
        parts = layout.raw_files(self.folder, bucket)
        if not parts:
            return
        kept, letters = first_copies(fileio.read_tables(parts))
        for letter in letters:
            out.count(f"dropped.{letter.reason}")
        dead_letters.write(out, layout.dead_letter_file(self.folder, f"dedup-{layout.bucket_name(bucket)}"), letters)
        splits = [heldout_split(doc_id, self.heldout_fraction) for doc_id in kept.column("id").to_pylist()]
        # Token lists go straight to Arrow int32, a chunk at a time (no Python int per token).
        chunks = [self.tokenizer.encode_batch_arrow(kept.column("text").slice(start, TOKENIZE_ROWS).to_pylist(),
                                                    threads=self.threads)
                  for start in range(0, kept.num_rows, TOKENIZE_ROWS)]
        tokens = pa.chunked_array(chunks, pa.list_(pa.int32()))
        lengths = pc.list_value_length(tokens).to_numpy().astype(np.int64)
        for split in layout.SPLITS:
            chosen = np.fromiter((s == split for s in splits), bool, len(splits))
            out.count(f"documents.{split}", int(chosen.sum()))
            out.count(f"tokens.{split}", int(lengths[chosen].sum()))
        out.count("documents_kept", kept.num_rows)
        out.count("tokens", int(lengths.sum()))
        table = (kept.append_column("split", pa.array(splits, pa.string()))
                 .append_column("tokens", tokens)
                 .select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA))
        if self.final:
            out.write_table(layout.documents_file(self.folder, bucket), table)
        else:  # scratch for near dedup, whose apply step writes the documents file
            out.write_scratch(layout.deduped_file(self.folder, bucket), table)
