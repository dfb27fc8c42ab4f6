"""Read-path benchmark: lory's read + clean of a JSON-lines dump against the bare work it
cannot avoid, on one core, in the same process.

- bare: decompress, split lines, `json.loads` each line and take its text (nothing else);
- reference: the same plus the reference cleaning (`normalize_text` and the content hash
  as they were before the speed work, copied in `tests/lorydata/test_clean_reference.py`);
- lory: `read_file` + `clean_document` (limits, dead letters, orjson with exact fallback,
  the fast normalisation);
- tokenizer: the bundled tokenizer's `encode_batch` of the first `--tokenizer-docs` cleaned
  texts (one thread), the stage's other per-document cost, scaled to the whole input by
  characters.

It prints MB/s (uncompressed JSON-lines bytes) and docs/s of each and their ratios. Each
measurement runs `--repeat` times and the fastest counts (a shared box slows runs down at
random). `--check` first verifies that lory's cleaned texts and content hashes equal the
reference on every document; `--profile` prints lory's cProfile top functions.

Usage:
    python benchmarks/bench_read.py                                   # the bundled sample
    python benchmarks/bench_read.py PATH/dev_corpus/train.jsonl.zst --check --profile
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one core like the rest
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorydata.clean import CleanConfig, clean_document
from lorydata.compression import open_stream
from lorydata.documents import Document
from lorydata.readers import ReaderConfig, file_format, read_file
from lorydata.tokenizer import Tokenizer
from tests.lorydata.test_clean_reference import reference_normalize, reference_parse

SAMPLE = Path(__file__).resolve().parents[1] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"


def raw_lines(path: str) -> list[bytes]:
    with open_stream(path, file_format(path)) as stream:
        return stream.read().splitlines(keepends=True)


def bare(path: str) -> list[str]:
    texts = []
    with open_stream(path, file_format(path)) as stream:
        for line in stream:
            if line.strip():
                texts.append(json.loads(line.decode("utf-8"))["text"])
    return texts


def reference(path: str) -> list[tuple[str, str]]:
    out = []
    with open_stream(path, file_format(path)) as stream:
        for line in stream:
            if line.strip():
                record, _ = reference_parse(line)
                text = reference_normalize(record["text"])
                out.append((text, hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()))
    return out


def lory(path: str) -> list[tuple[str, str]]:
    out, reader, cleaner = [], ReaderConfig(), CleanConfig()
    for record in read_file(path, reader):
        if isinstance(record, Document):
            record = clean_document(record, cleaner)
            if isinstance(record, Document):
                out.append((record.text, record.content_hash))
    return out


def best_of(repeat: int, fn, *args):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=str(SAMPLE), help="a JSON-lines dump (.jsonl, .zst, .gz)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts")
    parser.add_argument("--check", action="store_true", help="verify lory's output equals the reference first")
    parser.add_argument("--profile", action="store_true", help="print lory's cProfile top functions")
    parser.add_argument("--tokenizer-docs", type=int, default=500, help="documents the tokenizer is timed on")
    args = parser.parse_args()

    megabytes = sum(map(len, raw_lines(args.path))) / 1e6
    if args.check:
        ours, theirs = lory(args.path), reference(args.path)
        assert ours == theirs, "lory's cleaned texts or content hashes differ from the reference"
        print(f"check: {len(ours)} documents, cleaned text and content hash equal to the reference")

    rows = []
    t_bare, texts = best_of(args.repeat, bare, args.path)
    rows.append(("bare json.loads", t_bare, len(texts)))
    t_ref, ref = best_of(args.repeat, reference, args.path)
    rows.append(("reference read+clean", t_ref, len(ref)))
    t_lory, docs = best_of(args.repeat, lory, args.path)
    rows.append(("lory read+clean", t_lory, len(docs)))
    tokenizer = Tokenizer()
    cleaned = [text for text, _ in docs]
    timed = cleaned[: args.tokenizer_docs]
    t_tok, _ = best_of(args.repeat, tokenizer.encode_batch, timed)
    t_tok *= sum(map(len, cleaned)) / sum(map(len, timed))  # the whole input at the measured rate
    rows.append(("tokenizer encode_batch", t_tok, len(cleaned)))

    print(f"{args.path}: {megabytes:.1f} MB of JSON lines, {len(texts)} documents, one core, best of {args.repeat}")
    print(f"{'':24s} {'seconds':>8s} {'MB/s':>8s} {'docs/s':>9s} {'lory/this':>10s}")
    for name, seconds, n in rows:
        print(f"{name:24s} {seconds:8.3f} {megabytes / seconds:8.1f} {n / seconds:9.0f} {seconds and t_lory / seconds:10.2f}")
    print(f"lory read+clean is {t_ref / t_lory:.2f}x the reference, {t_lory / t_bare:.2f}x the bare parse's time, "
          f"{t_lory / t_tok:.2f}x the tokenizer's time")

    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lory, args.path)
        stream = io.StringIO()
        pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(12)
        print(stream.getvalue())


if __name__ == "__main__":
    main()
