"""What the batcher's library paths cost, against one plain read of every shard in the same process.

- `ShardDataset(with_metadata=True)` at start-up: the continuation flags read every shard once
  (`lorydata.continuation`), next to `with_metadata=False`;
- `lory export-corpus` to megatron, olmo and parquet (staging in seq_id order, then writing).

The folder holds random-token documents of random lengths (what is measured does not depend on
what the tokens say), packed and shuffled into zstd shards like `build-corpus` writes them.

    python benchmarks/bench_batcher_io.py [--tokens 16000000] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lorydata.dataset import ShardDataset
from lorydata.export import export_corpus
from lorydata.export.megatron import _indexed_dataset_module
from lorydata.manifest import Manifest
from lorydata.pack import PackStats, pack_documents
from lorydata.shards import ShuffledShardWriter, read_shard
from lorydata.tokenizer import Tokenizer


def random_documents_folder(folder: Path, tokens: int, seq_len: int, seed: int = 0) -> Manifest:
    """Shards of random documents (lognormal lengths, median about 300 tokens) totalling `tokens`."""
    tok = Tokenizer()
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(300), 1.0, size=tokens // 300).astype(np.int64))
    lengths = lengths[: np.searchsorted(np.cumsum(lengths + 1), tokens) + 1]
    domains = ["a", "b", "c", "d", "e"]
    docs = ((rng.integers(2, tok.vocab_size, size=n, dtype=np.int32), domains[i % 5]) for i, n in enumerate(lengths))
    stats = PackStats()
    writer = ShuffledShardWriter(folder, seq_len, rows_per_shard=512, seed=seed)
    writer.add_all(pack_documents(docs, seq_len, tok.eos_id, tok.pad_id, "drop", stats))
    manifest = Manifest(seq_len=seq_len, tokenizer=tok.identity().to_dict(), shards=writer.finish(),
                        counts=stats.to_dict(), order={"method": "random", "seed": seed, "metrics": {}})
    manifest.write(folder)
    return manifest


def timed(fn, repeats: int = 1) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def read_every_shard(folder: Path, manifest: Manifest) -> None:
    for entry in manifest.shards:
        read_shard(folder / entry.file, manifest.seq_len).column("input_ids").combine_chunks().values.to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16_000_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = random_documents_folder(root / "train", args.tokens, args.seq_len)
        folder, tokens = root / "train", manifest.num_rows * manifest.seq_len
        shard_mb = sum(s.bytes for s in manifest.shards) / 1e6
        print(f"{manifest.num_rows:,} sequences × {manifest.seq_len} = {tokens / 1e6:.1f}M tokens, "
              f"{len(manifest.shards)} shards, {shard_mb:.0f} MB zstd")
        _indexed_dataset_module()  # megatron-core's import (seconds) is not the export's cost
        reference = timed(lambda: read_every_shard(folder, manifest), repeats=5)
        label = "reference: read every shard (median of 5)"
        print(f"{label:44s} {reference:7.2f} s  ({tokens / reference / 1e6:.1f}M tokens/s)")
        rows = [("ShardDataset() start-up, median of 5", lambda: ShardDataset(folder), 5),
                ("ShardDataset(with_metadata=True) start-up", lambda: ShardDataset(folder, with_metadata=True), 5)]
        rows += [(f"export-corpus --format {fmt}", lambda fmt=fmt: export_corpus(folder, root / fmt, fmt), 1)
                 for fmt in ("parquet", "olmo", "megatron")]
        for name, fn, repeats in rows:
            seconds = timed(fn, repeats)
            print(f"{name:44s} {seconds:7.2f} s  ({seconds / reference:5.2f}x the reference read)")


if __name__ == "__main__":
    main()
