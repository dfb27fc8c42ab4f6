"""A shard folder's sequences in `seq_id` order, streamed in chunks.

Shards hold sequences in a seeded shuffle (every shard is a uniform sample of the split), so
`seq_id` order needs a gather across all of them. Shards are read one at a time and appended,
uncompressed, to one staging Arrow file; that file is then memory-mapped and read back a
chunk of `seq_id`s at a time (`Table.take` of the chunk's rows). Memory stays about one
shard plus one chunk; disk holds the staging file (the folder's tokens uncompressed, 4 bytes
each) until `close()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from lorydata.errors import ShardError
from lorydata.manifest import Manifest
from lorydata.progress import progress_bar
from lorydata.shards import read_shard, shard_schema

STAGING_NAME = ".staging.arrow"


class SeqIdOrder:
    """Stage the shards of `folder` so they can be read in `seq_id` order.

    Args:
        folder: a shard folder.
        scratch: a folder for the staging file (created if missing).

    Raises:
        ShardError: a shard is unreadable or disagrees with the manifest, or the seq_ids are
            not exactly 0 .. rows - 1 (each once).
    """

    def __init__(self, folder: str | Path, scratch: str | Path):
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.seq_len = self.manifest.seq_len
        self.num_rows = self.manifest.num_rows
        self._path = Path(scratch) / STAGING_NAME
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._stage()
        self._source = pa.memory_map(str(self._path))
        self._table = pa.ipc.open_file(self._source).read_all()  # zero-copy: uncompressed
        seq_ids = self._table.column("seq_id").to_numpy()
        self._order = np.argsort(seq_ids, kind="stable")
        if not np.array_equal(seq_ids[self._order], np.arange(self.num_rows)):
            raise ShardError(f"{self.folder}: seq_ids are not 0..{self.num_rows - 1} each once; cannot order by seq_id")

    def _stage(self) -> None:
        schema = shard_schema(self.seq_len)
        with pa.OSFile(str(self._path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for entry in progress_bar(self.manifest.shards, description="reading shards"):
                table = read_shard(self.folder / entry.file, self.seq_len)
                if table.num_rows != entry.rows:
                    raise ShardError(f"shard {entry.file} has {table.num_rows} rows, manifest says {entry.rows}")
                writer.write_table(table)

    def chunks(self, rows: int) -> Iterator[pa.Table]:
        """Tables of up to `rows` sequences each, in `seq_id` order (the shard schema)."""
        for start in range(0, self.num_rows, rows):
            yield self._table.take(pa.array(self._order[start : start + rows]))

    def close(self) -> None:
        """Release and delete the staging file."""
        self._table = None
        self._source.close()
        if self._path.exists():
            os.unlink(self._path)

    def __enter__(self) -> SeqIdOrder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
