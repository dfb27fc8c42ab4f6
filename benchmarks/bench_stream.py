"""Object storage against local disk: training that streams its shards from a bucket, and a
similarity build that writes its corpus to one.

The bucket is a real S3 API: moto's server in its own process on 127.0.0.1, reached through
the standard AWS environment (AWS_ENDPOINT_URL, keys, region), exactly as lory reaches AWS
or MinIO. It sits on the same machine, so the figures measure lory's own overhead (fetching,
verifying, caching, the object-store commits of a build), not a network.

1. `lory train`, tiny preset: tokens/s reading the local folder vs streaming the same
   folder from the bucket into an empty cache (every shard is downloaded during the run),
   with 0 and 2 dataloader workers. Runs alternate local/bucket, `--repeats` times each.
   Step tokens/s is the trainer's own (data wait included); "aggregate" is tokens over the
   summed step times after the first `--skip` steps, so a stall waiting for a shard counts.
2. `lory build-corpus --order similarity`: wall time with `--out` a local folder vs
   `--out s3://…`, same input, the CLI as a user runs it; the shards of both are compared.

Goals (issue 25): streaming >= 0.9x local tokens/s; an S3 build <= 1.3x the local wall time.
Figures go to stdout and to --results (stream.json, stream.png).

    python benchmarks/bench_stream.py [--steps 150] [--repeats 3] [--build-repeats 3]
        [--build-input FILE] [--results DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from lorydata.manifest import MANIFEST_NAME, Manifest
from lorydata.pack import PackStats, pack_documents
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"
TRAIN = {"preset": "tiny", "ffn": "lory", "experts": 8, "batch_size": 8, "precision": "fp32", "device": "cpu",
         "dense_warmup": 0.0, "warmup": 1, "log_every": 1, "save_final": False}
SEQ_LEN = 256
ROWS_PER_SHARD = 128  # ~10 shards a run: the stream crosses many shard boundaries
BUILD = ["--order", "similarity", "--seq-len", "256", "--domain-field", "domain", "--rows-per-shard", "64",
         "--heldout-fraction", "0.1", "--seed", "0"]


# ---- the S3 server ------------------------------------------------------------------------
@contextlib.contextmanager
def s3_server():
    """moto's S3 server in a child process on a free port; the AWS environment points at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        import boto3  # a dev dependency (moto[server] brings it); lory itself reads through pyarrow

        client = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        yield client, bucket
    finally:
        server.terminate()
        server.wait()


def upload(client, bucket: str, folder: Path, prefix: str) -> str:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


# ---- 1. training --------------------------------------------------------------------------
def random_shards(folder: Path, sequences: int, seed: int = 0) -> Path:
    """A shard folder of random-token sequences (throughput does not care what they say)."""
    tok = Tokenizer()
    rng = np.random.default_rng(seed)
    docs = ((rng.integers(2, tok.vocab_size, size=SEQ_LEN - 1, dtype=np.int32), "random") for _ in range(sequences))
    stats = PackStats()
    writer = ShuffledShardWriter(folder, SEQ_LEN, rows_per_shard=ROWS_PER_SHARD, seed=seed)
    writer.add_all(pack_documents(docs, SEQ_LEN, tok.eos_id, tok.pad_id, "pad", stats))
    Manifest(seq_len=SEQ_LEN, tokenizer=tok.identity().to_dict(), shards=writer.finish(), counts=stats.to_dict(),
             order={"method": "random", "seed": seed, "metrics": {}}).write(folder)
    return folder


def time_train(data: str, out: Path, steps: int, skip: int, workers: int, cache: Path | None) -> dict:
    from lorytrain.training.config import make_config
    from lorytrain.training.metrics_log import read_metrics
    from lorytrain.training.trainer import Trainer

    options = {"data": data, "out": str(out), "steps": steps, "num_workers": workers, **TRAIN}
    if cache is not None:
        options["cache_dir"] = str(cache)
    started = time.perf_counter()
    Trainer(make_config(None, options), log=lambda *a, **k: None).train()
    wall = time.perf_counter() - started
    records = [r for r in read_metrics(out) if "loss" in r][skip:]
    tokens = [TRAIN["batch_size"] * SEQ_LEN] * len(records)  # one micro-batch a step
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, records, strict=True)]
    return {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "aggregate_tokens_per_s": sum(tokens) / sum(seconds), "wall_s": wall}


def bench_training(root: Path, client, bucket: str, args) -> list[dict]:
    local = random_shards(root / "train-data", sequences=TRAIN["batch_size"] * args.steps)
    url = upload(client, bucket, local, "train-data")
    shards = len(Manifest.read(local).shards)
    print(f"\n1. lory train, tiny preset, seq {SEQ_LEN} × batch {TRAIN['batch_size']}, {args.steps} steps, "
          f"{shards} shards of {ROWS_PER_SHARD} rows; local {local.name}/ vs {url} (cold cache each run)")
    results = []
    for repeat in range(args.repeats):
        for workers in args.workers:
            order = ("local", "s3") if repeat % 2 == 0 else ("s3", "local")
            for source in order:
                run = root / f"run-{source}-{workers}-{repeat}"
                cache = root / f"cache-{workers}-{repeat}" if source == "s3" else None
                figures = time_train(url if source == "s3" else str(local), run, args.steps, args.skip, workers, cache)
                results.append({"source": source, "workers": workers, "repeat": repeat, **figures})
                print(f"  repeat {repeat} workers {workers} {source:5s}: {figures['median_tokens_per_s']:>9,.0f} tok/s "
                      f"median, {figures['aggregate_tokens_per_s']:>9,.0f} aggregate, {figures['wall_s']:.1f}s wall")
    return results


