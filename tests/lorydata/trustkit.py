"""Hostile shard folders for the trust tests: rewritten shards and manifests, with hashes that
match (whoever can write a folder can write matching hashes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorydata.manifest import MANIFEST_NAME, Manifest
from lorydata.pack import PackedSequence
from lorydata.shards import read_shard, sequences_to_table, write_shard


def set_token(folder: Path, shard: int, row: int, position: int, value: int) -> None:
    """Overwrite one token id of one row of a shard, and re-record the shard in the manifest."""
    manifest = Manifest.read(folder)
    entry = manifest.shards[shard]
    table = read_shard(folder / entry.file, manifest.seq_len)
    ids = table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, manifest.seq_len).copy()
    ids[row, position] = value
    rows = table.to_pylist()
    sequences = [PackedSequence(ids[i].astype(np.int32), r["doc_starts"], r["domains"], r["seq_id"])
                 for i, r in enumerate(rows)]
    manifest.shards[shard] = write_shard(sequences_to_table(sequences, manifest.seq_len), folder, entry.file)
    manifest.write(folder)


def edit_manifest(folder: Path, edit) -> None:
    """Apply `edit` to the manifest's JSON and write it back (no checks: a hostile folder)."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
