"""Near-dedup benchmark: a corpus's near-duplicate rate, and the MinHash cost against the
embedding cost it must stay far below.

Documents are read, cleaned and exactly deduplicated as the pipeline does
(`bench_pipeline.load_documents`). Then, timed: MinHash signatures and band keys of every
document, bucketing, verification and grouping (`lorydata.near_dedup` blocks, one process).
Reference in the same process: bare `SentenceTransformer.encode` of the first
`--encode-docs` documents (the pipeline's embedder config, weights loaded before the clock
starts), extrapolated to all documents. With `--beam`, the pipeline's own near-dedup step
(`pipelines.documents.near_dedup`, three Beam steps on the default runner) is timed on the same
documents and the share uses it. The goal is dedup ≤ 10% of the pipeline's wall time;
since embedding is most of that time, the printed share of the encode time is the stricter
figure.

The near-duplicate rate is printed per Jaccard threshold (and per domain at the configured
one), with a PNG of the rate against the threshold.

Usage:
    python benchmarks/bench_near_dedup.py                                  # the bundled sample
    python benchmarks/bench_near_dedup.py PATH/dev_corpus/train.jsonl.zst --png near_dedup.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from bench_pipeline import SAMPLE, load_documents

from lorydata.clean import content_hash
from lorydata.minhash import MinHashConfig, MinHasher
from lorydata.near_dedup import DocRef, group_duplicates, verified_pairs

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def all_pairs(refs: list[DocRef], signatures: list, threshold: float, block: int = 64) -> list:
    """(ref, ref, Jaccard) of every pair at or above `threshold`, by brute force (no LSH):
    the reference that measures what the LSH buckets miss."""
    keep = [i for i, s in enumerate(signatures) if s is not None]
    sigs = np.stack([signatures[i] for i in keep])
    pairs = []
    for start in range(0, len(sigs), block):
        agree = (sigs[start : start + block, None, :] == sigs[None, :, :]).mean(axis=2)
        rows, cols = np.nonzero(agree >= threshold)
        for r, c in zip(rows, cols, strict=True):
            if start + r < c:
                pairs.append((refs[keep[start + r]], refs[keep[c]], float(agree[r, c])))
    return pairs


def time_beam_step(docs: list[dict], threshold: float) -> tuple[float, dict]:
    """Seconds and findings of the pipeline's near-dedup step (Beam, default runner) on the
    documents, after the documents stage has written them (not timed)."""
    from pipelines import layout
    from pipelines.build_corpus import documents_config, minhash_config
    from pipelines.documents import run_documents_stage
    from pipelines.documents.near_dedup import drop_near_duplicates
    from pipelines.options import BuildOptions
    from pipelines.runner.beam import BeamRunner

    with tempfile.TemporaryDirectory(prefix="bench_near_dedup_") as tmp:
        src, out = Path(tmp) / "docs.jsonl", Path(tmp) / "documents"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        out.mkdir()
        options = BuildOptions(inputs=[str(src)], out=tmp, domain_field="domain", near_dedup="off",
                               near_dedup_threshold=threshold)
        counts = run_documents_stage(documents_config(options, None), BeamRunner(), [str(src)], str(out))
        start = time.perf_counter()
        info, _ = drop_near_duplicates(minhash_config(options), BeamRunner(), layout.documents_files(str(out)),
                                       counts["documents_kept"], str(out), layout.near_dedup_folder(str(out)))
        return time.perf_counter() - start, info


def time_encode(embedder, texts: list[str]) -> float:
    """Seconds of one `Embedder.encode` over all texts (weights already loaded)."""
    start = time.perf_counter()
    embedder.encode(texts)
    return time.perf_counter() - start


def plot(rates: dict[float, float], path: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(list(rates), [100 * r for r in rates.values()], marker="o")
    ax.set_xlabel("estimated Jaccard threshold (5-word shingles)")
    ax.set_ylabel("documents dropped (%)")
    ax.set_title(f"near-duplicate rate: {label}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", default=str(SAMPLE), help="jsonl(.zst/.gz) corpus (default: the sample)")
    parser.add_argument("--docs", type=int, default=None, help="use the first N documents (default: all)")
    parser.add_argument("--encode-docs", type=int, default=128, help="documents of the encode reference (0: skip)")
    parser.add_argument("--threshold", type=float, default=MinHashConfig.threshold)
    parser.add_argument("--beam", action="store_true",
                        help="also time build-corpus's Beam near-dedup step on the documents (the share uses it)")
    parser.add_argument("--png", default=None, help="write the rate-vs-threshold plot here")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)

    docs = load_documents(args.input, args.docs)
    n = len(docs)
    refs = [DocRef(content_hash(d["text"]), len(d["text"]), str(i)) for i, d in enumerate(docs)]
    domain = {r.key: d["domain"] for r, d in zip(refs, docs, strict=True)}
    hasher = MinHasher(MinHashConfig(threshold=args.threshold))
    print(f"{n} documents from {args.input}, {sum(r.length for r in refs) / max(1, n):.0f} chars each on average; "
          f"{hasher.config}")

    start = time.perf_counter()
    signatures = [hasher.signature(d["text"]) for d in docs]
    sign_s = time.perf_counter() - start
    found = verified_pairs(refs, signatures, hasher.config)
    dropped = group_duplicates((a, b) for a, b, _ in found)
    dedup_s = time.perf_counter() - start
    print(f"signatures      : {sign_s:8.2f} s  {n / sign_s:8.1f} docs/s")
    print(f"dedup in all    : {dedup_s:8.2f} s  {n / dedup_s:8.1f} docs/s  ({len(found)} verified pairs)")

    figures = {"documents": n, "signature_docs_per_s": n / sign_s, "dedup_seconds": dedup_s}
    if args.beam:
        beam_s, info = time_beam_step(docs, args.threshold)
        print(f"Beam step       : {beam_s:8.2f} s  {n / beam_s:8.1f} docs/s  ({info['dropped']} dropped, "
              f"{info['lsh_buckets']} LSH bucket(s); sign, verify, apply on the default runner)")
        figures.update(beam_seconds=beam_s)
        dedup_s = beam_s  # the share below is the pipeline step's
    if args.encode_docs:
        from lorydata.embed import Embedder
        from pipelines.build_corpus import embedder_config
        from pipelines.options import BuildOptions

        embedder = Embedder(embedder_config(BuildOptions(inputs=[], out="")))
        texts = [d["text"] for d in docs[: args.encode_docs]]
        time_encode(embedder, texts[:8])  # warm-up
        encode_rate = len(texts) / time_encode(embedder, texts)
        share = dedup_s / (dedup_s + n / encode_rate)
        print(f"bare encode     : {encode_rate:8.1f} docs/s on the first {len(texts)} documents")
        print(f"dedup / (dedup + encode of all documents): {100 * share:.1f}%  (goal <= 10%)")
        figures.update(encode_docs_per_s=encode_rate, dedup_share=share)

    # Every pair by brute force (O(n²), fine for a dev corpus): the rate at each threshold
    # without LSH misses, and the share of true pairs the LSH buckets found.
    low = all_pairs(refs, signatures, min(THRESHOLDS))
    rates = {t: len(group_duplicates((a, b) for a, b, j in low if j >= t)) / n for t in THRESHOLDS}
    print("near-duplicate rate by threshold (all pairs): "
          + ", ".join(f"{t:.2f}: {100 * r:.1f}%" for t, r in rates.items()))
    true_pairs = sum(j >= args.threshold for *_, j in low)
    print(f"LSH recall at {args.threshold}: {len(found)} of {true_pairs} pairs")
    by_domain = Counter(domain[d.dropped.key] for d in dropped)
    totals = Counter(domain.values())
    print(f"dropped at {args.threshold}: {len(dropped)} of {n} ({100 * len(dropped) / max(1, n):.1f}%), "
          f"{len({d.kept.key for d in dropped})} groups; by domain: "
          + ", ".join(f"{k} {v}/{totals[k]}" for k, v in sorted(by_domain.items())))
    figures.update(rates=rates, dropped=len(dropped), dropped_by_domain=dict(by_domain),
                   lsh_pairs=len(found), all_pairs=true_pairs)
    if args.png:
        plot(rates, args.png, f"{Path(args.input).name}, {n} docs")
        print(f"plot: {args.png}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
