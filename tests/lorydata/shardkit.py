"""Builds small real shard folders for tests: tokenizer → pack → shuffled shards → manifest."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from cli import main as lory_main
from lorydata.manifest import Manifest
from lorydata.pack import PackStats, pack_documents
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer

TEXTS = [
    ("git", "git rebase -i HEAD~3 lets you squash, reorder or edit the last three commits."),
    ("postgres", "VACUUM reclaims storage occupied by dead tuples in PostgreSQL tables."),
    ("bible", "And God said, Let there be light: and there was light."),
    ("perlcode", "sub new { my ($class, %args) = @_; return bless {%args}, $class; }"),
    ("perlpod", "=head1 NAME\n\nperlre - Perl regular expressions"),
]


def make_documents(n: int) -> list[tuple[str, str]]:
    """n (domain, text) pairs cycling through the domains, each text distinct."""
    return [(TEXTS[i % len(TEXTS)][0], f"{i}: {TEXTS[i % len(TEXTS)][1]}") for i in range(n)]


def build_shards(folder: Path, documents: list[tuple[str, str]], seq_len: int = 32, rows_per_shard: int = 5,
                 seed: int = 0, tail: str = "pad") -> Manifest:
    tok = Tokenizer()
    stats = PackStats()
    tokenized = ((tok.encode(text), domain) for domain, text in documents)
    writer = ShuffledShardWriter(folder, seq_len, rows_per_shard, seed=seed)
    writer.add_all(pack_documents(tokenized, seq_len, tok.eos_id, tok.pad_id, tail, stats))
    manifest = Manifest(seq_len=seq_len, tokenizer=tok.identity().to_dict(), shards=writer.finish(),
                        counts=stats.to_dict(), order={"method": "given", "seed": seed, "metrics": {}})
    manifest.write(folder)
    return manifest


def read_jsonl_zst(path: str | Path) -> Iterator[dict]:
    """The records of a `.jsonl.zst` file (the bundled sample), one dict a line."""
    with open(path, "rb") as raw:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8"):
            yield json.loads(line)


def run_cli(args, capsys) -> tuple[int, str, str]:
    """`lory ARGS` in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exc:
        lory_main([str(a) for a in args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err
