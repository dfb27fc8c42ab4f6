"""What every export format writer is given: the output folder and the corpus's facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lorydata.errors import LoryDataError


@dataclass(frozen=True)
class ExportTarget:
    """Where an export goes and what its writer must know.

    Args:
        out: the folder being written (renamed to the final name when the export is done).
        seq_len: tokens per sequence.
        vocab_size: the tokenizer's vocabulary size (sets the token dtype).
        eos_id: the token that ends every document (Megatron's EOD, OLMo's EOS).
        pad_id: the token of tail padding.
        split: the shard folder's split ("train" or "heldout"), used in file names.
    """

    out: Path
    seq_len: int
    vocab_size: int
    eos_id: int
    pad_id: int
    split: str


def token_matrix(chunk: pa.Table, seq_len: int) -> np.ndarray:
    """(rows, seq_len) int32 tokens of a chunk in the shard schema."""
    return chunk.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, seq_len)


def missing_extra(fmt: str, package: str, extra: str) -> LoryDataError:
    """The one-line error for an export format whose library is not installed."""
    return LoryDataError(f"export format {fmt!r} needs {package}: pip install 'lory[{extra}]'")
