"""Small real-text shard folders and run helpers for the training tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from lorydata.documents import Document
from lorydata.manifest import Manifest, manifest_path
from lorydata.pack import PackStats, pack_documents
from lorydata.readers import ReaderConfig, read_file
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer

# A 2-layer model small enough for CLI and training tests to train in seconds.
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "ffn_dim": 64, "segment_len": 16}

# One model of every FFN kind (and routing variant) for the model and generation tests.
FFN_VARIANTS = {
    "dense": dict(ffn="dense"),
    "lory": dict(ffn="lory"),
    "lory-uniform": dict(ffn="lory", first_segment="uniform"),
    "prefix": dict(ffn="prefix"),
    "topk2": dict(ffn="topk", top_k=2),
    "ec-token": dict(ffn="expert-choice", ec_level="token"),
    "ec-segment": dict(ffn="expert-choice", ec_level="segment"),
    "lory-samoe": dict(ffn="lory", samoe_pool=3),
}

SAMPLE = Path(__file__).resolve().parents[2] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"


def sample_documents(keep, max_chars: int = 3000) -> list[tuple[str, str]]:
    """(domain, text) of the bundled sample's documents whose index passes `keep`."""
    config = ReaderConfig(domain_field="domain")
    docs = [d for d in read_file(str(SAMPLE), config) if isinstance(d, Document)]
    return [(d.domain, d.text[:max_chars]) for i, d in enumerate(docs) if keep(i)]


def write_shards(folder: Path, documents: list[tuple[str, str]], seq_len: int, rows_per_shard: int = 16,
                 tokenizer: Tokenizer | None = None) -> Manifest:
    """Pack documents in the given order into shuffled shards with a manifest."""
    tok = tokenizer or Tokenizer()
    stats = PackStats()
    tokenized = ((tok.encode(text), domain) for domain, text in documents)
    writer = ShuffledShardWriter(folder, seq_len, rows_per_shard, seed=0)
    writer.add_all(pack_documents(tokenized, seq_len, tok.eos_id, tok.pad_id, "pad", stats))
    manifest = Manifest(seq_len=seq_len, tokenizer=tok.identity().to_dict(), shards=writer.finish(),
                        counts=stats.to_dict(), order={"method": "given", "seed": 0, "metrics": {}})
    manifest.write(folder)
    return manifest


def make_corpus(root: Path, seq_len: int = 64) -> tuple[Path, Path]:
    """Train (every 4th sample document) and held-out (every 20th, offset 1) shard folders."""
    train, heldout = root / "train", root / "heldout"
    if manifest_path(train) is None:
        write_shards(train, sample_documents(lambda i: i % 4 == 0), seq_len)
        write_shards(heldout, sample_documents(lambda i: i % 20 == 1, max_chars=1500), seq_len)
    return train, heldout


def train_tiny_run(train: Path, out: Path, **options) -> Path:
    """Train the TINY model for 6 steps (dense warm-up for half of them) on `train` into `out`;
    `options` override the training config (e.g. ffn="lory", experts=4)."""
    from lorytrain.training.config import make_config
    from lorytrain.training.trainer import Trainer

    config = make_config(None, {"data": str(train), "out": str(out), "steps": 6, "batch_size": 4, "lr": 1e-2,
                                "dense_warmup": 0.5, "model_overrides": TINY, **options})
    Trainer(config, log=lambda *a, **k: None).train()
    return out


def wait_for_steps(path: Path, steps: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the file at `path` (metrics, samples) has `steps` lines; the process must stay alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {steps} steps")
