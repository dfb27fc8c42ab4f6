"""Training throughput of `lory train`: dense vs Lory 8E in one process.

CPU (always): the tiny preset, fp32, tokens/s of each and the Lory/dense ratio.
CUDA (when a GPU is visible): a 0.3B-like model (the paper's 0.3b preset, 24 layers of
d=1024) dense and 8E in bf16, tokens/s and MFU.

Both run the real trainer (data loading, AdamW, clipping, logging) on shards of random
tokens written with the bundled tokenizer's identity; the first steps (allocation,
warm-up) are excluded from the timing. Each section runs on the device it names, and no
run writes a checkpoint.

    python benchmarks/bench_train.py [--steps 30] [--cuda-steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from lorydata.manifest import Manifest
from lorydata.pack import PackStats, pack_documents
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer


def random_shards(folder: Path, seq_len: int, sequences: int, seed: int = 0) -> Path:
    """A shard folder of `sequences` random-token sequences (throughput does not care what they say)."""
    tok = Tokenizer()
    rng = np.random.default_rng(seed)
    docs = ((rng.integers(2, tok.vocab_size, size=seq_len - 1, dtype=np.int32), "random") for _ in range(sequences))
    stats = PackStats()
    writer = ShuffledShardWriter(folder, seq_len, rows_per_shard=256, seed=seed)
    writer.add_all(pack_documents(docs, seq_len, tok.eos_id, tok.pad_id, "pad", stats))
    Manifest(seq_len=seq_len, tokenizer=tok.identity().to_dict(), shards=writer.finish(), counts=stats.to_dict(),
             order={"method": "random", "seed": seed, "metrics": {}}).write(folder)
    return folder


# the CPU section stays on the CPU on a GPU machine too
CPU_RUN = {"preset": "tiny", "batch_size": 8, "precision": "fp32", "device": "cpu"}
CUDA_RUN = {"preset": "0.3b", "batch_size": 8, "precision": "bf16", "device": "cuda"}


def time_run(data: Path, out: Path, skip: int, **options) -> dict:
    """Train with `options` and no checkpoint; median tokens/s (and MFU) over the steps after
    the first `skip`, and the device the run used."""
    from lorytrain.training.config import make_config
    from lorytrain.training.metrics_log import read_metrics
    from lorytrain.training.trainer import Trainer

    config = make_config(None, {"data": str(data), "out": str(out), "dense_warmup": 0.0, "log_every": 1,
                                "warmup": 1, "save_final": False, **options})
    trainer = Trainer(config, log=lambda *a, **k: None)
    trainer.train()
    records = [r for r in read_metrics(out) if "loss" in r][skip:]
    result = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records), "device": trainer.env.device.type}
    if records and "mfu" in records[0]:
        result["mfu"] = statistics.median(r["mfu"] for r in records)
    return result


def compare(title: str, data: Path, root: Path, skip: int, **options) -> None:
    dense = time_run(data, root / f"{title}-dense", skip, ffn="dense", **options)
    lory = time_run(data, root / f"{title}-lory", skip, ffn="lory", experts=8, **options)
    print(f"\n{title}")
    for name, result in (("dense", dense), ("lory-8E", lory)):
        mfu = f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
        print(f"  {name:8s} {result['tokens_per_s']:>10,.0f} tokens/s{mfu}")
    print(f"  lory-8E / dense throughput: {lory['tokens_per_s'] / dense['tokens_per_s']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cuda-steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("LORY_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cpu_data = random_shards(root / "cpu-data", seq_len=256, sequences=8 * args.steps)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        compare("CPU, tiny preset (d=64, 2 layers, T=32), seq 256 × batch 8, fp32", cpu_data, root, skip=3,
                steps=args.steps, **CPU_RUN)
        if torch.cuda.is_available():
            print(f"GPU: {torch.cuda.get_device_name()}")
            gpu_data = random_shards(root / "gpu-data", seq_len=2048, sequences=8 * args.cuda_steps)
            compare("CUDA, 0.3b preset (24 layers, d=1024, T=256), seq 2048 × batch 8, bf16", gpu_data, root, skip=5,
                    steps=args.cuda_steps, **CUDA_RUN)
        else:
            print("\nno CUDA GPU visible: GPU figures skipped")


if __name__ == "__main__":
    main()
