"""Dump benchmark: `lory build-corpus --order similarity` end to end on a synthetic dump of N
documents, with docs/s and MB/s per stage, wall time, the peak RSS of every process, the
disk the build used and its file counts.

The dump: windows of about --doc-chars characters of the documents of --corpus (default: the
bundled sample; the dev corpus for real figures), one domain per window, with a few percent
of the words edited, so every document is distinct and reads like its domain; a share
(--plant-copies) of them get a near-copy (one word in 50 replaced), so near-dedup has work.
Written as --files jsonl.zst files, generated once per size and kept in --cache.

Each build is a subprocess (`python -m cli build-corpus ... --json`), its process tree
polled with psutil (`bench_scale.run_measured`): the driver is the lory process, workers its
descendants. The time of each stage comes from the build's own summary.

Usage:
    python benchmarks/bench_dump.py --docs 20000 --embedder static
    python benchmarks/bench_dump.py --corpus PATH/dev_corpus/train.jsonl.zst --docs 100000,1000000 --embedder static
    python benchmarks/bench_dump.py --docs 20000 --runner dask --workers 2
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
from pathlib import Path

import zstandard

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SAMPLE, load_documents, shown_args  # noqa: E402
from bench_scale import run_measured  # noqa: E402

# bench_scale turns the tokenizers' threads off for its own measurements; a build runs as users run it.
os.environ.pop("TOKENIZERS_PARALLELISM", None)
GB = 1 << 30


def edited(words: list[str], rng: random.Random, share: float, vocabulary: list[str]) -> list[str]:
    """`words` with about `share` of them replaced by words drawn from `vocabulary`."""
    return [rng.choice(vocabulary) if rng.random() < share else w for w in words]


def write_dump(docs: list[dict], n: int, doc_chars: int, folder: Path, files: int, copies: float,
               seed: int = 0) -> dict:
    """Write a synthetic dump of `n` documents (plus planted near-copies) as `files`
    jsonl.zst files in `folder`; returns its document, copy and byte counts."""
    streams: dict[str, list[str]] = {}
    for doc in docs:
        streams.setdefault(doc["domain"] or "", []).extend(doc["text"].split(" "))
    domains = sorted(streams)
    vocabulary = sorted({w for words in streams.values() for w in words[:20000]})
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    raw, planted = 0, 0
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(zstandard.ZstdCompressor(level=3).stream_writer(
            stack.enter_context(open(folder / f"dump-{i:03d}.jsonl.zst", "wb")))) for i in range(files)]
        for i in range(n):
            domain = domains[i % len(domains)]
            stream = streams[domain]
            width = max(1, doc_chars // 6)
            start = rng.randrange(max(1, len(stream) - width))
            words = edited(stream[start:start + width], rng, 0.03, vocabulary)
            lines = [json.dumps({"text": " ".join(words), "domain": domain})]
            if rng.random() < copies:
                lines.append(json.dumps({"text": " ".join(edited(words, rng, 0.02, vocabulary)), "domain": domain}))
                planted += 1
            data = ("\n".join(lines) + "\n").encode()
            raw += len(data)
            writers[i % files].write(data)
    return {"documents": n + planted, "planted_copies": planted, "bytes": raw}


def disk_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) below `folder`."""
    total, count = 0, 0
    for path in folder.rglob("*"):
        if path.is_file():
            total += path.stat().st_size
            count += 1
    return total, count


def build(dump: Path, out: Path, args, log: Path) -> dict:
    command = [sys.executable, "-m", "cli", "build-corpus", str(dump), "--out", str(out), "--order", args.order,
               "--seq-len", str(args.seq_len), "--domain-field", "domain", "--json"]
    if args.embedder:
        command += ["--embedder", args.embedder]
    if args.runner == "dask":
        command += ["--runner", "dask", "--workers", str(args.workers)]
    command += args.extra
    figures, stdout = run_measured(command, log, args.poll)
    summary = json.loads(stdout)
    disk, files = disk_usage(out)
    manifest = out / "train" / ".manifest.json"
    partitions = json.loads(manifest.read_text()).get("order", {}).get("partitions", {}) if manifest.exists() else {}
    return {**figures, "summary": summary, "disk_bytes": disk, "files": files,
            "work_files": sum(1 for p in (out / "_work").rglob("*") if p.is_file()),
            "cell_sizes": partitions.get("cell_sizes", []), "kmeans_cells": partitions.get("used"),
            "cells_split": partitions.get("split", 0)}


def report(size: int, dump: dict, result: dict) -> dict:
    """Per-stage and whole-build rates of one build."""
    docs, mb = dump["documents"], dump["bytes"] / 1e6
    stages = {name: s["seconds"] for name, s in result["summary"]["stages"].items()}
    wall = result["wall_s"]
    return {"docs": size, "documents": docs, "mb": mb, "wall_s": wall, "docs_per_s": docs / wall,
            "mb_per_s": mb / wall, "stages": {name: {"seconds": s, "docs_per_s": docs / s if s else None,
                                                      "mb_per_s": mb / s if s else None}
                                             for name, s in stages.items()},
            "driver_rss_gb": result["driver_rss"] / GB, "worker_rss_gb": result["worker_rss"] / GB,
            "disk_gb": result["disk_bytes"] / GB, "files": result["files"], "work_files": result["work_files"],
            "kept": result["summary"]["documents"].get("documents_kept"),
            "pipelines": {name: p["seconds"] for name, p in result["summary"].get("partitions", {}).items()
                          if "seconds" in p},
            "cell_sizes": result["cell_sizes"], "kmeans_cells": result["kmeans_cells"],
            "cells_split": result["cells_split"],
            "driver_peak_s": result["driver_peak_s"], "driver_peak_stage": stage_at(result["driver_peak_s"], wall, stages),
            "driver_rss_timeline": [[round(t, 1), round(rss / GB, 3)] for t, rss in result["driver_timeline"]]}


