"""Readers for text dumps: JSON lines (plain, .zst, .gz), Parquet and .txt files.

Every reader yields `Document`s and `DeadLetter`s; bad data becomes a dead letter with its
source, line and reason, never an exception. Only input selection raises (`expand_inputs`,
`select_inputs`, before any work starts).

Reading limits (what becomes a dead letter instead of exhausting memory or the stack):
- a line longer than `max_line_bytes` (64 MiB by default) is `line_too_long`; it is skipped
  in 1 MiB pieces, never held whole, and compressed input is decompressed in bounded
  pieces (`lorydata.compression`). Peak memory thus depends on `max_line_bytes`, never on
  the input: measured ~190 MB for a 2 GiB zstd bomb line, ~410 MB for a line just under
  64 MiB of 4-byte characters (the parsed text takes 4 bytes a character);
- JSON nested deeper than `max_json_depth` (128) is `json_too_deep`;
- a text longer than `max_chars` is `too_long`.

JSON lines are parsed with orjson; a line orjson refuses (lone surrogate escapes, NaN,
invalid UTF-8, which the standard library takes or repairs) and any field value it would
read as a float (orjson turns integers beyond 64 bits into floats) are parsed again with
the standard `json` module, so documents are exactly those of `json.loads`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson

from lorydata.compression import STREAM_ERRORS, Opener, open_binary, open_stream
from lorydata.documents import DeadLetter, Document, DropReason
from lorydata.errors import LoryDataError
from lorydata.fields import MISSING, PathDomain, field_text, get_field, schema_column
from lorydata.inputs import FORMATS, InputSelection, expand_inputs, file_format, select_inputs

__all__ = ["FORMATS", "InputSelection", "ReaderConfig", "decode_utf8", "expand_inputs", "file_format",
           "read_file", "read_inputs", "read_jsonl", "read_parquet", "read_text_file", "select_inputs"]

DEFAULT_MAX_LINE_BYTES = 64 << 20
DEFAULT_MAX_JSON_DEPTH = 128
PARQUET_BATCH_BYTES = 32 << 20  # declared bytes of the wanted columns per Parquet batch
_DRAIN_BYTES = 1 << 20
_REPLACEMENT_BYTES = "\ufffd".encode()
_SNIPPET_CHARS = 200
_MAX_FIELDS = 12


@dataclass(frozen=True)
class ReaderConfig:
    """How to turn records into documents.

    Args:
        text_field: field (jsonl key / Parquet column) that holds the text; a dotted path
            reaches into objects and struct columns (`meta.body`, rule in `lorydata.fields`).
        domain_field: optional field (dotted path) with the document's domain; a value that
            is not a string is stored as canonical JSON (`{"set":"Github"}`), never a repr.
        id_field: optional field (dotted path) with the document id; else a content hash.
        max_chars: documents longer than this are dead-lettered as `too_long`.
        max_line_bytes: JSON lines longer than this (bytes, without the newline) are
            dead-lettered as `line_too_long` without being held whole.
        max_json_depth: JSON lines nested deeper than this are dead-lettered as
            `json_too_deep`.
        domain_from_path: `parent` or a regex with a group: the domain from the file's
            path (`lorydata.fields.PathDomain`); a record's `domain_field`, when given and
            not empty, wins.
    """

    text_field: str = "text"
    domain_field: str | None = None
    id_field: str | None = None
    max_chars: int = 1_000_000
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    domain_from_path: str | None = None

    def __post_init__(self):
        if not self.text_field:
            raise LoryDataError("the text field must not be empty")
        if self.max_line_bytes < 1 or self.max_json_depth < 1 or self.max_chars < 1:
            raise LoryDataError("max_chars, max_line_bytes and max_json_depth must be positive")
        if self.domain_from_path:
            PathDomain(self.domain_from_path)  # a bad regex is an error now, not per file

    def check_paths(self, files: Sequence[str]) -> None:
        """Refuse, before any reading, files whose path the `domain_from_path` regex misses.

        Raises:
            LoryDataError: naming the first such files.
        """
        if not self.domain_from_path:
            return
        missed = PathDomain(self.domain_from_path).unmatched(list(files))
        if missed:
            more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
            raise LoryDataError(f"--domain-from-path {self.domain_from_path!r} does not match "
                                f"{', '.join(missed[:3])}{more}")

    def path_domain(self, path: str) -> str:
        """The domain `domain_from_path` gives the documents of `path` ("" when none)."""
        if not self.domain_from_path:
            return ""
        return PathDomain(self.domain_from_path).domain_of(path) or ""


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences; returns the text and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)


def _snippet(raw: bytes | str) -> str:
    if isinstance(raw, bytes | memoryview):
        raw = bytes(raw[: _SNIPPET_CHARS * 4]).decode("utf-8", errors="replace")
    return raw[:_SNIPPET_CHARS]


def _iter_lines(stream, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (line, 0), or (first bytes, total length) for a line longer than `max_bytes`,
    which is skipped in `_DRAIN_BYTES` pieces and never held whole."""
    readline = stream.readline
    while True:
        line = readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line, 0
            continue
        head, total = line[: _SNIPPET_CHARS * 4], len(line)
        del line
        while True:
            rest = readline(_DRAIN_BYTES)
            total += len(rest)
            if not rest or rest.endswith(b"\n"):
                break
        yield head, total


