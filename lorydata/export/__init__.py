"""Export a shard folder to the formats other trainers read: `lory export-corpus`.

One lory sequence becomes one training sample of the target format, in `seq_id` order (the
packing order: the similarity walk for a similarity-ordered corpus), with document
boundaries carried where the format has them. Each format is written by its own library
where one exists (megatron-core for Megatron, pyarrow for Parquet); OLMo's token arrays are
plain numpy files in the layout OLMo-core documents. The export streams: shards are read
one at a time into a staging file, then written a chunk of `rows_per_file` sequences at a
time (see `lorydata.export.ordered`).

The output folder appears only when the export is complete: it is written under a hidden
`.<name>.partial` sibling and renamed at the end. Beside the data, `.lory-export.json`
records the format, the source corpus's manifest facts and the files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorydata.errors import LoryDataError
from lorydata.export.megatron import MegatronWriter
from lorydata.export.olmo import OlmoWriter
from lorydata.export.ordered import SeqIdOrder
from lorydata.export.parquet import ParquetWriter
from lorydata.export.target import ExportTarget
from lorydata.folder_tokenizer import known_tokenizer_file
from lorydata.manifest import Manifest
from lorydata.progress import progress_bar

FORMATS = {"megatron": MegatronWriter, "olmo": OlmoWriter, "parquet": ParquetWriter}
EXPORT_INFO_NAME = ".lory-export.json"


@dataclass
class ExportSummary:
    """What an export wrote."""

    format: str
    out: str
    sequences: int
    seq_len: int
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def export_corpus(folder: str | Path, out: str | Path, fmt: str, rows_per_file: int | None = None) -> ExportSummary:
    """Write the shard folder `folder` as `fmt` into the new folder `out`.

    Args:
        folder: a lory shard folder (e.g. a build's `train/`).
        out: the output folder; must not exist yet.
        fmt: "megatron", "olmo" or "parquet".
        rows_per_file: sequences per output file for olmo and parquet (default: the shards'
            rows per shard); also the chunk size the export holds in memory.

    Raises:
        LoryDataError: unknown format, missing optional library, existing output, bad folder.
    """
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise LoryDataError(f"unknown export format {fmt!r}: choose one of {', '.join(sorted(FORMATS))}")
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise LoryDataError(f"{out} already exists: export into a new folder")
    manifest = Manifest.read(folder)
    rows = rows_per_file or (manifest.shards[0].rows if manifest.shards else 1)
    if rows < 1:
        raise LoryDataError(f"rows_per_file must be positive, got {rows}")
    tok = manifest.tokenizer
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a previous export that died half-way
    partial.mkdir(parents=True)
    try:
        target = ExportTarget(out=partial, seq_len=manifest.seq_len, vocab_size=int(tok["vocab_size"]),
                              eos_id=int(tok["eos_id"]), pad_id=int(tok["pad_id"]), split=manifest.split,
                              tokenizer=tok, tokenizer_file=known_tokenizer_file(folder, manifest))
        writer = FORMATS[fmt](target)  # a missing library fails here, before any reading
        with SeqIdOrder(folder, partial) as ordered:
            total = math.ceil(ordered.num_rows / rows)
            for chunk in progress_bar(ordered.chunks(rows), total=total, description=f"writing {fmt}"):
                writer.write(chunk)
        files = writer.finish()
        summary = ExportSummary(format=fmt, out=str(out), sequences=manifest.num_rows, seq_len=manifest.seq_len,
                                files=files, details=writer.describe())
        info = {"format": fmt, "order": "seq_id", "sequences": manifest.num_rows, "seq_len": manifest.seq_len,
                "files": files, **writer.describe(),
                "source": {"split": manifest.split, "tokenizer": tok, "counts": manifest.counts,
                           "order": manifest.order, "created_by": manifest.created_by}}
        (partial / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - started
    return summary