def stage_at(seconds: float, wall: float, stages: dict[str, float]) -> str:
    """The stage running `seconds` into a build of `wall` seconds whose stages took `stages`
    (in order), taking the time outside the stages (start-up, mostly) as spent before them."""
    clock = wall - sum(stages.values())
    if seconds < clock:
        return "start-up"
    for name, spent in stages.items():
        clock += spent
        if seconds < clock:
            return name
    return "end"



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(SAMPLE), help="jsonl(.zst/.gz) source corpus with a domain field")
    parser.add_argument("--docs", default="20000", help="dump sizes in documents, comma-separated")
    parser.add_argument("--doc-chars", type=int, default=2000)
    parser.add_argument("--files", type=int, default=16, help="input files per dump")
    parser.add_argument("--plant-copies", type=float, default=0.03, help="share of documents given a near-copy")
    parser.add_argument("--embedder", default=None, help="--embedder of the build (default: the bundled MiniLM)")
    parser.add_argument("--order", default="similarity", choices=["similarity", "random"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--runner", default="default", choices=["default", "dask"])
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (--runner dask)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lory-bench-dump"),
                        help="folder of the generated dumps (kept between runs)")
    parser.add_argument("--results", default=None, help="write the figures as JSON here")
    parser.add_argument("extra", nargs="*", help="more build-corpus flags after --")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    source = load_documents(args.corpus, None)
    rows = []
    for size in sorted(int(s) for s in args.docs.split(",")):
        dump_dir = Path(args.cache) / f"dump-{size}-{args.doc_chars}-{args.files}-{args.plant_copies}"
        meta_file = dump_dir / "dump.json"
        if not meta_file.exists():
            console.print(f"writing a dump of {size:,} documents to {dump_dir} …")
            meta = write_dump(source, size, args.doc_chars, dump_dir, args.files, args.plant_copies)
            meta_file.write_text(json.dumps(meta))
        meta = json.loads(meta_file.read_text())
        out = Path(tempfile.mkdtemp(prefix="bench_dump_")) / "corpus"
        try:
            console.print(f"building {meta['documents']:,} documents ({meta['bytes'] / 1e6:.0f} MB) …")
            result = build(dump_dir, out, args, out.parent / "build.log")
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        row = report(size, meta, result)
        rows.append(row)
        table = Table(title=f"{row['documents']:,} documents, {row['mb']:.0f} MB, --order {args.order}, "
                            f"embedder {args.embedder or 'MiniLM'}, runner {args.runner}")
        for column in ("stage", "seconds", "docs/s", "MB/s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for name, stage in row["stages"].items():
            rate = f"{stage['docs_per_s']:,.0f}" if stage["docs_per_s"] else "-"
            table.add_row(name, f"{stage['seconds']:.1f}", rate, f"{stage['mb_per_s'] or 0:.2f}")
        table.add_row("whole build (wall)", f"{row['wall_s']:.1f}", f"{row['docs_per_s']:,.0f}", f"{row['mb_per_s']:.2f}")
        console.print(table)
        console.print("Beam pipelines (seconds, named by their last step): "
                      + ", ".join(f"{name} {s:.1f}" for name, s in row["pipelines"].items()))
        if row["cell_sizes"]:  # a worker's memory follows the largest cell (its kNN graph, its unit's packing)
            console.print(f"k-means cells: {len(row['cell_sizes'])} ({row['kmeans_cells']} trained, "
                          f"{row['cells_split']} split), largest {max(row['cell_sizes']):,} documents, "
                          f"mean {sum(row['cell_sizes']) / len(row['cell_sizes']):,.0f}")
        console.print(f"peak RSS: driver {row['driver_rss_gb']:.2f} GB (at {row['driver_peak_s']:.0f} s, "
                      f"{row['driver_peak_stage']}), largest worker {row['worker_rss_gb']:.2f} GB; "
                      f"disk {row['disk_gb']:.2f} GB in {row['files']:,} files ({row['work_files']:,} in _work/)")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        per_doc = (last["wall_s"] / last["documents"]) / (first["wall_s"] / first["documents"])
        rss = max(last["driver_rss_gb"], last["worker_rss_gb"]) / max(first["driver_rss_gb"], first["worker_rss_gb"])
        console.print(f"{last['documents']:,} vs {first['documents']:,} documents: time per document {per_doc:.2f}×, "
                      f"peak RSS {rss:.2f}×")
    if args.results:
        Path(args.results).write_text(json.dumps({"args": shown_args(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