class _Drop(Exception):
    def __init__(self, reason: str, detail: str, snippet: str):
        self.reason, self.detail, self.snippet = reason, detail, snippet


def _deeper_than(value, limit: int) -> bool:
    """Whether containers nest deeper than `limit` in `value` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _has_float(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return isinstance(value, list) and any(_has_float(v) for v in value)


def _parse(raw: bytes, max_depth: int, exact: bool = False) -> tuple[dict, int]:
    """One JSON line → (object, UTF-8 replacements); raises `_Drop`. `exact` skips orjson."""
    if not exact:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, with its own message
        else:
            return _checked(value, raw, max_depth, 0, exact=False)
    text, replacements = decode_utf8(raw)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Drop(DropReason.MALFORMED_JSON, str(exc), _snippet(text)) from None
    except RecursionError:
        raise _Drop(DropReason.JSON_TOO_DEEP, f"JSON nested deeper than max_json_depth {max_depth}",
                    _snippet(text)) from None
    return _checked(value, raw, max_depth, replacements, exact=True)


def _nested(value) -> bool:
    if isinstance(value, dict):
        return any(isinstance(v, dict | list) for v in value.values())
    return isinstance(value, list) and bool(value)


def _checked(value, raw: bytes, max_depth: int, replacements: int, exact: bool) -> tuple[dict, int]:
    # Most records hold no containers; else depth never exceeds the number of opening
    # brackets: count those before walking.
    if _nested(value) and raw.count(b"[") + raw.count(b"{") > max_depth and _deeper_than(value, max_depth):
        raise _Drop(DropReason.JSON_TOO_DEEP, f"JSON nested deeper than max_json_depth {max_depth}", _snippet(raw))
    if not isinstance(value, dict):
        if not exact:
            return _parse(raw, max_depth, exact=True)  # the exact type name for the detail
        raise _Drop(DropReason.MALFORMED_JSON, f"a JSON {type(value).__name__}, not an object", _snippet(raw))
    return value, replacements


def _record_to_document(record, source: str, line: int, replacements: int, config: ReaderConfig,
                        path_domain: str = "", exact: bool = True):
    """One parsed record (dict) → a Document or a DeadLetter; None when a value is a float
    that orjson read (`exact` False) and the record must be parsed again with `json`."""
    text = get_field(record, config.text_field)
    if text is MISSING:
        fields = tuple(sorted(map(str, record))[:_MAX_FIELDS])
        return DeadLetter(source, line, DropReason.MISSING_TEXT, f"no field {config.text_field!r}", fields=fields)
    domain = get_field(record, config.domain_field) if config.domain_field else None
    doc_id = get_field(record, config.id_field) if config.id_field else None
    if not exact and (isinstance(text, float) or _has_float(domain) or _has_float(doc_id)):
        return None
    if not isinstance(text, str):
        kind = type(text).__name__
        return DeadLetter(source, line, DropReason.NON_STRING_TEXT, f"field {config.text_field!r} is {kind}")
    if len(text) > config.max_chars:
        return DeadLetter(
            source, line, DropReason.TOO_LONG, f"{len(text)} chars > max_chars {config.max_chars}", _snippet(text)
        )
    return Document(field_text(doc_id), text, source, line, field_text(domain) or path_domain, replacements)


def read_jsonl(path: str, config: ReaderConfig, fmt: str = "jsonl",
               opener: Opener | None = None) -> Iterator[Document | DeadLetter]:
    """Read a (possibly compressed) JSON-lines file; one record per non-blank line."""
    line_no = 0
    path_domain = config.path_domain(path)
    max_bytes, max_depth = config.max_line_bytes, config.max_json_depth
    try:
        with open_stream(path, fmt, opener) as stream:
            for line_no, (raw, oversized) in enumerate(_iter_lines(stream, max_bytes), start=1):
                if oversized:
                    detail = f"line of {oversized} bytes > max_line_bytes {max_bytes}"
                    yield DeadLetter(path, line_no, DropReason.LINE_TOO_LONG, detail, _snippet(raw))
                    continue
                if not raw.strip():
                    continue
                try:
                    record, replacements = _parse(raw, max_depth)
                    doc = _record_to_document(record, path, line_no, replacements, config, path_domain, False)
                    if doc is None:
                        record, replacements = _parse(raw, max_depth, exact=True)
                        doc = _record_to_document(record, path, line_no, replacements, config, path_domain)
                except _Drop as drop:
                    doc = DeadLetter(path, line_no, drop.reason, drop.detail, drop.snippet)
                yield doc
    except STREAM_ERRORS as exc:  # truncated or corrupt stream
        # Documents before the damage were already yielded and are kept.
        yield DeadLetter(path, line_no + 1, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")


def _parquet_batch_rows(pf, columns: set[str], most: int) -> int:
    """Rows per batch so a batch holds about `PARQUET_BATCH_BYTES` of the wanted columns."""
    widest = 0.0
    for i in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(i)
        size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                   if group.column(j).path_in_schema.split(".")[0] in columns
                   or group.column(j).path_in_schema in columns)
        if group.num_rows:
            widest = max(widest, size / group.num_rows)
    return max(1, min(most, int(PARQUET_BATCH_BYTES / widest))) if widest else most


def read_parquet(path: str, config: ReaderConfig, batch_rows: int = 1024,
                 opener: Opener | None = None) -> Iterator[Document | DeadLetter]:
    """Read a Parquet file; one record per row (numbered from 1). Dotted fields reach into
    struct columns; only the columns they need are read."""
    import pyarrow.parquet as pq  # only Parquet inputs need it

    path_domain = config.path_domain(path)
    try:
        with (opener or open_binary)(path) as raw:
            pf = pq.ParquetFile(raw, buffer_size=1 << 20)  # stream column chunks page by page
            schema = pf.schema_arrow
            text_column = schema_column(schema, config.text_field)
            if text_column is None:
                rows = pf.metadata.num_rows
                detail = f"no column {config.text_field!r} ({rows} rows)"
                yield DeadLetter(path, 0, DropReason.MISSING_TEXT, detail,
                                 fields=tuple(sorted(schema.names)[:_MAX_FIELDS]), records=rows)
                return
            wanted = {text_column} | {schema_column(schema, f) for f in (config.domain_field, config.id_field) if f}
            wanted.discard(None)
            row = 0
            batch_size = _parquet_batch_rows(pf, wanted, batch_rows)
            for batch in pf.iter_batches(batch_size=batch_size, columns=sorted(wanted)):
                for record in batch.to_pylist():
                    row += 1
                    yield _record_to_document(record, path, row, 0, config, path_domain)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid derives from ValueError
        yield DeadLetter(path, 0, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")


def read_text_file(path: str, config: ReaderConfig, opener: Opener | None = None) -> Iterator[Document | DeadLetter]:
    """Read a whole .txt file as one document (line 0)."""
    limit = 4 * config.max_chars + 4
    try:
        with (opener or open_binary)(path) as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        yield DeadLetter(path, 0, DropReason.UNREADABLE, f"{type(exc).__name__}: {exc}")
        return
    if len(raw) > limit:
        yield DeadLetter(path, 0, DropReason.TOO_LONG, f"file larger than {limit} bytes", _snippet(raw))
        return
    text, replacements = decode_utf8(raw)
    plain = ReaderConfig(max_chars=config.max_chars)  # a .txt file has no fields
    yield _record_to_document({"text": text}, path, 0, replacements, plain, config.path_domain(path))


def read_file(path: str, config: ReaderConfig, opener: Opener | None = None) -> Iterator[Document | DeadLetter]:
    """Read one file of any supported format.

    Args:
        path: a local path or URL with a supported suffix (see `lorydata.inputs.FORMATS`).
        config: field names and limits.
        opener: path → binary file object (e.g. Beam's `FileSystems.open`); local files and
            fsspec URLs when None.
    """
    fmt = file_format(path)
    if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
        return read_jsonl(path, config, fmt, opener)
    if fmt == "parquet":
        return read_parquet(path, config, opener=opener)
    if fmt == "txt":
        return read_text_file(path, config, opener)
    raise LoryDataError(f"unsupported input format: {path}")


def read_inputs(inputs: Sequence[str], config: ReaderConfig) -> Iterator[Document | DeadLetter]:
    """Read every data file selected from `inputs` (`select_inputs`), in sorted path order.

    Raises:
        InputNotFoundError: before reading anything, when an input matches no file.
    """
    files = expand_inputs(inputs)

    def generate():
        for path in files:
            yield from read_file(path, config)

    return generate()
