"""Stage 4, shards: pack one split unit by unit, spread the sequences over shuffled shards,
write the shards and the manifest. Three Beam steps (`steps`): route tokens to units, pack
each unit, assemble each shard.

So every shard is a uniform sample of the whole split, as with one global shuffle, while a
worker holds one unit's tokens (about `order.split_data.UNIT_TOKENS`, or one k-means cell)
or one shard. The driver reads the per-unit and per-shard results and writes the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorydata.manifest import MANIFEST_NAME, Manifest, ShardInfo
from lorydata.pack import PackStats
from lorydata.tokenizer import Tokenizer
from pipelines import fileio, layout
from pipelines.runner.beam import BeamRunner
from pipelines.shards.steps import AssembleShardFn, PackUnitFn, RouteTokensFn, sequences_per_unit

TOKENIZER_FILE = "tokenizer.json"  # beside the manifest, so a copied corpus keeps its tokenizer


@dataclass(frozen=True)
class ShardsConfig:
    """How a split is packed and written.

    Args:
        seq_len: tokens per sequence.
        tail: "drop" or "pad" the last partial sequence of each unit.
        rows_per_shard: sequences per shard file.
        seed: seed of the sequence shuffle.
    """

    seq_len: int
    tail: str = "drop"
    rows_per_shard: int = 1024
    seed: int = 0


def write_split_shards(config: ShardsConfig, runner: BeamRunner, tokenizer: Tokenizer, documents_dir: str,
                       order_dir: str, folder: str, split: str, manifest_fields: dict) -> Manifest:
    """Pack the split unit by unit, write shuffled shards and the manifest into `folder`.

    Args:
        config: the stage's options.
        runner: where the Beam steps run.
        tokenizer: supplies EOS / pad ids and the identity recorded in the manifest.
        documents_dir: the finished documents stage folder.
        order_dir: the finished order stage folder of the split (routes, units).
        folder: output folder (the shards stage's temp folder).
        split: "train" or "heldout".
        manifest_fields: extra manifest fields (counts, order, embedder, index, options).
    """
    folder, order_dir = str(folder), str(order_dir)
    scratch = layout.scratch_folder(folder)
    units = fileio.load_npy(layout.units_file(order_dir))
    per_unit = sequences_per_unit(units[:, 1], config.seq_len, config.tail)
    first = np.cumsum(per_unit) - per_unit
    total = int(per_unit.sum())
    rows = config.rows_per_shard
    work = [(int(u), int(first[u]), int(per_unit[u])) for u in np.flatnonzero(units[:, 0] > 0)]
    # Largest units first, so the longest task is not the last one a worker picks up.
    work.sort(key=lambda e: -units[e[0], 1])
    shard_count = math.ceil(total / rows)
    runner.run_steps(folder, [
        ("Route", layout.documents_files(str(documents_dir)), RouteTokensFn(order_dir, scratch)),
        ("Pack", work, PackUnitFn(scratch, config.seq_len, tokenizer.eos_id, tokenizer.pad_id, config.tail, total,
                                  rows, config.seed)),
        ("Assemble", list(range(shard_count)), AssembleShardFn(scratch, folder, total, rows, config.seed)),
    ])
    shards = [ShardInfo(**fileio.load_json(layout.shard_info_file(scratch, s))) for s in range(shard_count)]
    stats = PackStats()
    for path in layout.pack_stats_files(scratch):
        for name, value in fileio.load_json(path).items():
            setattr(stats, name, getattr(stats, name) + value)
    counts = dict(manifest_fields.pop("counts", {}))
    counts.update({"documents": int(units[:, 0].sum()), "sequences": stats.sequences, "tokens": stats.tokens,
                   "continued_documents": stats.continued_documents, "packing_units": len(units),
                   "tail_tokens_dropped": stats.tail_tokens_dropped, "pad_tokens": stats.pad_tokens})
    # The corpus carries its tokenizer: a relative name and its sha256, never a path of this machine.
    fileio.write_bytes(fileio.join(folder, TOKENIZER_FILE), tokenizer.path.read_bytes())
    identity = {**tokenizer.identity().to_dict(), "file": TOKENIZER_FILE}
    del identity["path"]
    manifest = Manifest(seq_len=config.seq_len, tokenizer=identity, shards=shards, counts=counts, split=split,
                        **manifest_fields)
    fileio.write_bytes(fileio.join(folder, MANIFEST_NAME), manifest.to_bytes())
    return manifest
