"""Stage 1, documents: read → clean → exact dedup → tokenize → near dedup, through
content-hash bucket files.

No step sees every document at once (the shape datatrove uses for its dedup): documents
travel between the steps as files partitioned by destination, and Beam only carries file
indices and bucket numbers.

1. read (`read.ReadToBucketsFn`, one element per input file): read, decode, clean; every
   surviving document goes to the raw files of the bucket of its content hash.
2. dedup (`dedup.DedupBucketFn`, one element per bucket): exact dedup, train/held-out
   split by id hash, tokenization → the bucket's documents file.
3. near dedup (`near_dedup`, unless off): MinHash LSH over the deduplicated files; the
   documents files are those files without the near-duplicates.

Output, the seam for the stages after it (`pipelines.layout`, documents stage):
the documents files `b<bucket>.parquet` (both splits, `split` column; buckets are ranges of
the hash, so the files in name order list the documents in global hash order; a bucket with
no document has no file), the stage's dead letters, and the counts (its result).

Per worker, memory is bounded by one bucket (`read.buckets_for` aims at `read.BUCKET_BYTES`
of input per bucket) or one read buffer; the driver holds only counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorydata.clean import CleanConfig
from lorydata.minhash import MinHashConfig
from lorydata.read_summary import FileSummary
from lorydata.readers import ReaderConfig
from pipelines import fileio, layout
from pipelines.documents.dedup import DedupBucketFn
from pipelines.documents.near_dedup import drop_near_duplicates
from pipelines.documents.read import ReadToBucketsFn, buckets_for, input_bytes
from pipelines.runner.beam import BeamRunner


@dataclass(frozen=True)
class DocumentsConfig:
    """What the documents stage is told.

    Args:
        reader: record fields and the reader's size limit.
        cleaner: normalisation and length filters.
        tokenizer: tokenizer.json path (None: the bundled BPE).
        heldout_fraction: share of documents (by id hash) in the held-out split.
        buckets: content-hash buckets (None: one per `read.BUCKET_BYTES` of input).
        near_dedup: MinHash LSH parameters of near-duplicate removal, None when it is off.
    """

    reader: ReaderConfig
    cleaner: CleanConfig
    tokenizer: str | None
    heldout_fraction: float
    buckets: int | None = None
    near_dedup: MinHashConfig | None = None


def read_summaries(folder: str) -> list[FileSummary]:
    """What reading each input file gave, from a documents stage folder."""
    return [FileSummary.from_dict(fileio.load_json(path)) for path in layout.read_summary_files(folder)]


def run_documents_stage(config: DocumentsConfig, runner: BeamRunner, files: list[str], folder: str) -> dict:
    """Run stage 1 into `folder` (documents files and dead letters, see the module docstring).

    Args:
        config: the stage's options.
        runner: where the Beam steps run.
        files: the expanded input files (checked to exist).
        folder: the stage's (temp) folder.

    Returns:
        Counts: records read, kept, dropped per reason, tokens, per-split documents and
        tokens, the number of buckets, and the near-dedup record.
    """
    folder = str(folder)
    weight = input_bytes(files)
    buckets = buckets_for(weight, config.buckets)
    near = config.near_dedup is not None
    # Reading, cleaning and tokenizing are Python that holds the GIL: on a large input they
    # run on worker processes, one per core (the steps after them are I/O and numpy).
    processes = runner.local_processes(weight)
    totals = runner.run_steps(folder, [
        ("Read", list(enumerate(files)), ReadToBucketsFn(folder, config.reader, config.cleaner, buckets)),
        ("Dedup", list(range(buckets)), DedupBucketFn(folder, config.tokenizer, config.heldout_fraction, final=not near,
                                                      threads=runner.threads_per_worker(processes))),
    ], processes=processes)
    near_dedup = None
    if near:
        near_dedup, changes = drop_near_duplicates(config.near_dedup, runner, layout.deduped_files(folder),
                                                   totals.get("documents_kept", 0), folder,
                                                   layout.near_dedup_folder(folder))
        for name, value in changes.items():
            totals[name] = totals.get(name, 0) + value
    dropped = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("dropped.")}
    return {
        "input_files": len(files),
        "buckets": buckets,
        "records_read": totals.get("records_read", 0),
        "documents_kept": totals.get("documents_kept", 0),
        "dropped": dict(sorted(dropped.items())),
        "utf8_replacements": totals.get("utf8_replacements", 0),
        "documents_with_replacements": totals.get("documents_with_replacements", 0),
        "tokens": totals.get("tokens", 0),
        "documents_per_split": {s: totals.get(f"documents.{s}", 0) for s in layout.SPLITS},
        "tokens_per_split": {s: totals.get(f"tokens.{s}", 0) for s in layout.SPLITS},
        **({"near_dedup": near_dedup} if near_dedup else {}),
    }
