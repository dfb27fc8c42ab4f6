"""The one file layer of a build: every file `lory build-corpus` reads or writes, in the
driver and in every worker, goes through here (Beam's `FileSystems`), so `--out` and the
inputs may live on any filesystem Beam serves: local disk, s3://, gs://, hdfs://.

- Paths are plain strings; nothing assumes a local folder another process could not see.
- A write is atomic per file: on local disk a temp name then a rename; on an object store
  the object appears whole when its upload completes. A retried task replaces a file whole
  and a reader never sees half of one. Nothing relies on renaming folders.
- S3 goes through Beam's S3 filesystem classes with one client per process (Beam's
  `S3FileSystem` builds a new boto3 client for every call, 0.1-2 s each); its endpoint and
  credentials come from the standard AWS environment (`configure`).
"""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.aws import s3io
from apache_beam.io.aws.clients.s3 import boto3_client
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.value_provider import RuntimeValueProvider

from lorydata.inputs import default_lister

_RAW = CompressionTypes.UNCOMPRESSED
# Standard AWS environment variables → Beam's S3 options, for those the user did not give.
_AWS_ENV = {
    "AWS_ENDPOINT_URL_S3": "s3_endpoint_url",
    "AWS_ENDPOINT_URL": "s3_endpoint_url",
    "AWS_ACCESS_KEY_ID": "s3_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "s3_secret_access_key",
    "AWS_SESSION_TOKEN": "s3_session_token",
    "AWS_REGION": "s3_region_name",
    "AWS_DEFAULT_REGION": "s3_region_name",
}
_s3: dict[int, s3io.S3IO] = {}  # one S3 client per process (pid: forked workers make their own)


# ---- configuration -----------------------------------------------------------------------
def s3_flags(flags: list[str]) -> list[str]:
    """`flags` plus Beam S3 options taken from the standard AWS environment for every S3
    option `flags` does not set, so workers that do not share the driver's environment
    (a Dask cluster started elsewhere) reach the same endpoint."""
    given = {flag.split("=", 1)[0].removeprefix("--") for flag in flags}
    extra = {}
    for variable, option in _AWS_ENV.items():
        if option not in given and option not in extra and os.environ.get(variable):
            extra[option] = os.environ[variable]
    return [*flags, *(f"--{option}={value}" for option, value in extra.items())]


def configure(flags: list[str]) -> None:
    """Give Beam's filesystems (this process's) the pipeline options: S3 endpoint and
    credentials from `flags` or the AWS environment."""
    FileSystems.set_options(PipelineOptions(s3_flags(flags)))
    _s3.clear()


def _s3io() -> s3io.S3IO:
    client = _s3.get(os.getpid())
    if client is None:
        options = FileSystems._pipeline_options or RuntimeValueProvider.runtime_options
        client = _s3[os.getpid()] = s3io.S3IO(client=boto3_client.Client(options or PipelineOptions(s3_flags([]))))
    return client


