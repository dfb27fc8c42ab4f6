"""lorydata: the similarity batcher as a library (no Beam, no training code).

Blocks: readers, cleaning, dedup, tokenizer, packing, Arrow shards with a manifest, and a
PyTorch `ShardDataset` over those shards. Heavy imports (torch, sentence-transformers,
faiss) happen only when the block that needs them is used.
"""

from lorydata.errors import InputNotFoundError, LoryDataError, LoryError, MismatchError, ShardError

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "lorydata.tokenizer",
    "train_tokenizer": "lorydata.tokenizer",
    "ShardDataset": "lorydata.dataset",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorydata' has no attribute {name!r}")


__all__ = [
    "InputNotFoundError",
    "LoryDataError",
    "LoryError",
    "MismatchError",
    "ShardDataset",
    "ShardError",
    "Tokenizer",
    "train_tokenizer",
]
