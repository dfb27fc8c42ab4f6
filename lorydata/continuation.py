"""Which sequences begin with the continuation of a document from the previous sequence.

Shards do not store it: `doc_starts` always begins with 0, whether the first piece is a
document's beginning or the rest of a document cut at the previous sequence's end. The
packer (`lorydata.pack`) puts an EOS after every document, so the previous sequence in
packing order (`seq_id - 1`) tells: when it ends inside a document (its last token is
neither EOS nor padding), sequence `seq_id` continues that document. A continuation also
keeps its domain, so a domain change rules one out.

One case this cannot see: `lory build-corpus` packs the corpus in units (about 4M tokens
each, `counts.packing_units` in the manifest) and, with `--tail drop`, drops each unit's
partial last sequence. When that dropped tail held the rest of a document, the unit's last
kept sequence ends inside it, and the next unit's first sequence (a fresh document of the
same domain) is flagged as a continuation. That is a false positive at most once per unit
boundary; a true continuation is never missed (unless a document's text itself encodes to
the EOS id at exactly the cut).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lorydata.errors import ShardError
from lorydata.manifest import Manifest
from lorydata.progress import progress_bar
from lorydata.shards import read_shard


def _row_ends(table: pa.Table, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """seq_id, last token, first-piece domain and last-piece domain of every row of a shard."""
    flat = table.column("input_ids").combine_chunks().values.to_numpy()
    domains = table.column("domains").combine_chunks()
    offsets = domains.offsets.to_numpy()  # every row has at least one piece
    first = domains.values.take(pa.array(offsets[:-1])).to_numpy(zero_copy_only=False)
    last = domains.values.take(pa.array(offsets[1:] - 1)).to_numpy(zero_copy_only=False)
    return table.column("seq_id").to_numpy(), flat[seq_len - 1 :: seq_len], first, last


def continued_sequences(folder: str | Path, manifest: Manifest | None = None, read=None) -> np.ndarray:
    """Per `seq_id`, whether the sequence's first piece continues a document of sequence
    `seq_id - 1` (see the module docstring for the one case it over-reports).

    Reads every shard once (the `input_ids`, `seq_id` and `domains` columns).

    Args:
        folder: a shard folder.
        manifest: its manifest, when already read.
        read: `entry -> pa.Table` that reads a shard (e.g. `lorydata.shard_source`'s, for a
            folder behind a URL); default: the file in `folder`.

    Returns:
        bool array indexed by `seq_id` (length: the largest seq_id + 1); False where the
        previous seq_id is not in the folder.

    Raises:
        ShardError: a shard is unreadable, or a seq_id is negative or repeats.
    """
    manifest = manifest or Manifest.read(folder)
    read = read or (lambda entry: read_shard(Path(folder) / entry.file, manifest.seq_len))
    eos, pad = manifest.tokenizer.get("eos_id"), manifest.tokenizer.get("pad_id")
    shards = []  # (seq_ids, ends inside a document, first-piece domain, last-piece domain)
    for entry in progress_bar(manifest.shards, description="continuations"):
        seq_ids, last_tokens, first, last = _row_ends(read(entry), manifest.seq_len)
        if len(seq_ids) and seq_ids.min() < 0:
            raise ShardError(f"{entry.file} holds a negative seq_id")
        shards.append((seq_ids, (last_tokens != eos) & (last_tokens != pad), first, last))
    n = max((int(ids.max()) + 1 for ids, *_ in shards if len(ids)), default=0)
    open_end, seen = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    first_domain, last_domain = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
    for (seq_ids, ends, first, last), entry in zip(shards, manifest.shards, strict=True):
        if seen[seq_ids].any() or len(np.unique(seq_ids)) != len(seq_ids):
            raise ShardError(f"{entry.file} repeats a seq_id: seq_ids must be unique in a folder")
        seen[seq_ids], open_end[seq_ids] = True, ends
        first_domain[seq_ids], last_domain[seq_ids] = first, last
    continued = np.zeros(n, dtype=bool)
    if n > 1:
        same_domain = (last_domain[:-1] == first_domain[1:]).astype(bool)
        continued[1:] = open_end[:-1] & seen[:-1] & seen[1:] & same_domain
    return continued
