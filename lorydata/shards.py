"""Arrow IPC shards with zstd compression, in the version-1 schema.

One row per training sequence:

- `input_ids`: fixed_size_list<int32>[seq_len]
- `doc_starts`: list<int32>, offsets where a document (or its continuation) begins
- `domains`: list<string>, one per entry of `doc_starts`
- `seq_id`: int64, the sequence's position in the walk order

Any Arrow reader (pyarrow, Hugging Face datasets, polars, DuckDB) opens the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from lorydata.errors import ShardError
from lorydata.manifest import ShardInfo, atomic_write_bytes
from lorydata.pack import PackedSequence

SHARD_SUFFIX = ".arrow"
BATCH_ROWS = 256  # rows per record batch inside a shard: the unit of decompression
_SCHEMA_METADATA = {b"lory.format": b"lory-shards", b"lory.format_version": b"1"}


def shard_schema(seq_len: int) -> pa.Schema:
    """The version-1 schema for sequences of `seq_len` tokens."""
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), seq_len), nullable=False),
            pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
            pa.field("domains", pa.list_(pa.string()), nullable=False),
            pa.field("seq_id", pa.int64(), nullable=False),
        ],
        metadata=_SCHEMA_METADATA,
    )


def sequences_to_table(sequences: list[PackedSequence], seq_len: int) -> pa.Table:
    """Build a shard table from packed sequences."""
    ids = np.stack([s.input_ids for s in sequences]) if sequences else np.empty((0, seq_len), np.int32)
    if ids.shape[1:] != (seq_len,):
        raise ValueError(f"sequences have {ids.shape[1:]} tokens, expected ({seq_len},)")
    input_ids = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), seq_len)
    return pa.Table.from_arrays(
        [
            input_ids,
            pa.array([s.doc_starts for s in sequences], pa.list_(pa.int32())),
            pa.array([s.domains for s in sequences], pa.list_(pa.string())),
            pa.array([s.seq_id for s in sequences], pa.int64()),
        ],
        schema=shard_schema(seq_len),
    )


def table_to_ipc_bytes(table: pa.Table, compression: str | None = "zstd") -> bytes:
    """Serialise a table as an Arrow IPC file (zstd-compressed buffers by default)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def write_shard(table: pa.Table, folder: str | Path, name: str) -> ShardInfo:
    """Write one shard atomically and return its manifest entry."""
    data = table_to_ipc_bytes(table)
    atomic_write_bytes(Path(folder) / name, data)
    return ShardInfo.of(name, data, table.num_rows)


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:05d}{SHARD_SUFFIX}"


class ShuffledShardWriter:
    """Collects sequences in packing order and writes them as shuffled shards.

    Sequences are first appended to an uncompressed staging file, so memory stays bounded
    by one batch; `finish()` then memory-maps it, draws a seeded permutation of all rows
    and writes `rows_per_shard` rows at a time as compressed shards. The permutation makes
    neighbouring sequences of a batch come from different parts of the walk, while each
    sequence stays internally coherent.

    Args:
        folder: output folder (created).
        seq_len: tokens per sequence.
        rows_per_shard: rows per shard file (the last one may have fewer).
        seed: seed of the permutation; same sequences + seed give byte-identical shards.
        shuffle: off writes the rows in packing order (for inspection and tests).
    """

    def __init__(self, folder: str | Path, seq_len: int, rows_per_shard: int = 1024, seed: int = 0,
                 shuffle: bool = True):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.rows_per_shard, self.seed, self.shuffle = seq_len, rows_per_shard, seed, shuffle
        self._staging_path = self.folder / ".staging.arrow"
        self._sink = pa.OSFile(str(self._staging_path), "wb")
        self._writer = pa.ipc.new_file(self._sink, shard_schema(seq_len))
        self._pending: list[PackedSequence] = []
        self.rows = 0

    def add(self, sequence: PackedSequence) -> None:
        self._pending.append(sequence)
        if len(self._pending) >= BATCH_ROWS:
            self._flush()

    def add_all(self, sequences: Iterable[PackedSequence]) -> None:
        for sequence in sequences:
            self.add(sequence)

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(sequences_to_table(self._pending, self.seq_len))
            self.rows += len(self._pending)
            self._pending = []

    def finish(self, prefix: str = "shard") -> list[ShardInfo]:
        """Write the shards and delete the staging file; returns the shard entries in order."""
        self._flush()
        self._writer.close()
        self._sink.close()
        try:
            with pa.memory_map(str(self._staging_path)) as source:
                staged = pa.ipc.open_file(source).read_all()
                order = np.arange(self.rows)
                if self.shuffle:
                    order = np.random.default_rng(self.seed).permutation(self.rows)
                shards = []
                for index, start in enumerate(range(0, self.rows, self.rows_per_shard)):
                    rows = staged.take(pa.array(order[start : start + self.rows_per_shard]))
                    shards.append(write_shard(rows, self.folder, shard_name(index, prefix)))
                del staged
        finally:
            os.unlink(self._staging_path)
        return shards


def read_shard(path: str | Path | pa.Buffer, seq_len: int | None = None, *, name: str | None = None) -> pa.Table:
    """Read a whole shard, checking its schema.

    Args:
        path: the shard file, or its bytes (e.g. memory-mapped from a cache).
        seq_len: the sequence length its schema must have (default: whatever it holds).
        name: what to call it in messages (default: the file name).

    Raises:
        ShardError: naming the file when it is missing, truncated, corrupt or of another schema.
    """
    buffered = isinstance(path, pa.Buffer)
    if not buffered:
        path = Path(path)
    name = name or ("(bytes)" if buffered else path.name)
    try:
        with pa.BufferReader(path) if buffered else pa.memory_map(str(path)) as opened:
            table = pa.ipc.open_file(opened).read_all()
    except FileNotFoundError:
        raise ShardError(f"shard missing: {path}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ShardError(f"shard {name} is corrupt or truncated: {exc}") from None
    expected_len = seq_len if seq_len is not None else _seq_len_of(table.schema, name)
    if not table.schema.equals(shard_schema(expected_len), check_metadata=False):
        raise ShardError(f"shard {name} does not have the lory v1 schema (seq_len {expected_len}): {table.schema}")
    return table


def _seq_len_of(schema: pa.Schema, name: str) -> int:
    try:
        return schema.field("input_ids").type.list_size
    except (KeyError, AttributeError):
        raise ShardError(f"shard {name} has no fixed-size input_ids column") from None
