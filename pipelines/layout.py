"""Where every file of a build lives: the one place that names paths.

A build folder (`--out`) holds the outputs (`train/`, `heldout/`, `dead_letters/`) and
`_work/`, one folder per stage:

    _work/documents/            b<bucket>.parquet (deduplicated, tokenized documents)
        raw/b<bucket>/          f<file>-<flush>.arrow (read step → dedup step)
        deduped/                b<bucket>.arrow (dedup step → near dedup)
        near_dedup/             signatures/b<bucket>.npy, lsh/l<bucket>/*.arrow, edges/, drops/
        dead_letters/           <step>-<part>.jsonl (copied to OUT/dead_letters at the end)
    _work/embeddings/           b<bucket>.npy, row-aligned with b<bucket>.parquet
    _work/order/<split>/        routes/b<bucket>.npy, units.npy, knn/ (P = 1), and scratch:
                                unitcounts/, signatures/, cells/, cellcounts/, cellroutes/,
                                dead_letters/semantic_dedup-<split>-b<bucket>.jsonl
    <split>/                    shard-<n>.arrow, manifest; scratch in _scratch/

Each stage writes into the folder its `pipelines.markers.Stage` gives it, so the functions
below take that folder: a stage never builds a path from another stage's names. Partition
files are named after the partition alone (bucket, cell, unit, shard), so a retried task
overwrites its own files and any worker count writes the same names. Every stage folder
also holds its markers and partition records (`pipelines.markers`, `pipelines.commits`);
`SCRATCH` names what goes once the stage is done.
"""

from __future__ import annotations

from lorydata.lock import LOCK_NAME
from pipelines import fileio

WORK = "_work"
DEAD_LETTERS = "dead_letters"
SPLITS = ("train", "heldout")
LOCK = LOCK_NAME  # the build's lock on --out (`pipelines.lock`)
# Intermediate files of each stage, removed once it is done (relative to its folder).
SCRATCH = {
    "documents": ("raw", "deduped", "near_dedup/lsh", "near_dedup/signatures"),
    "embeddings": ("model",),
    "order": ("unitcounts", "signatures", "cells", "cellcounts", "cellroutes"),
    "shards": ("_scratch",),
}


def bucket_name(bucket: int) -> str:
    return f"b{bucket:05d}"


def cell_name(cell: int) -> str:
    return f"c{cell:06d}"


def unit_name(unit: int) -> str:
    return f"u{unit:06d}"


def shard_part_name(shard: int) -> str:
    return f"s{shard:05d}"


def lsh_name(bucket: int) -> str:
    return f"l{bucket:05d}"


# ---- the build folder -------------------------------------------------------------------
def work_dir(out: str) -> str:
    return fileio.join(out, WORK)


def lock_file(out: str) -> str:
    return fileio.join(out, LOCK)


def documents_stage(out: str) -> str:
    return fileio.join(out, WORK, "documents")


def embeddings_stage(out: str) -> str:
    return fileio.join(out, WORK, "embeddings")


def order_stage(out: str, split: str) -> str:
    return fileio.join(out, WORK, "order", split)


def split_folder(out: str, split: str) -> str:
    return fileio.join(out, split)


def dead_letters(folder: str) -> str:
    """The dead-letter folder of a build, or of the stage folder that collects its own."""
    return fileio.join(folder, DEAD_LETTERS)


def dead_letter_file(folder: str, name: str) -> str:
    """A dead-letter file `<name>.jsonl` in `folder`'s dead-letter folder; every step names
    its files with a prefix of its own (`read-`, `dedup-`, `near_dedup-`, `semantic_dedup-`)."""
    return fileio.join(folder, DEAD_LETTERS, f"{name}.jsonl")


# ---- documents stage --------------------------------------------------------------------
def documents_file(stage: str, bucket: int) -> str:
    return fileio.join(stage, f"{bucket_name(bucket)}.parquet")


def documents_files(stage: str) -> list[str]:
    """The documents files of a finished documents stage, in bucket (= hash) order."""
    return fileio.match(fileio.join(stage, "b*.parquet"))


def deduped_file(stage: str, bucket: int) -> str:
    return fileio.join(stage, "deduped", f"{bucket_name(bucket)}.arrow")


def deduped_files(stage: str) -> list[str]:
    return fileio.match(fileio.join(stage, "deduped", "b*.arrow"))


def read_summary_file(stage: str, index: int) -> str:
    """What reading input file `index` gave (`lorydata.read_summary.FileSummary`)."""
    return fileio.join(stage, "read_summaries", f"f{index:06d}.json")


def read_summary_files(stage: str) -> list[str]:
    return fileio.match(fileio.join(stage, "read_summaries", "f*.json"))


def raw_file(stage: str, bucket: int, part: str) -> str:
    return fileio.join(stage, "raw", bucket_name(bucket), f"{part}.arrow")


def raw_files(stage: str, bucket: int) -> list[str]:
    return fileio.match(fileio.join(stage, "raw", bucket_name(bucket), "*.arrow"))


def near_dedup_folder(stage: str) -> str:
    return fileio.join(stage, "near_dedup")


def lsh_folder(near_dedup: str) -> str:
    return fileio.join(near_dedup, "lsh")


def lsh_file(near_dedup: str, bucket: int, part: str) -> str:
    return fileio.join(near_dedup, "lsh", lsh_name(bucket), f"{part}.arrow")


def lsh_files(near_dedup: str, bucket: int) -> list[str]:
    return fileio.match(fileio.join(near_dedup, "lsh", lsh_name(bucket), "*.arrow"))


