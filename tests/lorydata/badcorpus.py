"""A small corpus with every kind of bad record, and the dead letters it must produce."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import zstandard

GOOD = [
    {"id": "g1", "text": "The quick brown fox jumps over the lazy dog.", "domain": "animals"},
    {"id": "g2", "text": "SELECT * FROM pg_class WHERE relkind = 'r';", "domain": "sql"},
    {"id": "g3", "text": "git commit --amend rewrites the last commit.", "domain": "git"},
    {"id": "g4", "text": "In the beginning God created the heaven and the earth.", "domain": "bible"},
]
MAX_CHARS = 2000


def write_bad_corpus(folder: Path) -> dict:
    """Write `bad.jsonl` (one bad record of each kind between good ones) and return the
    expected outcome: good ids, dead letters as {(line, reason)}, and replacement count."""
    lines: list[bytes] = []
    expected_dead = set()

    def add(raw: bytes, reason: str | None = None) -> None:
        lines.append(raw)
        if reason:
            expected_dead.add((len(lines), reason))

    add(json.dumps(GOOD[0]).encode())
    add(b'{"id": "broken", "text": "no closing brace"', "malformed_json")
    add(json.dumps({"id": "nofield", "body": "text under another key"}).encode(), "missing_text")
    add(json.dumps({"id": "number", "text": 42}).encode(), "non_string_text")
    add(json.dumps(GOOD[1]).encode())
    add(json.dumps({"id": "empty", "text": "   \n\t  "}).encode(), "empty")
    add(json.dumps({"id": "huge", "text": "x" * (MAX_CHARS + 1)}).encode(), "too_long")
    add(b"[1, 2, 3]", "malformed_json")
    # Invalid UTF-8 inside an otherwise good document: kept, with 2 replacements counted.
    add(b'{"id": "latin1", "text": "caf\xe9 cr\xe8me is a fine dessert", "domain": "food"}')
    add(json.dumps({"id": "nul", "text": "bin\x00ary\x00"}).encode(), "binary")
    add(b"")  # blank lines are skipped silently
    add(json.dumps(GOOD[2]).encode())
    add(json.dumps({"id": "dup", "text": GOOD[2]["text"]}).encode(), "duplicate")
    add(json.dumps(GOOD[3]).encode())
    (folder / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {
        "good_ids": {"g1", "g2", "g3", "g4", "latin1"},
        "dead": expected_dead,
        "replacements": 2,
    }


def write_formats(folder: Path) -> dict[str, str]:
    """The same two documents in every supported format; returns {format: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = GOOD[:2]
    payload = "".join(json.dumps(d) + "\n" for d in docs).encode()
    paths = {
        "jsonl": folder / "a.jsonl",
        "jsonl.gz": folder / "a.jsonl.gz",
        "jsonl.zst": folder / "a.jsonl.zst",
        "parquet": folder / "a.parquet",
        "txt": folder / "texts",
    }
    paths["jsonl"].write_bytes(payload)
    paths["jsonl.gz"].write_bytes(gzip.compress(payload))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(payload))
    pq.write_table(pa.Table.from_pylist(docs), paths["parquet"])
    paths["txt"].mkdir()
    for d in docs:
        (paths["txt"] / f"{d['id']}.txt").write_text(d["text"], encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
