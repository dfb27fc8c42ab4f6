"""The records that flow through the data path: documents and dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class DropReason:
    """Why a record left the data path. The values are what manifests and dead letters use."""

    MALFORMED_JSON = "malformed_json"
    JSON_TOO_DEEP = "json_too_deep"
    LINE_TOO_LONG = "line_too_long"
    MISSING_TEXT = "missing_text"
    NON_STRING_TEXT = "non_string_text"
    EMPTY = "empty"
    BINARY = "binary"
    TOO_LONG = "too_long"
    TOO_SHORT = "too_short"
    UNREADABLE = "unreadable"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    SEMANTIC_DUPLICATE = "semantic_duplicate"


@dataclass
class Document:
    """One text document with where it came from.

    Args:
        id: stable id: the `--id-field` value when given, else a hash of the cleaned text.
        text: the document text (cleaned once it passed `clean_document`).
        source: path or URL of the file it was read from.
        line: 1-based line number (jsonl), row number (parquet) or 0 (a whole .txt file).
        domain: value of the `--domain-field` (canonical JSON when it is not a string), else
            the domain of its path (`--domain-from-path`), else "".
        replacements: invalid UTF-8 sequences replaced by U+FFFD while decoding.
        content_hash: hash of the cleaned text, the key of exact dedup (set by cleaning).
    """

    id: str
    text: str
    source: str
    line: int = 0
    domain: str = ""
    replacements: int = 0
    content_hash: str = ""


@dataclass
class DeadLetter:
    """A record that was dropped, with enough context to find and fix it.

    Args:
        source: file the record came from.
        line: 1-based line / row number, 0 for whole files.
        reason: one of `DropReason`.
        detail: human-readable detail (parser message, length, ...).
        snippet: the first characters of the offending record.
        fields: top-level field names of a record that lacked the wanted field (for the
            per-file summary; not written to dead-letter files).
        records: how many records this letter stands for: 1, or the rows of a whole file
            dropped at once (not written to dead-letter files).
    """

    source: str
    line: int
    reason: str
    detail: str = ""
    snippet: str = ""
    fields: tuple[str, ...] = field(default=(), compare=False, repr=False)
    records: int = field(default=1, compare=False, repr=False)

    def to_json(self) -> str:
        record = {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail,
                  "snippet": self.snippet}
        return json.dumps(record, ensure_ascii=False)
