"""lorydata: the similarity batcher as a library (no Beam, no training code).

Blocks: readers, cleaning, dedup, tokenizer, embedder, FAISS kNN graph, similarity walk,
ordering metrics, partitioned ordering, packing, Arrow shards with a manifest, and a PyTorch
`ShardDataset` over those shards. Every name below is importable from `lorydata` directly;
the module behind it is imported on first use, so `import lorydata` stays cheap and heavy
dependencies (torch, sentence-transformers, faiss, numba) load only for the blocks that
need them.
"""

from lorydata.errors import InputNotFoundError, LoryDataError, LoryError, MismatchError, ShardError

# `walk` and `partition` are both functions and submodules of this package. Importing a
# submodule sets the package attribute of the same name to the module, so a lazy binding
# would give the function or the module depending on import order; binding them here, once
# and for good, makes `lorydata.walk(...)` always the function. Both import only numpy.
from lorydata.partition import partition
from lorydata.walk import walk

__version__ = "0.1.0"

# name → module that defines it
_LAZY = {
    # reading and cleaning
    "ReaderConfig": "lorydata.readers",
    "read_file": "lorydata.readers",
    "read_inputs": "lorydata.readers",
    "expand_inputs": "lorydata.readers",
    "Document": "lorydata.documents",
    "DeadLetter": "lorydata.documents",
    "CleanConfig": "lorydata.clean",
    "clean_document": "lorydata.clean",
    "ExactDeduper": "lorydata.clean",
    "MinHashConfig": "lorydata.minhash",
    "MinHasher": "lorydata.minhash",
    "find_near_duplicates": "lorydata.near_dedup",
    # tokens
    "Tokenizer": "lorydata.tokenizer",
    "train_tokenizer": "lorydata.tokenizer",
    # embeddings, kNN graph, walk
    "Embedder": "lorydata.embed",
    "EmbedderConfig": "lorydata.embed",
    "KnnConfig": "lorydata.knn",
    "KnnGraph": "lorydata.knn",
    "build_knn_graph": "lorydata.knn",
    "knn_recall": "lorydata.knn",
    "WalkConfig": "lorydata.walk",
    "WalkResult": "lorydata.walk",
    "random_order": "lorydata.walk",
    "ordering_metrics": "lorydata.order_metrics",
    "PartitionConfig": "lorydata.partition",
    "partitioned_order": "lorydata.partition",
    "order_cell": "lorydata.partition",
    # packing and shards
    "SequencePacker": "lorydata.pack",
    "PackedSequence": "lorydata.pack",
    "pack_documents": "lorydata.pack",
    "ShuffledShardWriter": "lorydata.shards",
    "read_shard": "lorydata.shards",
    "Manifest": "lorydata.manifest",
    "verify_folder": "lorydata.verify",
    "ShardDataset": "lorydata.dataset",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorydata' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["InputNotFoundError", "LoryDataError", "LoryError", "MismatchError", "ShardError", "partition", "walk",
           *_LAZY]