def minhash_file(near_dedup: str, documents: str) -> str:
    """MinHash signatures of a deduplicated documents file, row-aligned with it."""
    return fileio.join(near_dedup, "signatures", f"{fileio.stem(documents)}.npy")


def edges_file(near_dedup: str, bucket: int) -> str:
    return fileio.join(near_dedup, "edges", f"{lsh_name(bucket)}.jsonl")


def edges_files(near_dedup: str) -> list[str]:
    return fileio.match(fileio.join(near_dedup, "edges", "*.jsonl"))


def drops_file(near_dedup: str, documents: str) -> str:
    return fileio.join(near_dedup, "drops", f"{fileio.stem(documents)}.json")


# ---- embeddings stage -------------------------------------------------------------------
def embeddings_file(stage: str, documents: str) -> str:
    """The `.npy` of a documents file: its vectors, row-aligned with it."""
    return fileio.join(stage, f"{fileio.stem(documents)}.npy")


def published_model(stage: str) -> str:
    """The embedding model's files, copied here for workers on other machines."""
    return fileio.join(stage, "model")


# ---- order stage (one folder per split) -------------------------------------------------
def routes_file(stage: str, documents: str) -> str:
    """(n_rows, 2) int64 (unit, key) of every row of a documents file; unit -1: not packed."""
    return fileio.join(stage, "routes", f"{fileio.stem(documents)}.npy")


def units_file(stage: str) -> str:
    """(units, 2) int64: documents and tokens (EOS included) of each packing unit."""
    return fileio.join(stage, "units.npy")


def knn_folder(stage: str) -> str:
    return fileio.join(stage, "knn")


def unit_counts_folder(stage: str) -> str:
    return fileio.join(stage, "unitcounts")


def unit_counts_file(stage: str, documents: str) -> str:
    return fileio.join(stage, "unitcounts", f"{fileio.stem(documents)}.npy")


def signatures_folder(stage: str) -> str:
    return fileio.join(stage, "signatures")


def signatures_file(stage: str, documents: str) -> str:
    return fileio.join(stage, "signatures", f"{fileio.stem(documents)}.npz")


def semantic_dead_letter_name(split: str, documents: str) -> str:
    return f"semantic_dedup-{split}-{fileio.stem(documents)}"


def semantic_dead_letter_pattern(split: str) -> str:
    return f"semantic_dedup-{split}-*.jsonl"


def cells_folder(stage: str) -> str:
    return fileio.join(stage, "cells")


def cell_folder(stage: str, cell: int) -> str:
    return fileio.join(stage, "cells", cell_name(cell))


def cell_member_file(stage: str, cell: int, documents: str) -> str:
    """The members of `cell` that come from one documents file (vectors, rows, lengths...)."""
    return fileio.join(stage, "cells", cell_name(cell), f"{fileio.stem(documents)}.npz")


def cell_member_files(stage: str, cell: int) -> list[str]:
    return fileio.match(fileio.join(stage, "cells", cell_name(cell), "b*.npz"))


def cell_result_file(stage: str, cell: int, name: str) -> str:
    """`adjacent.npy`, `recall.npz` or `result.json` of an ordered cell."""
    return fileio.join(stage, "cells", cell_name(cell), name)


def cell_counts_folder(stage: str) -> str:
    return fileio.join(stage, "cellcounts")


def cell_counts_file(stage: str, documents: str) -> str:
    return fileio.join(stage, "cellcounts", f"{fileio.stem(documents)}.npy")


def cell_routes_folder(stage: str) -> str:
    return fileio.join(stage, "cellroutes")


def cell_routes_file(stage: str, documents: str, cell: int, suffix: str = ".npy") -> str:
    """Walk positions a cell gives the rows of one documents file (`.drops.json`: its drops)."""
    return fileio.join(stage, "cellroutes", fileio.stem(documents), f"{cell_name(cell)}{suffix}")


def cell_routes_files(stage: str, documents: str, suffix: str = ".npy") -> dict[int, str]:
    """{cell: file} of the positions written for one documents file."""
    found = fileio.match(fileio.join(stage, "cellroutes", fileio.stem(documents), f"c*{suffix}"))
    return {int(fileio.basename(path)[1:].removesuffix(suffix)): path for path in found}


# ---- shards stage (the split's output folder) -------------------------------------------
def scratch_folder(stage: str) -> str:
    return fileio.join(stage, "_scratch")


def unit_part_file(scratch: str, unit: int, documents: str) -> str:
    return fileio.join(scratch, "units", unit_name(unit), f"{fileio.stem(documents)}.arrow")


def unit_part_files(scratch: str, unit: int) -> list[str]:
    return fileio.match(fileio.join(scratch, "units", unit_name(unit), "*.arrow"))


def shard_part_file(scratch: str, shard: int, unit: int) -> str:
    return fileio.join(scratch, "parts", shard_part_name(shard), f"{unit_name(unit)}.arrow")


def shard_part_files(scratch: str, shard: int) -> list[str]:
    return fileio.match(fileio.join(scratch, "parts", shard_part_name(shard), "*.arrow"))


def pack_stats_file(scratch: str, unit: int) -> str:
    return fileio.join(scratch, "packstats", f"{unit_name(unit)}.json")


def pack_stats_files(scratch: str) -> list[str]:
    return fileio.match(fileio.join(scratch, "packstats", "*.json"))


def shard_info_file(scratch: str, shard: int) -> str:
    return fileio.join(scratch, "shardinfo", f"{shard_part_name(shard)}.json")
