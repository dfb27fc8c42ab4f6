"""Shard bytes pinned: the bundled sample built in both orders must give exactly the shards
recorded in `golden/sample_shards.json`, so a refactor or a speed change of the pipeline
cannot change what a build writes unnoticed.

After a change that is meant to alter the shards, rewrite the record with
`python -m tests.pipelines.test_golden_shards` and say why in the commit.
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest

from lorydata.manifest import Manifest
from pipelines.build_corpus import build_corpus
from pipelines.options import BuildOptions

GOLDEN = Path(__file__).parent / "golden" / "sample_shards.json"
SAMPLE = Path(__file__).resolve().parents[2] / "lorydata" / "assets" / "sample" / "sample.jsonl.zst"
# Small enough for seconds per build, large enough for several units and shards per split.
SETTINGS = {"seq_len": 256, "domain_field": "domain", "heldout_fraction": 0.1, "rows_per_shard": 64, "seed": 3,
            "k": 8, "embed_max_tokens": 64, "max_chars": 4000}


def shard_hashes(order: str, out: Path) -> dict[str, list[str]]:
    """sha256 of every shard of both splits of a build of the bundled sample."""
    build_corpus(BuildOptions(inputs=[str(SAMPLE)], out=str(out), order=order, **SETTINGS), log=lambda *_: None)
    return {split: [s.sha256 for s in Manifest.read(out / split).shards] for split in ("train", "heldout")}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["random", "similarity"])
def test_bundled_sample_gives_the_recorded_shards(order, tmp_path):
    assert shard_hashes(order, tmp_path / order) == json.loads(GOLDEN.read_text())[order]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        record = {order: shard_hashes(order, Path(tmp) / order) for order in ("random", "similarity")}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
