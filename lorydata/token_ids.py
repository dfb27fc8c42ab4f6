"""Token ids of a shard checked against the vocabulary that made it.

An id outside `[0, vocab_size)` crashes the embedding lookup deep inside training (or, on
some devices, is silently clamped and trains on garbage), so shards are checked when they
are read: one vectorised min/max per shard, and the first bad row located only when the
range is wrong.
"""

from __future__ import annotations

import numpy as np

from lorydata.errors import ShardError


def manifest_vocab_size(manifest) -> int:
    """The vocabulary size a `lorydata.manifest.Manifest` records for its tokenizer.

    Raises:
        ShardError: it records none, or not a positive integer.
    """
    vocab = manifest.tokenizer.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ShardError(f"the manifest's tokenizer vocab_size is {vocab!r}, not a positive integer")
    return vocab


def token_id_problem(ids: np.ndarray, vocab_size: int, seq_len: int) -> str | None:
    """What is wrong with a shard's token ids, or None when all lie in `[0, vocab_size)`.

    Args:
        ids: the shard's `input_ids`, flat or one row per sequence.
        vocab_size: the tokenizer's vocabulary size.
        seq_len: tokens per row (to name the row of a bad id).
    """
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab_size):
        return None
    flat = ids.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    first = int(bad[0])
    rows = len(np.unique(bad // seq_len))
    return (f"row {first // seq_len} holds token id {int(flat[first])}, outside the vocabulary [0, {vocab_size}) "
            f"({len(bad)} such ids in {rows} row(s))")


def check_token_ids(ids: np.ndarray, manifest, shard: str) -> None:
    """Raise `ShardError` naming `shard` and the first row with an id outside the vocabulary
    of `manifest`'s tokenizer.

    Args:
        ids: the shard's `input_ids`, flat or one row per sequence.
        manifest: the folder's `lorydata.manifest.Manifest` (vocab_size and seq_len).
        shard: the shard's name, for the message.
    """
    problem = token_id_problem(ids, manifest_vocab_size(manifest), manifest.seq_len)
    if problem is not None:
        raise ShardError(f"shard {shard}: {problem}; rebuild the corpus or check its tokenizer")
