"""File access for pipeline workers, through Beam's `FileSystems`.

Every file a worker reads or writes goes through here, so a build folder may live on any
filesystem Beam knows (local disk, gs://, s3://, hdfs://): the paths are plain strings and
nothing assumes a local temp folder that a remote worker could not see. Writes are atomic
per file (a temp name, then a rename), so a retried bundle replaces a file whole and a
reader never sees half of one.
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_RAW = CompressionTypes.UNCOMPRESSED


def join(base: str, *parts: str) -> str:
    return FileSystems.join(str(base), *parts)


def stem(path: str) -> str:
    """The file name without its folder and extension: `.../b00012.parquet` → `b00012` (bucket
    and cell files are named after the documents file they belong to)."""
    return str(path).rsplit("/", 1)[-1].rsplit(".", 1)[0]


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file beside it, then rename)."""
    tmp = f"{path}.inprogress"
    with FileSystems.create(tmp, compression_type=_RAW) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def open_read(path: str):
    """A seekable binary file object for reading."""
    return FileSystems.open(path, compression_type=_RAW)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def match(pattern: str) -> list[str]:
    """Sorted paths matching a glob (empty when none); files being written are left out."""
    found = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in found if not m.path.endswith(".inprogress"))


def delete_tree(path: str) -> None:
    """Remove a file or folder if it exists."""
    if FileSystems.exists(path):
        FileSystems.delete([path])


def write_table(path: str, table: pa.Table, row_group_rows: int = 1024) -> None:
    """A table as zstd Parquet, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
    write_bytes(path, sink.getvalue().to_pybytes())


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    with open_read(path) as f:
        return pq.read_table(f, columns=columns)


def read_tables(paths: list[str], columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Several Parquet files as one table, in the order given."""
    tables = [read_table(p, columns) for p in paths]
    if not tables:
        if schema is None:
            raise ValueError("no files to read and no schema for an empty table")
        fields = [schema.field(c) for c in columns] if columns else list(schema)
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables)


def save_npy(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_json(path: str, value) -> None:
    write_bytes(path, json.dumps(value, sort_keys=True).encode())


def load_json(path: str):
    return json.loads(read_bytes(path))


def basename(path: str) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(str(path))


def rename(source: str, target: str) -> None:
    """Move one file (the target must not exist)."""
    FileSystems.rename([source], [target])
