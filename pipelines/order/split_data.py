"""One split of the documents files, read a file at a time, and the routes that tell the
shards stage where each document goes.

Documents are identified by (documents file, row); every array written per documents file
is row-aligned with it. The order stage ends with one routes file per documents file
(`layout.routes_file`): an (n_rows, 2) int64 array of (unit, key) per row, unit -1 for rows
of another split or dropped ones. A *unit* is what one packing worker packs (a k-means
cell, or a block of walk positions); units are packed in their numbering order, and the
documents of a unit in their key order. The units file (`layout.units_file`) holds, per
unit, its documents and tokens (EOS included), from which the shards stage numbers the
sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.shuffle import mix64
from pipelines import fileio, layout

UNIT_TOKENS = 1 << 22  # tokens per packing block of a global or random order (16 MB of int32)


def hash_keys(content_hashes: pa.Array | list[str]) -> np.ndarray:
    """The first 64 bits of each content hash, as uint64 (uniform: they are hash bits)."""
    values = content_hashes.to_pylist() if hasattr(content_hashes, "to_pylist") else content_hashes
    return np.fromiter((int(h[:16], 16) for h in values), np.uint64, len(values))


def sampled(content_hashes, fraction: float, seed: int) -> np.ndarray:
    """A seeded sample of documents chosen by their hash alone (any worker agrees)."""
    if fraction >= 1:
        return np.ones(len(content_hashes), bool)
    return mix64(hash_keys(content_hashes), seed) < np.uint64(int(fraction * 2**64))


def token_lengths(table: pa.Table) -> np.ndarray:
    """Tokens of every row of a documents table (EOS excluded)."""
    return pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False).astype(np.int64)


def split_rows(table: pa.Table, split: str) -> np.ndarray:
    """Row numbers of the documents of `split` in a documents table."""
    return np.flatnonzero(pc.equal(table.column("split"), split).to_numpy(zero_copy_only=False))


def empty_routes(rows: int) -> np.ndarray:
    return np.full((rows, 2), -1, np.int64)


def block_of(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The packing block (`lorydata.pack.block_starts`) of each walk position."""
    return np.searchsorted(np.asarray(starts), positions, side="right") - 1


def unit_counts(units: np.ndarray, lengths: np.ndarray, n_units: int) -> np.ndarray:
    """(n_units, 2) documents and tokens (EOS included) per unit."""
    out = np.zeros((n_units, 2), np.int64)
    np.add.at(out[:, 0], units, 1)
    np.add.at(out[:, 1], units, lengths + 1)
    return out


@dataclass
class SplitVectors:
    """The embeddings and token counts of a whole split, in hash order (for orders that
    need all of them in one process: `--partitions 1`).

    Args:
        x: (n, d) float32 embeddings.
        lengths: (n,) tokens per document.
        files: the documents files, in order.
        rows: per file, the rows of the split's documents (their global index is their
            place in the concatenation of these arrays).
        sizes: per file, its number of rows (all splits).
    """

    x: np.ndarray
    lengths: np.ndarray
    files: list[str]
    rows: list[np.ndarray]
    sizes: list[int]


def load_split_vectors(documents_dir: str, embeddings_dir: str, split: str) -> SplitVectors:
    """Every embedding and token count of `split`, a documents file at a time."""
    files = layout.documents_files(documents_dir)
    xs, lengths, rows, sizes = [], [], [], []
    for path in files:
        table = fileio.read_table(path, ["split", "tokens"])
        chosen = split_rows(table, split)
        rows.append(chosen)
        sizes.append(table.num_rows)
        lengths.append(token_lengths(table.take(chosen)))
        xs.append(fileio.load_npy(layout.embeddings_file(embeddings_dir, path))[chosen])
    dim = xs[0].shape[1] if xs else 0
    x = np.concatenate(xs) if xs else np.zeros((0, dim), np.float32)
    return SplitVectors(x.astype(np.float32, copy=False), np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                        files, rows, sizes)


def sample_split_vectors(documents_dir: str, embeddings_dir: str, split: str, fraction: float,
                         seed: int) -> np.ndarray:
    """Embeddings of a seeded hash-chosen sample of `split` (about `fraction` of it)."""
    xs = []
    for path in layout.documents_files(documents_dir):
        table = fileio.read_table(path, ["content_hash", "split"])
        chosen = split_rows(table, split)
        keep = chosen[sampled(table.column("content_hash").take(chosen), fraction, seed)]
        xs.append(fileio.load_npy(layout.embeddings_file(embeddings_dir, path))[keep])
    return np.concatenate(xs).astype(np.float32, copy=False)
