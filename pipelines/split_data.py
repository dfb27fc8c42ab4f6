"""Loading one split of the documents stage's Parquet output into memory, in canonical order.

Beam writes documents in whatever order its workers finish. Everything after stage 1 works
on documents sorted by content hash, so the walk, the packing and the shards depend only
on the documents themselves, never on scheduling or worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class SplitDocuments:
    """The documents of one split, sorted by content hash.

    Args:
        hashes: content hash of every document.
        domains: domain of every document ("" when unknown).
        token_values: all documents' tokens, concatenated.
        token_offsets: document i's tokens are `token_values[token_offsets[i]:token_offsets[i+1]]`.
    """

    hashes: np.ndarray
    domains: np.ndarray
    token_values: np.ndarray
    token_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    def tokens(self, i: int) -> np.ndarray:
        return self.token_values[self.token_offsets[i] : self.token_offsets[i + 1]]

    @property
    def token_counts(self) -> np.ndarray:
        return np.diff(self.token_offsets)


def _parquet_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(folder.glob(f"{prefix}-*.parquet"))


def load_split(documents_dir: str | Path, split: str) -> SplitDocuments:
    """Read the split's documents (hash, domain, tokens) of every bucket, sorted by hash."""
    import pyarrow.compute as pc

    from pipelines.documents_stage import bucket_files

    columns = ["content_hash", "domain", "tokens", "split"]
    tables = [pq.read_table(f, columns=columns) for f in bucket_files(documents_dir)]
    tables = [t.filter(pc.equal(t.column("split"), split)) for t in tables]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        empty = np.array([], dtype=object)
        return SplitDocuments(empty, empty, np.array([], np.int32), np.zeros(1, np.int64))
    table = pa.concat_tables(tables).sort_by("content_hash")
    tokens = table.column("tokens").combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    # Re-base: a sliced list array's offsets need not start at zero.
    return SplitDocuments(
        hashes=np.asarray(table.column("content_hash").to_pylist(), dtype=object),
        domains=np.asarray(table.column("domain").to_pylist(), dtype=object),
        token_values=values[offsets[0] : offsets[-1]],
        token_offsets=offsets - offsets[0],
    )


def load_embeddings(embeddings_dir: str | Path, split: str, hashes: np.ndarray) -> np.ndarray:
    """Embeddings of `split`, row-aligned with `hashes` (sorted content hashes).

    Raises:
        ValueError: when a document has no embedding (a stage-order bug, not user input).
    """
    files = _parquet_files(Path(embeddings_dir), split)
    tables = [t for t in (pq.read_table(f) for f in files) if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32)
    table = pa.concat_tables(tables).sort_by("content_hash")
    found = np.asarray(table.column("content_hash").to_pylist(), dtype=object)
    if len(found) != len(hashes) or not np.array_equal(found, hashes):
        raise ValueError(f"embeddings of split {split} do not match its documents ({len(found)} vs {len(hashes)})")
    column = table.column("embedding").combine_chunks()
    dim = len(column[0])
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
