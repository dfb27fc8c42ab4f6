"""Last stage: pack one split in walk order, shuffle sequences, write shards and manifest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lorydata.manifest import Manifest
from lorydata.pack import PackStats, SequencePacker
from lorydata.progress import progress_bar
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer
from pipelines.options import BuildOptions
from pipelines.split_data import SplitDocuments


def _ordered(docs: SplitDocuments, order: np.ndarray, label: str) -> Iterator[tuple[np.ndarray, str]]:
    for i in progress_bar(order, total=len(order), description=f"pack {label}"):
        yield docs.tokens(int(i)), str(docs.domains[i])


def write_split_shards(
    docs: SplitDocuments,
    order: np.ndarray,
    options: BuildOptions,
    tokenizer: Tokenizer,
    folder: Path,
    split: str,
    manifest_fields: dict,
) -> Manifest:
    """Pack `docs` in `order`, write shuffled shards and the manifest into `folder`.

    Args:
        docs: the split's documents (canonical order).
        order: the walk order, a permutation of document indices.
        options: build options (seq_len, tail, rows_per_shard, seed).
        tokenizer: supplies EOS / pad ids and the identity recorded in the manifest.
        folder: output folder (must be empty or new).
        split: "train" or "heldout".
        manifest_fields: extra manifest fields (counts, order, embedder, index, options).
    """
    packer = SequencePacker(options.seq_len, tokenizer.eos_id, tokenizer.pad_id, options.tail)
    writer = ShuffledShardWriter(folder, options.seq_len, options.rows_per_shard, seed=options.seed)
    for tokens, domain in _ordered(docs, order, split):
        for sequence in packer.add(tokens, domain):
            writer.add(sequence)
    for sequence in packer.finish():
        writer.add(sequence)
    shards = writer.finish()
    stats: PackStats = packer.stats
    counts = dict(manifest_fields.pop("counts", {}))
    counts.update(
        {
            "documents": len(docs),
            "sequences": stats.sequences,
            "tokens": stats.tokens,
            "continued_documents": stats.continued_documents,
            "tail_tokens_dropped": stats.tail_tokens_dropped,
            "pad_tokens": stats.pad_tokens,
        }
    )
    manifest = Manifest(
        seq_len=options.seq_len,
        tokenizer=tokenizer.identity().to_dict(),
        shards=shards,
        counts=counts,
        split=split,
        **manifest_fields,
    )
    manifest.write(folder)
    return manifest
