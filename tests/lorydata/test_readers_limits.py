"""Bounded readers: decompression bombs, enormous lines and deep JSON end as dead letters with
the reader's memory bounded, never as an exhausted machine or a RecursionError."""

import gzip
import io
import json
import subprocess
import sys
import textwrap

import pytest
import zstandard

from lorydata.compression import ZstdStream
from lorydata.documents import DeadLetter, Document
from lorydata.readers import ReaderConfig, read_file

BOMB_PIECE = 16 << 20  # bytes of one compressed frame / gzip member
# zstd: 128 × 16 MiB, one JSON line of 2 GiB (the 66 KB file of the report); gzip inflates at
# ~150 MB/s here, so its line is 640 MiB: still more than the memory limit.
BOMB_PIECES = {"zst": 128, "gz": 40}
RSS_LIMIT_MB = 500

# Peak RSS of the child itself: Linux's VmHWM. (ru_maxrss of a child also counts the RSS its
# parent had when it was spawned, which is pytest's, so it says nothing about the reader.)
CHILD = textwrap.dedent("""
    import json, resource, sys
    from lorydata.readers import ReaderConfig, read_file

    def peak_mb():
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        except OSError:  # not Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = []
    for record in read_file(sys.argv[1], ReaderConfig()):
        out.append([type(record).__name__, record.line, getattr(record, "reason", ""), getattr(record, "detail", "")])
    print(json.dumps({"records": out, "max_rss_mb": peak_mb()}))
""")


def write_bomb(path, kind: str) -> int:
    """A file whose line 2 is one enormous JSON line, between two good lines; returns the
    length of that line. The pieces are compressed once and repeated (zstd frames and gzip
    members concatenate), so the file is small: ~66 KB of zstd, ~650 KB of gzip."""
    compress = zstandard.ZstdCompressor().compress if kind == "zst" else gzip.compress
    filler = compress(b"a" * BOMB_PIECE)
    with open(path, "wb") as f:
        f.write(compress(b'{"text": "before the bomb"}\n{"text": "'))
        for _ in range(BOMB_PIECES[kind]):
            f.write(filler)
        f.write(compress(b'"}\n{"text": "after the bomb"}\n'))
    return len(b'{"text": "') + BOMB_PIECES[kind] * BOMB_PIECE + len(b'"}')


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_decompression_bomb_is_a_dead_letter_in_bounded_memory(tmp_path, kind):
    path = tmp_path / f"bomb.jsonl.{kind}"
    line_bytes = write_bomb(path, kind)
    assert path.stat().st_size < 4 << 20
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["records"] == [
        ["Document", 1, "", ""],
        ["DeadLetter", 2, "line_too_long", f"line of {line_bytes + 1} bytes > max_line_bytes {64 << 20}"],
        ["Document", 3, "", ""],
    ]
    assert result["max_rss_mb"] < RSS_LIMIT_MB


def test_zstd_stream_hands_out_bounded_pieces():
    frame = zstandard.ZstdCompressor().compress(b"a" * (64 << 20))
    assert len(frame) < 8192  # 64 MiB in a few KB: one read of the old stream held it all
    stream = ZstdStream(io.BytesIO(frame * 2))
    buffer, total, largest_pending = bytearray(1 << 20), 0, 0
    while n := stream.readinto(buffer):
        total += n
        largest_pending = max(largest_pending, len(stream._out))
    assert total == 128 << 20
    assert largest_pending <= 33 << 20  # one 1 KiB slice yields at most ~32 MiB


def test_truncated_gzip_keeps_documents_before_the_damage(tmp_path):
    payload = "".join(json.dumps({"text": f"gzip document {i} " * 20}) + "\n" for i in range(2000)).encode()
    blob = gzip.compress(payload)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    records = list(read_file(str(path), ReaderConfig()))
    docs = [r for r in records if isinstance(r, Document)]
    dead = [r for r in records if isinstance(r, DeadLetter)]
    assert 0 < len(docs) < 2000
    assert [d.reason for d in dead] == ["unreadable"] and dead[0].line == len(docs) + 1


def test_corrupt_gzip_data_is_a_dead_letter(tmp_path):
    blob = bytearray(gzip.compress(b'{"text": "x"}\n' * 5000))
    blob[10:20] = b"\xff" * 10  # the first deflate block: reserved block type
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(blob))
    dead = [r for r in read_file(str(path), ReaderConfig()) if isinstance(r, DeadLetter)]
    assert [d.reason for d in dead] == ["unreadable"] and "invalid block type" in dead[0].detail


def nested(levels: int, kind: str) -> str:
    if kind == "array":
        return "[" * levels + "]" * levels
    return '{"a": ' * levels + "1" + "}" * levels


@pytest.mark.parametrize("kind", ["array", "object"])
def test_100k_levels_of_nesting_is_a_dead_letter(tmp_path, kind):
    path = tmp_path / "deep.jsonl"
    deep = nested(100_000, kind)
    lines = ['{"text": "first"}', deep, '{"text": "x", "meta": ' + deep + "}", '{"text": "last"}']
    path.write_text("\n".join(lines) + "\n")
    records = list(read_file(str(path), ReaderConfig()))
    assert [(type(r).__name__, r.line) for r in records] == [
        ("Document", 1), ("DeadLetter", 2), ("DeadLetter", 3), ("Document", 4)]
    assert {r.reason for r in records if isinstance(r, DeadLetter)} == {"json_too_deep"}
    assert records[1].detail == "JSON nested deeper than max_json_depth 128"


@pytest.mark.parametrize("escape", ["", "\\ud800"])  # orjson path and json fallback (lone surrogate)
def test_nesting_limit_is_exact(tmp_path, escape):
    def line(depth: int) -> str:  # the record itself is level 1
        return json.dumps({"text": "t" + escape, "meta": json.loads(nested(depth - 1, "array"))}).replace(
            "\\\\ud800", "\\ud800")

    path = tmp_path / "edge.jsonl"
    path.write_text(line(10) + "\n" + line(11) + "\n")
    records = list(read_file(str(path), ReaderConfig(max_json_depth=10)))
    assert isinstance(records[0], Document) and records[0].text == "t" + ("\ud800" if escape else "")
    assert isinstance(records[1], DeadLetter) and records[1].reason == "json_too_deep"


def test_limits_are_validated():
    from lorydata.errors import LoryDataError

    for bad in ({"max_line_bytes": 0}, {"max_json_depth": 0}, {"text_field": ""}):
        with pytest.raises(LoryDataError):
            ReaderConfig(**bad)
