"""Fields by path: dotted names into nested records, the text of any field value, and a
document's domain taken from its file's path.

Path rule (jsonl objects and Parquet struct columns alike): a key that equals the whole
path wins, so a field literally named `meta.source` is found as such; otherwise the path is
split at a dot, the longest prefix that is a key holding an object is followed and the rest
is looked up inside it by the same rule (shorter prefixes are tried when a longer one leads
nowhere). `meta.pile_set_name` is `record["meta"]["pile_set_name"]` unless the record has a
key `"meta.pile_set_name"`. Lists are not indexed.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lorydata.errors import LoryDataError

MISSING = object()
"""What `get_field` returns for a path that leads nowhere (None is a present null)."""


def get_field(record: Mapping, path: str):
    """The value at dotted `path` in `record`, or `MISSING` (see the module's path rule)."""
    return _resolve(record, path)[1]


def _resolve(record: Mapping, path: str) -> tuple[str | None, object]:
    """(the top-level key followed, the value) for `path`, or (None, MISSING)."""
    if path in record:
        return path, record[path]
    dot = path.rfind(".")
    while dot > 0:
        inner = record.get(path[:dot], MISSING)
        if isinstance(inner, Mapping):
            found = _resolve(inner, path[dot + 1 :])[1]
            if found is not MISSING:
                return path[:dot], found
        dot = path.rfind(".", 0, dot)
    return None, MISSING


def _shape(arrow_type):
    """An Arrow type as a nested dict of its struct fields (leaves are True)."""
    import pyarrow as pa  # only Parquet inputs need it

    if not pa.types.is_struct(arrow_type):
        return True
    return {arrow_type.field(i).name: _shape(arrow_type.field(i).type) for i in range(arrow_type.num_fields)}


def schema_column(schema, path: str) -> str | None:
    """The top-level column of an Arrow `schema` that holds dotted `path`, or None.

    Struct columns are followed by the same rule as `get_field`, so the rows of the returned
    column, as Python dicts, resolve `path` with `get_field`.
    """
    return _resolve({f.name: _shape(f.type) for f in schema}, path)[0]


def _json_default(value) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)  # dates, decimals and other Parquet scalars


def field_text(value) -> str:
    """The text of a domain or id value: strings as they are, null or missing as "", anything
    else as canonical JSON (sorted keys, no spaces, Unicode kept): `{"a":1,"b":[true,null]}`,
    `3`, `1.5`, `true`. Never a Python repr, and equal objects give equal text whatever
    their key order."""
    if isinstance(value, str):
        return value
    if value is None or value is MISSING:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


@functools.lru_cache(maxsize=64)
def _compile(spec: str) -> re.Pattern:
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise LoryDataError(f"--domain-from-path {spec!r} is not a regular expression: {exc}") from None
    if pattern.groups < 1:
        raise LoryDataError(
            f"--domain-from-path {spec!r} needs a capture group, e.g. 'corpus/([^/]+)/' (or the word 'parent')"
        )
    return pattern


@dataclass(frozen=True)
class PathDomain:
    """A document's domain from its file's path.

    Args:
        spec: `parent` takes the name of the folder holding the file (`pile/Github/00.jsonl`
            → `Github`); anything else is a regular expression searched in the path (with `/`
            separators, as the input was given or listed) whose group named `domain`, or else
            its first group, is the domain: `corpus/([^/]+)/` gives `wiki` for
            `data/corpus/wiki/part-0.txt`.

    Raises:
        LoryDataError: when `spec` is not `parent` and not a regex with a group.
    """

    spec: str

    def __post_init__(self):
        if self.spec != "parent":
            _compile(self.spec)

    def domain_of(self, path: str) -> str | None:
        """The domain of the documents of `path`, or None when the regex does not match it."""
        path = path.replace(os.sep, "/")
        if self.spec == "parent":
            if "://" not in path:
                path = os.path.abspath(path).replace(os.sep, "/")
            return path.rstrip("/").rsplit("/", 2)[-2] if "/" in path.rstrip("/") else ""
        match = _compile(self.spec).search(path)
        if match is None:
            return None
        group = "domain" if "domain" in match.re.groupindex else 1
        return match.group(group) or ""

    def unmatched(self, paths: list[str]) -> list[str]:
        """The paths the regex does not match (the build refuses them before reading)."""
        return [p for p in paths if self.domain_of(p) is None]
