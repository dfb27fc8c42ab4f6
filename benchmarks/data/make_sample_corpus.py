"""Cut the bundled sample corpus (lorydata/assets/sample/) from the dev corpus.

    python benchmarks/data/make_dev_corpus.py dev_corpus
    python benchmarks/data/make_sample_corpus.py dev_corpus/train.jsonl.zst

Takes DOCS_PER_DOMAIN documents of every domain, chosen by a seeded shuffle, and writes
them (fields id, text, domain, source) in a seeded random order to
lorydata/assets/sample/sample.jsonl.zst.
"""

import io
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import zstandard

DOCS_PER_DOMAIN = 100
OUT = Path(__file__).resolve().parents[2] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"


def main(src: str, seed: int = 0) -> None:
    by_domain = defaultdict(list)
    with open(src, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            record = json.loads(line)
            by_domain[record["domain"]].append(record)
    rng = random.Random(seed)
    picked = []
    for domain in sorted(by_domain):
        docs = by_domain[domain]
        rng.shuffle(docs)
        picked.extend(docs[:DOCS_PER_DOMAIN])
    rng.shuffle(picked)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked).encode()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"{len(picked)} documents, {len(data)} bytes of jsonl, {OUT.stat().st_size} bytes zstd -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
