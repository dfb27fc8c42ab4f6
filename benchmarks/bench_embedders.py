"""Embedders side by side on a labelled corpus: speed, agreement with MiniLM, and the order
each one gives.

Every embedder is loaded first (distillation / ONNX export happen then, once, into the
model cache; not timed), warmed up, then all embed the same documents in turns, `--chunk`
documents at a time, in one process, so a busy machine slows them alike. Per embedder:

- docs/s and MB/s (UTF-8 bytes of the texts) of `Embedder.encode`, and the ratio to MiniLM
  on torch measured on the same sample (mean ± 95% t-interval over samples);
- cosine of its vectors to MiniLM torch vectors (MiniLM backends only: the other models
  live in other spaces);
- order quality (`lorydata.order_metrics.domain_agreement`): share of documents whose nearest
  neighbour has their domain, and same-domain share of adjacent documents along lory's
  similarity walk (kNN graph + walk of `lorydata.partition.order_cell`), against a random
  order's share; mean ± 95% t-interval over the disjoint samples.

`static-bpe ids` embeds lory BPE ids computed before the clock starts (the documents stage
has them already), through `Embedder.encode_ids`. `lsa ids` / `lsa` are the LSA embedder
(`lorydata.lexical_embed`), fitted on each sample's own BPE ids before its clock starts, as
a build fits it on the split it orders; the fit's seconds are reported apart ("fit s").
`--only LABEL...` runs a subset (without "minilm torch": no ratios, no cosines).

Usage:
    python benchmarks/bench_embedders.py --corpus PATH/dev_corpus/train.jsonl.zst --docs 300 --samples 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from lorydata import lexical_embed
from lorydata.clean import CleanConfig, clean_document
from lorydata.documents import Document
from lorydata.embed import Embedder, EmbedderConfig
from lorydata.order_metrics import domain_agreement
from lorydata.readers import ReaderConfig, read_inputs
from lorydata.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "embedders"
REFERENCE = "minilm torch"
FITTED = "fitted per sample"  # the model of LSA labels: fitted on each sample's ids


def load_documents(path: str) -> list[dict]:
    """Every document that survives cleaning and exact dedup (text, domain), as the pipeline keeps them."""
    seen, docs = set(), []
    for record in read_inputs([path], ReaderConfig(domain_field="domain")):
        if isinstance(record, Document):
            cleaned = clean_document(record, CleanConfig())
            if isinstance(cleaned, Document) and cleaned.content_hash not in seen and cleaned.domain:
                seen.add(cleaned.content_hash)
                docs.append({"text": cleaned.text, "domain": cleaned.domain})
    return docs


def embedder_specs(args) -> dict[str, tuple[EmbedderConfig, str]]:
    """label -> (config, "text" or "ids"). Static models read `STATIC_TOKENS` tokens unless
    the label says "whole" (every token) or "cut N"."""
    batch, static_batch = args.batch_size, args.static_batch_size
    specs = {REFERENCE: (EmbedderConfig(device="cpu", batch_size=batch), "text"),
             "minilm onnx": (EmbedderConfig(backend="onnx", batch_size=batch), "text"),
             "minilm onnx-int8": (EmbedderConfig(backend="onnx-int8", batch_size=batch), "text")}
    for model, mode, label in (("static", "text", "static"), ("static-bpe", "text", "static-bpe"),
                               ("static-bpe", "ids", "static-bpe ids")):
        specs[label] = (EmbedderConfig(model=model, batch_size=static_batch), mode)
        specs[f"{label} whole"] = (EmbedderConfig(model=model, long_documents="whole", batch_size=static_batch), mode)
        for cut in args.static_cuts:
            specs[f"{label} cut {cut}"] = (EmbedderConfig(model=model, max_tokens=cut, batch_size=static_batch), mode)
    for mode, label in (("ids", "lsa ids"), ("text", "lsa")):
        specs[label] = (EmbedderConfig(model=FITTED, batch_size=static_batch), mode)
        specs[f"{label} whole"] = (EmbedderConfig(model=FITTED, long_documents="whole", batch_size=static_batch), mode)
    default = [REFERENCE, "minilm onnx", "minilm onnx-int8", "static", "static whole", "static-bpe", "static-bpe ids",
               "static-bpe ids whole", "lsa ids", "lsa", *(f"static cut {cut}" for cut in args.static_cuts)]
    unknown = sorted(set(args.only or []) - set(specs))
    if unknown:
        raise SystemExit(f"unknown embedder label(s) {unknown}; known: {sorted(specs)}")
    return {label: specs[label] for label in (default if args.only is None else args.only)}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width (0 for a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def run(args) -> dict:
    docs = load_documents(args.corpus)
    rng = np.random.default_rng(args.seed)
    picked = rng.permutation(len(docs))[: args.docs * args.samples]
    if len(picked) < args.docs * args.samples:
        raise SystemExit(f"{len(docs)} documents: not enough for {args.samples} samples of {args.docs}")
    samples = [[docs[i] for i in picked[s * args.docs: (s + 1) * args.docs]] for s in range(args.samples)]
    specs = embedder_specs(args)
    print(f"{len(docs)} documents in {Path(args.corpus).name}; {args.samples} disjoint samples of {args.docs} "
          f"({np.mean([len(d['text']) for d in docs]):.0f} chars on average); torch threads {args.threads}")

    embedders = {}
    for label, (config, _) in specs.items():
        if config.model == FITTED:
            continue
        start = time.perf_counter()
        embedders[label] = Embedder(config)
        print(f"  loaded {label:22s} {time.perf_counter() - start:6.1f} s  dim {embedders[label].dim}  "
              f"window {embedders[label].window}", flush=True)
    bpe = Tokenizer()
    warm = [d["text"] for d in samples[0][:8]]
    for label, embedder in embedders.items():
        _encode(embedder, specs[label][1], warm, bpe.encode_batch(warm))

    rows = {label: {"seconds": [], "ratio": [], "mb_per_s": [], "docs_per_s": [], "nearest": [], "walk": [],
                    "cosine_mean": [], "cosine_min": [], "fit_seconds": []} for label in specs}
    fit_dir = Path(tempfile.mkdtemp(prefix="bench-lsa-"))
    random_share = []
    for s, sample in enumerate(samples):
        texts, domains = [d["text"] for d in sample], [d["domain"] for d in sample]
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        ids = bpe.encode_batch(texts)  # the documents stage's work, done before any clock
        for label, (config, mode) in specs.items():  # LSA: fitted on this sample's ids, as a build does
            if config.model == FITTED:
                begin = time.perf_counter()
                folder = lexical_embed.fit_lsa(ids, fit_dir / f"{s}-{label}", dims=args.lsa_dims)
                rows[label]["fit_seconds"].append(time.perf_counter() - begin)
                embedders[label] = Embedder(dataclasses.replace(config, model=str(folder)))
                _encode(embedders[label], mode, warm, bpe.encode_batch(warm))
        vectors = {label: [] for label in embedders}
        seconds = dict.fromkeys(embedders, 0.0)
        for start in range(0, len(texts), args.chunk):  # all embedders chunk by chunk: a load change hits all
            for label, embedder in embedders.items():
                begin = time.perf_counter()
                vectors[label].append(_encode(embedder, specs[label][1], texts[start: start + args.chunk],
                                              ids[start: start + args.chunk]))
                seconds[label] += time.perf_counter() - begin
        vectors = {label: np.concatenate(parts) for label, parts in vectors.items()}
        for label in embedders:
            row = rows[label]
            row["seconds"].append(seconds[label])
            row["docs_per_s"].append(len(texts) / seconds[label])
            row["mb_per_s"].append(megabytes / seconds[label])
        for label, row in rows.items():
            if REFERENCE in rows:
                row["ratio"].append(row["docs_per_s"][-1] / rows[REFERENCE]["docs_per_s"][-1])
            quality = domain_agreement(vectors[label], domains)
            row["nearest"].append(quality["nearest_same_domain"])
            row["walk"].append(quality["walk_same_domain"])
            if REFERENCE in rows and label.startswith("minilm") and vectors[label].shape == vectors[REFERENCE].shape:
                cosines = np.sum(vectors[label] * vectors[REFERENCE], axis=1)
                row["cosine_mean"].append(float(cosines.mean()))
                row["cosine_min"].append(float(cosines.min()))
        random_share.append(quality["random_same_domain"])
        print(f"  sample {s + 1}/{len(samples)}: " + ", ".join(
            f"{label} {rows[label]['docs_per_s'][-1]:.1f}" for label in rows) + " docs/s", flush=True)

    shutil.rmtree(fit_dir, ignore_errors=True)
    results = {"corpus": Path(args.corpus).name, "documents_per_sample": args.docs, "samples": args.samples,
               "seed": args.seed, "torch_threads": args.threads, "random_same_domain": interval(random_share),
               "embedders": {}}
    for label, row in rows.items():
        embedder = embedders[label]
        results["embedders"][label] = {
            "config": asdict(embedder.config), "mode": specs[label][1], "dim": embedder.dim,
            "docs_per_s": interval(row["docs_per_s"]), "mb_per_s": interval(row["mb_per_s"]),
            "ratio_to_reference": interval(row["ratio"]) if row["ratio"] else None,
            "nearest_same_domain": interval(row["nearest"]), "walk_same_domain": interval(row["walk"]),
            "cosine_to_reference": ({"mean": float(np.mean(row["cosine_mean"])), "min": float(np.min(row["cosine_min"]))}
                                    if row["cosine_mean"] else None),
            "fit_seconds": interval(row["fit_seconds"]) if row["fit_seconds"] else None,
            "raw": row}
    return results


def _encode(embedder: Embedder, mode: str, texts: list[str], ids: list[list[int]]) -> np.ndarray:
    if mode == "ids":
        return embedder.encode_ids([np.asarray(i, dtype=np.int32) for i in ids])
    return embedder.encode(texts)


def report(results: dict) -> None:
    def fmt(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    print(f"\nmean ± 95% t-interval over {results['samples']} samples of {results['documents_per_sample']} documents "
          f"({results['corpus']}); random order same-domain share {fmt(results['random_same_domain'])}")
    print(f"{'embedder':22s} {'docs/s':>16s} {'MB/s':>14s} {'x MiniLM':>14s} {'cos to MiniLM':>15s} "
          f"{'NN same domain':>16s} {'walk same domain':>17s} {'fit s':>12s}")
    for label, row in results["embedders"].items():
        cosine = row["cosine_to_reference"]
        cos = f"{cosine['mean']:.4f}/{cosine['min']:.3f}" if cosine else "-"
        ratio = fmt(row["ratio_to_reference"], 2) if row["ratio_to_reference"] else "-"
        fit = fmt(row["fit_seconds"], 1) if row.get("fit_seconds") else "-"
        print(f"{label:22s} {fmt(row['docs_per_s'], 1):>16s} {fmt(row['mb_per_s'], 2):>14s} "
              f"{ratio:>14s} {cos:>15s} {fmt(row['nearest_same_domain']):>16s} "
              f"{fmt(row['walk_same_domain']):>17s} {fit:>12s}")
    print("(cos to MiniLM: mean/min over documents; fit s: seconds to fit the LSA table on the sample, not in docs/s)")


def plot(results: dict, path: Path) -> None:
    """Order quality against speed, one panel per measure, a legend entry per embedder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    markers = "osD^v<>PXh*"
    for ax, key, title in ((axes[0], "nearest_same_domain", "nearest neighbour of the same domain"),
                           (axes[1], "walk_same_domain", "adjacent documents of one domain (walk)")):
        for i, (label, row) in enumerate(results["embedders"].items()):
            (x, dx), (y, dy) = row["docs_per_s"], row[key]
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=markers[i % len(markers)], color=f"C{i % 10}", capsize=3,
                        label=label)
        ax.axhline(results["random_same_domain"][0], color="grey", ls=":", label="random order")
        ax.set_xscale("log")
        ax.set_xlabel("documents / s (log)")
        ax.set_ylabel("share")
        ax.set_title(title, fontsize=10)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"{results['corpus']}: {results['samples']} × {results['documents_per_sample']} documents, "
                 f"{results['torch_threads']} threads (mean ± 95% interval over samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="jsonl(.zst) corpus with a 'domain' field")
    parser.add_argument("--docs", type=int, default=300, help="documents per sample")
    parser.add_argument("--samples", type=int, default=3, help="disjoint samples (the intervals' n)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document draw")
    parser.add_argument("--batch-size", type=int, default=64, help="transformer batch size")
    parser.add_argument("--static-batch-size", type=int, default=64, help="static models' batch size")
    parser.add_argument("--static-cuts", type=int, nargs="*", default=[512],
                        help="other token budgets for static models (labels '... cut N')")
    parser.add_argument("--lsa-dims", type=int, default=lexical_embed.DEFAULT_LSA_DIMS, help="LSA table columns")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default: torch's)")
    parser.add_argument("--chunk", type=int, default=50, help="documents each embedder embeds in turn")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"run only these labels (without {REFERENCE!r}: no ratios or cosines)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for results.json and embedders.png")
    parser.add_argument("--replot", action="store_true", help="only redraw OUT/embedders.png from OUT/results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        plot(json.loads((out / "results.json").read_text()), out / "embedders.png")
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    results = run(args)
    report(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "embedders.png")
    print(f"wrote {out / 'results.json'} and {out / 'embedders.png'}")


if __name__ == "__main__":
    main()
