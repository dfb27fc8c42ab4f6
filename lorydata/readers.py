"""Readers for text dumps: jsonl, jsonl.zst, jsonl.gz, parquet and folders of .txt files.

Every reader yields `Document`s and `DeadLetter`s; bad data becomes a dead letter with its
source, line and reason, never an exception. Only a missing input path is an error, and it
is raised by `expand_inputs` before any work starts.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import zstandard

from lorydata.documents import DeadLetter, Document, DropReason
from lorydata.errors import InputNotFoundError, LoryDataError

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.zstd": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".parquet": "parquet",
    ".txt": "txt",
}
_REPLACEMENT_BYTES = "\ufffd".encode()
_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class ReaderConfig:
    """How to turn records into documents.

    Args:
        text_field: field (jsonl key / parquet column) that holds the text.
        domain_field: optional field with the document's domain label.
        id_field: optional field with the document id; else the id is a content hash.
        max_chars: documents longer than this are dead-lettered as `too_long`; lines longer
            than 4 × max_chars bytes are skipped without being parsed, so one enormous line
            cannot exhaust memory.
    """

    text_field: str = "text"
    domain_field: str | None = None
    id_field: str | None = None
    max_chars: int = 1_000_000

    @property
    def max_line_bytes(self) -> int:
        # JSON escaping can double a character's size, and UTF-8 takes up to 4 bytes.
        return 8 * self.max_chars + 1024


def file_format(path: str) -> str | None:
    """The format of `path` by its name, or None when it is not a supported text dump."""
    name = path.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _expand_one(pattern: str) -> list[str]:
    if _is_url(pattern):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        return [p if "://" in p else f"{protocol}://{p}" for p in paths if fs.isfile(p)]
    pattern = pattern.removeprefix("file://")
    if os.path.isdir(pattern):
        found = []
        for root, _dirs, files in os.walk(pattern):
            found.extend(os.path.join(root, f) for f in files if file_format(f))
        return found
    if glob.has_magic(pattern):
        return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return [pattern] if os.path.isfile(pattern) else []


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Resolve paths, globs and folders into a sorted list of supported files.

    Args:
        inputs: files, folders (searched recursively for supported files), glob patterns or
            fsspec URLs.

    Raises:
        InputNotFoundError: naming every input that matched no file, before any reading.
        LoryDataError: when a named file has an unsupported format.
    """
    if not inputs:
        raise InputNotFoundError("no input given")
    files: set[str] = set()
    missing = []
    for pattern in inputs:
        matched = _expand_one(str(pattern))
        if not matched:
            missing.append(str(pattern))
        files.update(matched)
    if missing:
        raise InputNotFoundError(f"input not found: {', '.join(missing)}")
    unsupported = sorted(f for f in files if file_format(f) is None)
    if unsupported:
        supported = ", ".join(sorted(set(FORMATS)))
        raise LoryDataError(f"unsupported input format: {', '.join(unsupported)} (supported: {supported})")
    return sorted(files)


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences; returns the text and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)


def _open_binary(path: str) -> IO[bytes]:
    if _is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path.removeprefix("file://"), "rb")


class _ZstdStream(io.RawIOBase):
    """Decompresses a zstd file frame by frame and raises at EOF inside a frame.

    `zstandard`'s stream reader returns a short read for a truncated file without any
    error; a truncated dump must be reported, so frames are tracked here.
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read, None between frames
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("zstd stream is truncated (the last frame is incomplete)")
                return 0
            self._out = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            parts.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:  # frame complete: what follows starts the next one
                data, self._frame = self._frame.unused_data, None
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_stream(path: str, fmt: str) -> IO[bytes]:
    raw = _open_binary(path)
    if fmt == "jsonl.gz":
        return gzip.GzipFile(fileobj=raw)
    if fmt == "jsonl.zst":
        return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
    return raw


def _iter_lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (line, oversized); an oversized line is skipped in chunks and yielded empty."""
    while True:
        line = stream.readline(max_bytes)
        if not line:
            return
        if len(line) == max_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of the enormous line without holding it
                rest = stream.readline(max_bytes)
                if not rest or rest.endswith(b"\n"):
                    break
            yield b"", True
        else:
            yield line, False


def _snippet(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: _SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:_SNIPPET_CHARS]