# ---- 2. build -----------------------------------------------------------------------------
def time_build(inputs: list[str], out: str, cwd: Path) -> tuple[float, list[str]]:
    """Wall time of the build, and the files it left in its (empty, private) working directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORY_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cwd.mkdir(parents=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", "build-corpus", *inputs, "--out", out, *BUILD], cwd=cwd,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"build-corpus --out {out} failed:\n{done.stderr[-2000:]}")
    return wall, sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())


def shard_hashes_s3(client, bucket: str, prefix: str) -> list[str]:
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/train/{MANIFEST_NAME}")["Body"].read()
    return [s["sha256"] for s in json.loads(body)["shards"]]


def bench_build(root: Path, client, bucket: str, args) -> list[dict]:
    inputs = [args.build_input]
    print(f"\n2. lory build-corpus {Path(args.build_input).name} {' '.join(BUILD)}: --out local vs --out s3://")
    results = []
    for repeat in range(args.build_repeats):
        order = ("local", "s3") if repeat % 2 == 0 else ("s3", "local")
        for target in order:
            prefix = f"build-{repeat}"
            out = f"s3://{bucket}/{prefix}" if target == "s3" else str(root / prefix)
            wall, stray = time_build(inputs, out, root / f"cwd-{target}-{repeat}")
            results.append({"target": target, "repeat": repeat, "wall_s": wall, "local_files": len(stray)})
            note = f" (wrote {len(stray)} files in its working directory, e.g. {stray[0]})" if stray else ""
            print(f"  repeat {repeat} {target:5s}: {wall:.1f}s{note}")
        local_hashes = [s.sha256 for s in Manifest.read(root / f"build-{repeat}" / "train").shards]
        same = shard_hashes_s3(client, bucket, f"build-{repeat}") == local_hashes
        print(f"  repeat {repeat}: S3 shards {'identical to' if same else 'DIFFER from'} the local build's")
        results[-1]["identical_shards"] = same
    return results


# ---- report -------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def summarise(training: list[dict], building: list[dict]) -> dict:
    summary = {"training": {}, "build": {}}
    print("\nsummary (ratios per repeat, mean (min, max))")
    for workers in sorted({r["workers"] for r in training}):
        pairs = {}
        for r in training:
            if r["workers"] == workers:
                pairs.setdefault(r["repeat"], {})[r["source"]] = r
        for key in ("median_tokens_per_s", "aggregate_tokens_per_s"):
            ratios = [p["s3"][key] / p["local"][key] for p in pairs.values()]
            summary["training"][f"workers={workers} {key}"] = ratios
            print(f"  train, {workers} workers, S3/local {key.removesuffix('_tokens_per_s')} tokens/s: "
                  f"{spread(ratios)} (goal >= 0.9)")
    if building:
        pairs = {}
        for r in building:
            pairs.setdefault(r["repeat"], {})[r["target"]] = r["wall_s"]
        ratios = [p["s3"] / p["local"] for p in pairs.values()]
        summary["build"]["s3/local wall"] = ratios
        print(f"  build, S3/local wall time: {spread(ratios)} (goal <= 1.3)")
    return summary


def plot(training: list[dict], building: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    workers = sorted({r["workers"] for r in training})
    for offset, source in ((-0.2, "local"), (0.2, "s3")):
        values = [[r["aggregate_tokens_per_s"] for r in training if r["workers"] == w and r["source"] == source]
                  for w in workers]
        axes[0].bar([i + offset for i in range(len(workers))], [statistics.mean(v) for v in values], width=0.4,
                    yerr=[[statistics.mean(v) - min(v) for v in values], [max(v) - statistics.mean(v) for v in values]],
                    label=source, capsize=4)
    axes[0].set_xticks(range(len(workers)), [f"{w} workers" for w in workers])
    axes[0].set_ylabel("tokens/s (aggregate)")
    axes[0].set_title("lory train, tiny preset")
    axes[0].legend()
    if building:
        for i, target in enumerate(("local", "s3")):
            values = [r["wall_s"] for r in building if r["target"] == target]
            axes[1].bar(i, statistics.mean(values), yerr=[[statistics.mean(values) - min(values)],
                                                          [max(values) - statistics.mean(values)]], capsize=4)
        axes[1].set_xticks([0, 1], ["--out local", "--out s3://"])
        axes[1].set_ylabel("wall time (s)")
        axes[1].set_title("lory build-corpus --order similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def repo_relative(value):
    """A path inside the repository as a repo-relative one (results name no path of this machine)."""
    if isinstance(value, str) and value.startswith(str(ROOT) + os.sep):
        return os.path.relpath(value, ROOT)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the step figures")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-repeats", type=int, default=3, help="0 skips the build comparison")
    parser.add_argument("--build-input", default=str(SAMPLE), help="build input (default: the bundled sample)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "stream"),
                        help="folder for stream.json and stream.png")
    args = parser.parse_args()
    os.environ.setdefault("LORY_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, s3_server() as (client, bucket):
        root = Path(tmp)
        training = bench_training(root, client, bucket, args)
        building = bench_build(root, client, bucket, args) if args.build_repeats else []
    summary = summarise(training, building)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    shown = {k: repo_relative(v) for k, v in vars(args).items()}
    (folder / "stream.json").write_text(json.dumps({"args": shown, "training": training, "build": building,
                                                    "ratios": summary}, indent=2))
    plot(training, building, folder / "stream.png")
    print(f"figures: {folder / 'stream.json'}, {folder / 'stream.png'}")


if __name__ == "__main__":
    main()
