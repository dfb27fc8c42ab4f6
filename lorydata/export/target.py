"""What every export format writer is given: the output folder and the corpus's facts."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer as HFTokenizer

from lorydata.errors import LoryDataError
from lorydata.hashing import file_sha256


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
        tokenizer: the manifest's tokenizer identity (sha256, ids).
        tokenizer_file: the corpus's verified tokenizer file (`known_tokenizer_file`), or None.
    """

    out: Path
    seq_len: int
    vocab_size: int
    eos_id: int
    pad_id: int
    split: str
    tokenizer: dict
    tokenizer_file: Path | None = None


def token_matrix(chunk: pa.Table, seq_len: int) -> np.ndarray:
    """(rows, seq_len) int32 tokens of a chunk in the shard schema."""
    return chunk.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, seq_len)


def write_tokenizer_folder(identity: dict, source: Path | None, dest: Path) -> bool:
    """Copy the corpus's `tokenizer.json` into `dest/` with a `tokenizer_config.json` naming its
    EOS and pad tokens, so `AutoTokenizer.from_pretrained(dest)` (and trainers built on it, such
    as Megatron's HuggingFaceTokenizer) report lory's EOS as the end-of-document token.

    Args:
        identity: the manifest's tokenizer identity.
        source: the corpus's verified tokenizer file, or None when it has none.
        dest: the folder to write.

    Returns False, writing nothing, when the corpus has no tokenizer file of that sha256.
    """
    if source is None or file_sha256(source) != identity.get("sha256"):
        return False
    tok = HFTokenizer.from_file(str(source))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.id_to_token(identity["eos_id"]),
              "pad_token": tok.id_to_token(identity["pad_id"])}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return True


def missing_extra(fmt: str, package: str, extra: str) -> LoryDataError:
    """The one-line error for an export format whose library is not installed."""
    return LoryDataError(f"export format {fmt!r} needs {package}: pip install 'lory[{extra}]'")
