"""The fast read path gives exactly the output of the reference implementation (a copy of
the reader and `normalize_text` as they were before the speed work): same documents, same
cleaned text, same content hash. `benchmarks/bench_read.py --check` runs the same
comparison on a larger corpus."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
import zstandard

from lorydata.clean import CleanConfig, clean_document, normalize_text
from lorydata.documents import Document
from lorydata.readers import ReaderConfig, _parse, decode_utf8, read_file

SAMPLE = Path(__file__).resolve().parents[2] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"

# --- the reference: lorydata.clean.normalize_text and the JSON-lines parse, as they were ---
_SPACES = dict.fromkeys([0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000, 0x0B, 0x0C], " ")
_INVISIBLE = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD])
_CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0)])
_TRANSLATE = str.maketrans({**_SPACES, **_INVISIBLE, **_CONTROL})
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def reference_normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text).translate(_TRANSLATE)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def reference_parse(raw: bytes):
    """(object or error message, replacements): decode with replacement, then `json.loads`."""
    text, replacements = decode_utf8(raw)
    try:
        return json.loads(text), replacements
    except json.JSONDecodeError as exc:
        return f"malformed: {exc}", replacements


def reference_documents(lines: list[bytes], source: str) -> list[tuple]:
    """(line, id, domain, text, replacements) of every document of the old reader (string fields)."""
    docs = []
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record, replacements = reference_parse(raw)
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append((line_no, str(record.get("id", "")), str(record.get("domain", "")), record["text"], replacements))
    return docs
# --- end of the reference ---


# Every character class normalize_text treats specially, and neighbours it must leave alone.
ALPHABET = ["a", "b", "Z", "1", " ", "  ", "\t", "\n", "\n\n", "\n\n\n", "\r", "\r\n", "\x00", "\x08", "\x0b", "\x0c",
            "\x1f", "\x7f", "\x85", "\x9f", "\xa0", "\xad", "\u1680", "\u2000", "\u200a", "\u200b", "\u200c", "\u200d",
            "\u2028", "\u2029", "\u202f", "\u205f", "\u2060", "\u3000", "\ufeff", "e\u0301", "\u0301", "\u0327", "é",
            "\u212b", "Å", "\ufb01", "\ufffd", "\U0001f600", "한", "\u1100\u1161", "\u0915\u093c", " \t \n"]


def test_normalize_equals_the_reference_on_random_texts():
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 40)))
        assert normalize_text(text) == reference_normalize(text), repr(text)


def sample_lines() -> list[bytes]:
    with open(SAMPLE, "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return raw.splitlines(keepends=True)


def test_reader_and_cleaner_equal_the_reference_on_the_bundled_sample():
    lines = sample_lines()
    config = ReaderConfig(domain_field="domain", id_field="id")
    docs = [d for d in read_file(str(SAMPLE), config) if isinstance(d, Document)]
    expected = reference_documents(lines, str(SAMPLE))
    assert len(docs) == len(expected) > 300
    assert [(d.line, d.id, d.domain, d.text, d.replacements) for d in docs] == expected
    for doc in docs:
        cleaned = clean_document(doc, CleanConfig())
        reference = reference_normalize(doc.text)
        assert cleaned.text == reference
        assert cleaned.content_hash == __import__("hashlib").blake2b(reference.encode(), digest_size=16).hexdigest()


# Lines where orjson and the standard library disagree or fail; the reader must give what
# `json.loads` gives (the reference), whichever parser answered first.
TRICKY_LINES = [
    b'{"text": "lone \\ud800 high"}', b'{"text": "lone \\udc00 low"}', b'{"text": "pair \\ud83d\\ude00"}',
    b'{"text": "nan", "id": NaN}', b'{"text": "inf", "id": 1e400}', b'{"text": "big", "id": 123456789012345678901234567890}',
    b'{"text": "u64", "id": 18446744073709551616}', b'{"text": "neg", "id": -9223372036854775809}',
    b'{"text": "float", "id": 1.0000000000000002}', b'{"text": "raw\ttab"}', b'{"text": "nul\x00"}',
    b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "dup", "text": "second"}', b'{"text": "surrogate \xed\xa0\x80 bytes"}',
    b'{"text": "overlong \xc0\x80"}', b'{"text": "beyond \xf4\x90\x80\x80"}', b'{"text": "latin \xe9"}',
    b'{"text": "\\u0000 escaped nul"}', b'{"text": "x"}\r\n', b'  {"text": "spaced"}  \n', b'{"text": "x"}\x0c',
    b'{"text": "trailing"} x', b'[1, 2]', b'123456789012345678901234567890', b'"just a string"', b'null',
    b'{"text": 12345678901234567890123}', b'{"text": 1.5}', b'{"text": "nested", "domain": {"b": 1, "a": [1.5, 2]}}',
]


@pytest.mark.parametrize("raw", TRICKY_LINES, ids=range(len(TRICKY_LINES)))
def test_parse_equals_json_loads(raw):
    expected, replacements = reference_parse(raw)
    try:
        got = _parse(raw, max_depth=128)
    except Exception as drop:  # the reader's _Drop: a dead letter
        assert not isinstance(expected, dict)
        detail = drop.detail
        assert expected == f"malformed: {detail}" or detail == f"a JSON {type(expected).__name__}, not an object"
        return
    assert isinstance(expected, dict)
    assert got[1] == replacements
    if isinstance(expected.get("text"), str):
        assert got[0]["text"] == expected["text"]


def test_documents_from_tricky_lines_equal_the_reference(tmp_path):
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\n".join(line.rstrip(b"\r\n") for line in TRICKY_LINES) + b"\n")
    records = list(read_file(str(path), ReaderConfig(id_field="id", domain_field="domain")))
    docs = [d for d in records if isinstance(d, Document)]
    expected = reference_documents(path.read_bytes().splitlines(keepends=True), str(path))
    assert [(d.line, d.text, d.replacements) for d in docs] == [(e[0], e[3], e[4]) for e in expected]
    ids = {d.text: d.id for d in docs}  # numbers as json.loads read them, never via a 64-bit float
    assert (ids["big"], ids["u64"], ids["neg"]) == ("123456789012345678901234567890", "18446744073709551616",
                                                    "-9223372036854775809")
    assert (ids["float"], ids["nan"], ids["inf"]) == ("1.0000000000000002", "NaN", "Infinity")
    assert next(d.domain for d in docs if d.text == "nested") == '{"a":[1.5,2],"b":1}'
    kinds = {r.line: r.detail for r in records if not isinstance(r, Document)}
    assert kinds[24] == "a JSON int, not an object" and kinds[27] == "field 'text' is int"