def scheme(path: str) -> str:
    """"s3", "gs", ... for URLs, "" for local paths."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep and head.lower() != "file" else ""


def is_local(path: str) -> bool:
    return scheme(path) == ""


def _local(path: str) -> str:
    return str(path).removeprefix("file://")


# ---- names -------------------------------------------------------------------------------
def join(base: str, *parts: str) -> str:
    return FileSystems.join(str(base), *parts)


def stem(path: str) -> str:
    """The file name without its folder and extension: `.../b00012.parquet` → `b00012` (bucket
    and cell files are named after the documents file they belong to)."""
    return str(path).rsplit("/", 1)[-1].rsplit(".", 1)[0]


def basename(path: str) -> str:
    """The last component of a path or URL."""
    return posixpath.basename(str(path).rstrip("/"))


def dirname(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0]


def relative(path: str, folder: str) -> str:
    """`path` relative to `folder`, which must contain it."""
    folder = str(folder).rstrip("/") + "/"
    if not str(path).startswith(folder):
        raise ValueError(f"{path} is not inside {folder}")
    return str(path)[len(folder):]


# ---- bytes -------------------------------------------------------------------------------
def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    if scheme(path) == "s3":
        with _s3io().open(path, "w") as f:
            f.write(data)
        return
    if not is_local(path):
        with FileSystems.create(path, compression_type=_RAW) as f:
            f.write(data)
        return
    path = _local(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.inprogress"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; False when it does. Atomic on local
    disk (O_EXCL) and on S3 (`If-None-Match: *`); elsewhere a check then a write."""
    if scheme(path) == "s3":
        bucket, key = s3io.parse_s3_path(path)
        try:
            _s3io().client.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # botocore ClientError: 412 PreconditionFailed when the object exists
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise
        return True
    if not is_local(path):
        if exists(path):
            return False
        write_bytes(path, data)
        return True
    path = _local(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def open_read(path: str):
    """A seekable binary file object for reading."""
    if scheme(path) == "s3":
        return _s3io().open(path, "r")
    if is_local(path):
        return open(_local(path), "rb")
    return FileSystems.open(path, compression_type=_RAW)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def exists(path: str) -> bool:
    if scheme(path) == "s3":
        return _s3io().exists(path)
    if is_local(path):
        return os.path.exists(_local(path))
    return FileSystems.exists(path)


def size(path: str) -> int:
    """Bytes of one file."""
    if scheme(path) == "s3":
        return _s3io().size(path)
    if is_local(path):
        return os.path.getsize(_local(path))
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def sizes(folder: str) -> dict[str, int]:
    """{path: bytes} of every file below `folder` (one listing on an object store)."""
    folder = str(folder).rstrip("/")
    if scheme(folder) == "s3":
        return {path: size for path, (size, _) in _s3io().list_files(folder + "/", with_metadata=True)}
    if is_local(folder):
        found = {}
        for root, _, names in os.walk(_local(folder)):
            for name in names:
                if not name.endswith(".inprogress"):
                    found[os.path.join(root, name)] = os.path.getsize(os.path.join(root, name))
        return found
    metadata = FileSystems.match([folder + "/**"])[0].metadata_list
    return {m.path: m.size_in_bytes for m in metadata}


def lister(pattern: str) -> list[str]:
    """Files a glob matches (`*` and `**` may cross folders on object stores), or the path
    itself when it names a file: what `lorydata.inputs.select_inputs` lists inputs with."""
    if is_local(pattern):
        return default_lister(pattern)
    if not any(c in pattern for c in "*?["):
        return [pattern] if exists(pattern) else []
    fixed = pattern[: min(pattern.find(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
    return sorted(path for path in sizes(fixed) if fnmatch.fnmatchcase(path, pattern))


def opener(path: str):
    """A binary file of `path` (compressed files come as they are stored: lory decompresses
    by suffix): what `lorydata.readers.read_file` opens inputs with."""
    return open_read(path)


def match(pattern: str) -> list[str]:
    """Sorted files matching a glob whose wildcards are in its last component (empty when
    none); files being written are left out."""
    if scheme(pattern) == "s3":
        folder, name = pattern.rsplit("/", 1)
        found = [path for path, _ in _s3io().list_files(folder + "/")
                 if "/" not in path[len(folder) + 1:] and fnmatch.fnmatchcase(basename(path), name)]
    else:
        found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    return sorted(path for path in found if not path.endswith(".inprogress"))


def is_empty_folder(folder: str, ignore: tuple[str, ...] = ()) -> bool:
    """True when nothing is stored below `folder` (or it does not exist), but for the
    entries named in `ignore`."""
    if is_local(folder):
        folder = _local(folder)
        return not os.path.isdir(folder) or all(entry.name in ignore for entry in os.scandir(folder))
    return all(relative(path, folder).split("/")[0] in ignore for path in sizes(folder))


# ---- whole files and folders -------------------------------------------------------------
def delete_tree(path: str) -> None:
    """Remove a file or a folder (everything below the prefix, on an object store)."""
    if scheme(path) == "s3":
        path = str(path).rstrip("/")
        if _s3io().exists(path):
            _s3io().delete(path)
        if sizes(path):
            _s3io().delete_tree(path + "/")
        return
    if FileSystems.exists(path):
        FileSystems.delete([path])


def rename(source: str, target: str) -> None:
    """Move one file (the target must not exist)."""
    if scheme(source) == "s3":
        _s3io().rename(source, target)
    else:
        FileSystems.rename([source], [target])


def copy(source: str, target: str) -> None:
    """Copy one file: server-side on an object store; on local disk a hard link where the
    filesystem allows one (files are never changed once written, so a link is a copy)."""
    if scheme(source) == "s3":
        _s3io().copy(source, target)
    elif is_local(source):
        source, target = _local(source), _local(target)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if os.path.exists(target):
            os.unlink(target)
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or no links here
            write_bytes(target, read_bytes(source))
    else:
        FileSystems.copy([source], [target])


_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_failure(exc: BaseException) -> str | None:
    """The reason when `exc` (or the text Beam wrapped a worker's error in) is a write that
    the storage refused (full disk, quota, file size limit, read-only), else None."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_FAILURES:
        return exc.strerror or os.strerror(exc.errno)
    for code in _WRITE_FAILURES:
        if f"[Errno {code}]" in str(exc):
            return os.strerror(code)
    return None


# ---- serialisations (bytes, so commits can record size and hash) -------------------------
def table_bytes(table: pa.Table, row_group_rows: int = 1024) -> bytes:
    """A table as zstd Parquet."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
    return sink.getvalue().to_pybytes()


def ipc_bytes(table: pa.Table, compression: str | None = None) -> bytes:
    """A table as an Arrow IPC file (buffers compressed with `compression`: None, lz4, zstd)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def scratch_compression(path: str) -> str | None:
    """Buffer compression of a scratch table (one the next step reads once, then removed) at
    `path`: none on local disk, where writing and reading raw Arrow costs least (lz4 would
    take 3x the time of the write for text, zstd Parquet 5x); lz4 on a remote filesystem,
    where the bytes cost more than the CPU."""
    return None if is_local(path) else "lz4"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def write_table(path: str, table: pa.Table, row_group_rows: int = 1024) -> None:
    write_bytes(path, table_bytes(table, row_group_rows))


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, or an Arrow IPC file (`.arrow`, `ipc_bytes`), as a table."""
    if str(path).endswith(".arrow"):
        table = pa.ipc.open_file(pa.BufferReader(read_bytes(path))).read_all()
        return table.select(columns) if columns is not None else table
    with open_read(path) as f:
        return pq.read_table(f, columns=columns)


def read_tables(paths: list[str], columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Several Parquet or Arrow IPC files (`read_table`) as one table, in the order given."""
    tables = [read_table(p, columns) for p in paths]
    if not tables:
        if schema is None:
            raise ValueError("no files to read and no schema for an empty table")
        fields = [schema.field(c) for c in columns] if columns else list(schema)
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables)


def save_npy(path: str, array: np.ndarray) -> None:
    write_bytes(path, npy_bytes(array))


def load_npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def load_npy_rows(path: str, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted, unique) of a 2-d C-order .npy file, read by seeking to each run
    of consecutive rows: a few kilobytes of a large file, on local disk and object stores
    (whose readers fetch byte ranges)."""
    rows = np.asarray(rows, dtype=np.int64)
    with open_read(path) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-d C-order array, got shape {shape}")
        row_bytes, offset = int(shape[1]) * dtype.itemsize, f.tell()
        out = np.empty((len(rows), shape[1]), dtype=dtype)
        if not len(rows):
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run_start, run_end in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist(), strict=True):
            first, count = int(rows[run_start]), run_end - run_start
            f.seek(offset + first * row_bytes)
            data = f.read(count * row_bytes)
            out[run_start:run_end] = np.frombuffer(data, dtype=dtype).reshape(count, shape[1])
    return out


def save_npz(path: str, **arrays: np.ndarray) -> None:
    write_bytes(path, npz_bytes(**arrays))


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def save_json(path: str, value) -> None:
    write_bytes(path, json_bytes(value))


def load_json(path: str):
    return json.loads(read_bytes(path))