def _field_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _record_to_document(record, source: str, line: int, replacements: int, config: ReaderConfig):
    """Turn one parsed record (dict-like) into a Document or a DeadLetter."""
    if config.text_field not in record:
        return DeadLetter(source, line, DropReason.MISSING_TEXT, f"no field {config.text_field!r}")
    text = record[config.text_field]
    if not isinstance(text, str):
        kind = type(text).__name__
        return DeadLetter(source, line, DropReason.NON_STRING_TEXT, f"field {config.text_field!r} is {kind}")
    if len(text) > config.max_chars:
        return DeadLetter(
            source, line, DropReason.TOO_LONG, f"{len(text)} chars > max_chars {config.max_chars}", _snippet(text)
        )
    domain = _field_text(record.get(config.domain_field)) if config.domain_field else ""
    doc_id = _field_text(record.get(config.id_field)) if config.id_field else ""
    return Document(doc_id, text, source, line, domain, replacements)


def read_jsonl(path: str, config: ReaderConfig, fmt: str = "jsonl") -> Iterator[Document | DeadLetter]:
    """Read a (possibly compressed) JSON-lines file; one record per non-blank line."""
    line_no = 0
    try:
        with _open_stream(path, fmt) as stream:
            for line_no, (raw, oversized) in enumerate(_iter_lines(stream, config.max_line_bytes), start=1):
                if oversized:
                    detail = f"line longer than {config.max_line_bytes} bytes"
                    yield DeadLetter(path, line_no, DropReason.TOO_LONG, detail)
                    continue
                if not raw.strip():
                    continue
                text, replacements = decode_utf8(raw)
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield DeadLetter(path, line_no, DropReason.MALFORMED_JSON, str(exc), _snippet(text))
                    continue
                if not isinstance(record, dict):
                    detail = f"a JSON {type(record).__name__}, not an object"
                    yield DeadLetter(path, line_no, DropReason.MALFORMED_JSON, detail, _snippet(text))
                    continue
                yield _record_to_document(record, path, line_no, replacements, config)
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as exc:  # truncated or corrupt stream
        # Documents before the damage were already yielded and are kept.
        yield DeadLetter(path, line_no + 1, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")


def read_parquet(path: str, config: ReaderConfig, batch_rows: int = 1024) -> Iterator[Document | DeadLetter]:
    """Read a parquet file; one record per row. Rows are numbered from 1."""
    import pyarrow.parquet as pq

    try:
        with _open_binary(path) as raw:
            pf = pq.ParquetFile(raw)
            names = set(pf.schema_arrow.names)
            if config.text_field not in names:
                detail = f"no column {config.text_field!r} ({pf.metadata.num_rows} rows)"
                yield DeadLetter(path, 0, DropReason.MISSING_TEXT, detail)
                return
            wanted = [c for c in (config.text_field, config.domain_field, config.id_field) if c in names]
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=sorted(set(wanted))):
                for record in batch.to_pylist():
                    row += 1
                    yield _record_to_document(record, path, row, 0, config)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid derives from ValueError
        yield DeadLetter(path, 0, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")


def read_text_file(path: str, config: ReaderConfig) -> Iterator[Document | DeadLetter]:
    """Read a whole .txt file as one document."""
    limit = 4 * config.max_chars + 4
    try:
        with _open_binary(path) as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        yield DeadLetter(path, 0, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")
        return
    if len(raw) > limit:
        yield DeadLetter(path, 0, DropReason.TOO_LONG, f"file larger than {limit} bytes", _snippet(raw))
        return
    text, replacements = decode_utf8(raw)
    yield _record_to_document({config.text_field: text}, path, 0, replacements, config)


def read_file(path: str, config: ReaderConfig) -> Iterator[Document | DeadLetter]:
    """Read one file of any supported format.

    Args:
        path: a local path or fsspec URL with a supported suffix (see `FORMATS`).
        config: field names and size limits.
    """
    fmt = file_format(path)
    if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
        return read_jsonl(path, config, fmt)
    if fmt == "parquet":
        return read_parquet(path, config)
    if fmt == "txt":
        return read_text_file(path, config)
    raise LoryDataError(f"unsupported input format: {path}")


def read_inputs(inputs: Sequence[str], config: ReaderConfig) -> Iterator[Document | DeadLetter]:
    """Read every file matched by `inputs`, in sorted path order.

    Raises:
        InputNotFoundError: before reading anything, when an input matches no file.
    """
    files = expand_inputs(inputs)

    def generate():
        for path in files:
            yield from read_file(path, config)

    return generate()
