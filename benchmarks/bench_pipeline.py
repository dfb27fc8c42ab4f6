"""Pipeline benchmark: the whole `lory build-corpus --order similarity` against the bare
embedding it cannot avoid, timed in the same process on the same documents.

Reference: `SentenceTransformer.encode` of the cleaned, deduplicated documents (the same
model, device, batch size and token window as the pipeline's embedder; weights loaded
before the clock starts, so the reference pays for nothing but the forward passes).
Pipeline: `build_corpus` end to end into a fresh folder: read, clean, dedup and tokenize
(Beam), embed (Beam RunInference, model load included), kNN graph + walk, pack, write
shards. It prints docs/s of both, their ratio (goal: the pipeline at >= 0.8 of the bare
encoder, i.e. everything but the forward passes costs under a quarter of them) and the
seconds of every pipeline stage.

The reference runs before and after the pipeline and the faster run counts, since a shared
box can slow either one down.

Usage:
    python benchmarks/bench_pipeline.py                       # the bundled sample
    python benchmarks/bench_pipeline.py PATH/dev_corpus/train.jsonl.zst --docs 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import Document
from lorydata.readers import ReaderConfig, read_inputs

SAMPLE = Path(__file__).resolve().parents[1] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"


def load_documents(path: str, limit: int | None) -> list[dict]:
    """The first `limit` documents that survive cleaning and exact dedup, as the pipeline
    keeps them (text, domain)."""
    seen, docs = set(), []
    for record in read_inputs([path], ReaderConfig(domain_field="domain")):
        if not isinstance(record, Document):
            continue
        cleaned = clean_document(record, CleanConfig())
        if isinstance(cleaned, Document) and cleaned.content_hash not in seen:
            seen.add(cleaned.content_hash)
            docs.append({"text": cleaned.text, "domain": cleaned.domain})
            if limit and len(docs) == limit:
                break
    return docs


def time_encode(embedder, texts: list[str]) -> float:
    """Seconds of one bare `SentenceTransformer.encode` over all texts."""
    start = time.perf_counter()
    embedder.model.encode(texts, batch_size=embedder.config.batch_size, show_progress_bar=False,
                          convert_to_numpy=True, normalize_embeddings=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", default=str(SAMPLE), help="jsonl(.zst/.gz) corpus (default: the sample)")
    parser.add_argument("--docs", type=int, default=None, help="use the first N documents (default: all)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size (both sides)")
    parser.add_argument("--max-tokens", type=int, default=None, help="embedder token window (both sides)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--beam-arg", action="append", default=[], help="extra Beam flag (repeatable)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)

    from lorydata.embed import Embedder
    from pipelines.build_corpus import build_corpus, embedder_config
    from pipelines.options import BuildOptions

    docs = load_documents(args.input, args.docs)
    n = len(docs)
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    try:
        src = work / "docs.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        options = BuildOptions(inputs=[str(src)], out=str(work / "corpus"), domain_field="domain",
                               seq_len=args.seq_len, k=args.k, partitions=args.partitions,
                               embed_batch_size=args.batch_size, embed_max_tokens=args.max_tokens,
                               device=args.device, beam_args=args.beam_arg)
        embedder = Embedder(embedder_config(options))
        texts = [d["text"] for d in docs]
        print(f"{n} documents from {args.input}, {sum(map(len, texts)) / max(1, n):.0f} chars each on average; "
              f"{embedder.name} on {embedder.device}, window {embedder.window} tokens, batch {args.batch_size}")
        time_encode(embedder, texts[:args.batch_size])  # warm-up: first-call allocations
        raw = [time_encode(embedder, texts)]
        start = time.perf_counter()
        summary = build_corpus(options, log=lambda *_: None)
        pipeline = time.perf_counter() - start
        raw.append(time_encode(embedder, texts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_raw = min(raw)
    raw_rate, pipe_rate = n / best_raw, n / pipeline
    print(f"bare encode     : {best_raw:8.1f} s  {raw_rate:8.1f} docs/s  (runs: {', '.join(f'{r:.1f}' for r in raw)} s)")
    print(f"build_corpus    : {pipeline:8.1f} s  {pipe_rate:8.1f} docs/s")
    print(f"ratio pipeline/bare: {pipe_rate / raw_rate:.2f}  (goal >= 0.80)")
    for name, stage in summary.stages.items():
        print(f"  {name:16s} {stage['seconds']:8.1f} s  {stage['status']}")
    if args.json:
        print(json.dumps({"documents": n, "bare_seconds": raw, "pipeline_seconds": pipeline,
                          "bare_docs_per_s": raw_rate, "pipeline_docs_per_s": pipe_rate,
                          "ratio": pipe_rate / raw_rate, "stages": summary.stages}))


if __name__ == "__main__":
    main()
