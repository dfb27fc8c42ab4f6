"""`lory build-corpus`: text dumps → similarity-ordered (or random) zstd Arrow shards.

Stages, each resumable (see `pipelines.markers`):

1. documents (Beam): read → clean → content-hash buckets → exact dedup → tokenize →
   `_work/documents/b<bucket>.parquet`, dead letters → `dead_letters/`.
2. embeddings (Beam, similarity order only): sentence-transformers per bucket →
   `_work/embeddings/b<bucket>.npy`.
3. order, per split: kNN graph (+ semantic dedup with `--semantic-dedup`) + walk (in this
   process, or per k-means cell on Beam with `--partitions`), or seeded hash keys → routes
   and packing units in `_work/order/<split>/`. Every split is ordered before any is packed.
4. shards, per split (Beam): route tokens to units, pack each unit, spread the sequences
   over shuffled shards → `<split>/` shards + manifest.

Per-document data moves between steps only as files partitioned by destination; see the
module docstrings of each stage for what one worker holds.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorydata.documents import DropReason
from lorydata.errors import LoryDataError
from lorydata.readers import expand_inputs
from lorydata.tokenizer import Tokenizer
from pipelines.documents_stage import DEAD_LETTERS, SPLITS, run_documents_stage
from pipelines.markers import Stage
from pipelines.options import BuildOptions
from pipelines.order_stage import compute_order
from pipelines.shards_stage import write_split_shards

WORK = "_work"


@dataclass
class BuildSummary:
    """What a build produced, for the CLI's summary table and `--json`."""

    out: str
    documents: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # name → "ran" / "skipped" and seconds

    def to_dict(self) -> dict:
        return {"out": self.out, "documents": self.documents, "splits": self.splits, "stages": self.stages}


def _input_identity(files: list[str]) -> list:
    """Paths with size and mtime, so edited inputs invalidate the documents stage."""
    identity = []
    for path in files:
        try:
            st = os.stat(path)
            identity.append([path, st.st_size, int(st.st_mtime)])
        except OSError:  # remote URL: the path alone
            identity.append([path])
    return identity


def _check_out_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LoryDataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / WORK).is_dir() and not overwrite:
        raise LoryDataError(f"--out {out} is not empty and is not a lory corpus folder; choose another --out")


class _Timer:
    def __init__(self, summary: BuildSummary, name: str, log):
        self.summary, self.name, self.log = summary, name, log

    def skipped(self) -> None:
        self.summary.stages[self.name] = {"status": "skipped (done)", "seconds": 0.0}
        self.log(f"{self.name}: done earlier with the same options, skipped")

    def __enter__(self):
        self.log(f"{self.name}: running")
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            seconds = round(time.perf_counter() - self.start, 2)
            self.summary.stages[self.name] = {"status": "ran", "seconds": seconds}
            self.log(f"{self.name}: finished in {seconds:.1f} s")


def build_corpus(options: BuildOptions, log=print) -> BuildSummary:
    """Run every stage that is not done yet; returns what was built.

    Args:
        options: the build options (validated here).
        log: where progress lines go (the CLI passes a rich console's print).

    Raises:
        LoryDataError: for bad options, missing inputs, a bad tokenizer, or outputs built
            with other options (without `overwrite`); all before any stage runs.
    """
    options.validate()
    files = expand_inputs(options.inputs)
    tokenizer = Tokenizer(options.tokenizer)
    out = Path(options.out)
    _check_out_folder(out, options.overwrite)
    work = out / WORK
    if options.order == "similarity":
        _check_similarity_options(options)
    summary = BuildSummary(str(out))
    log(f"{len(files)} input file(s), tokenizer {tokenizer.path.name} (vocab {tokenizer.vocab_size}), order {options.order}")

    doc_fp = options.fingerprint("text_field", "domain_field", "id_field", "min_chars", "max_chars", "heldout_fraction",
                                 "buckets")
    doc_fp = f"{doc_fp}:{hash_json([_input_identity(files), tokenizer.sha256])}"
    if options.near_dedup == "on":  # off keeps the fingerprint of builds made before near-dedup existed
        doc_fp += ":" + options.fingerprint("near_dedup_threshold", "near_dedup_shingle", "near_dedup_bands",
                                            "near_dedup_rows")
    documents = Stage(work / "documents", doc_fp, options.overwrite)
    counts = documents.result()
    timer = _Timer(summary, "documents", log)
    if counts is not None:
        timer.skipped()
    else:
        with timer:
            tmp = documents.start()
            counts = run_documents_stage(options, files, str(tokenizer.path), tmp)
            documents.finish(counts)
            dead = out / DEAD_LETTERS
            shutil.rmtree(dead, ignore_errors=True)
            (documents.folder / DEAD_LETTERS).mkdir(exist_ok=True)  # absent when nothing was dropped
            (documents.folder / DEAD_LETTERS).rename(dead)
    summary.documents = counts

    embeddings_dir = None
    if options.order == "similarity":
        from pipelines.embed_stage import run_embed_stage

        embed_fp = f"{doc_fp}:{options.fingerprint('embedder', 'embed_max_tokens', 'embed_long', 'embed_batch_size')}"
        embed = Stage(work / "embeddings", embed_fp, options.overwrite)
        timer = _Timer(summary, "embeddings", log)
        if embed.result() is not None:
            timer.skipped()
        else:
            with timer:
                tmp = embed.start()
                embed.finish(run_embed_stage(options, work / "documents", tmp, counts))
        embeddings_dir = embed.folder
        prior_fp = embed_fp
    else:
        prior_fp = doc_fp

    splits = [split for split in SPLITS if counts["documents_per_split"].get(split, 0) > 0]
    # Every split is ordered before any is packed: semantic dedup in the order stage changes
    # the counts that every split's manifest records.
    orders = {split: _order_split(options, work, out, split, prior_fp, counts, embeddings_dir, summary, log)
              for split in splits}
    counts = _with_semantic_drops(counts, {split: info for split, (_, info) in orders.items()})
    summary.documents = counts
    for split in splits:
        summary.splits[split] = _build_split(options, tokenizer, work, out, split, *orders[split], counts, summary,
                                             log)
    if not summary.splits:
        raise LoryDataError("no document survived reading and cleaning; see the dead letters in " + str(out / DEAD_LETTERS))
    return summary


def _check_similarity_options(options: BuildOptions) -> None:
    """Fail before any stage runs on an embedding model that cannot be found or loaded, a
    FAISS index string that cannot be built, or `--device cuda` without a GPU for torch or
    FAISS (inside Beam workers these would surface late, after reading and embedding)."""
    from lorydata.embed import Embedder
    from pipelines.embed_stage import embedder_config
    from pipelines.similarity_order import check_index_string

    dim = Embedder.describe(embedder_config(options))["dim"]
    check_index_string(options.index, dim)
    if options.device == "cuda":
        import torch

        from lorydata.knn import use_faiss_gpu

        if not torch.cuda.is_available():
            raise LoryDataError("--device cuda: torch sees no CUDA GPU (use --device auto or cpu)")
        use_faiss_gpu("cuda")  # raises when the installed faiss has no GPU support


def hash_json(value) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _order_split(options, work, out, split, prior_fp, counts, embeddings_dir, summary, log) -> tuple:
    """Run (or skip) the order stage of one split; returns (order fingerprint, order result)."""
    order_fp = f"{prior_fp}:{options.fingerprint('order', 'index', 'k', 'nprobe', 'partitions', 'seed', 'seq_len')}"
    if options.semantic_dedup is not None:  # off keeps the fingerprint of builds made before it existed
        order_fp += ":" + options.fingerprint("semantic_dedup", "semantic_dedup_jaccard", "near_dedup_shingle",
                                              "near_dedup_bands", "near_dedup_rows")
    order_stage = Stage(work / "order" / split, order_fp, options.overwrite)
    timer = _Timer(summary, f"order/{split}", log)
    order_info = order_stage.result()
    if order_info is not None:
        timer.skipped()
    else:
        with timer:
            tmp = order_stage.start()
            order_info = order_stage.finish(compute_order(options, work / "documents", embeddings_dir, split, tmp,
                                                          counts))
    _copy_semantic_dead_letters(order_stage.folder, out / DEAD_LETTERS, split)
    return order_fp, order_info


def _copy_semantic_dead_letters(order_dir: Path, dead: Path, split: str) -> None:
    """The split's `semantic_duplicate` dead letters into the corpus' `dead_letters/`,
    replacing those of an earlier order of the split."""
    for old in dead.glob(f"semantic_dedup-{split}-*.jsonl"):
        old.unlink()
    for letters in sorted((order_dir / DEAD_LETTERS).glob(f"semantic_dedup-{split}-*.jsonl")):
        dead.mkdir(exist_ok=True)
        shutil.copyfile(letters, dead / letters.name)


def _with_semantic_drops(counts: dict, orders: dict) -> dict:
    """The documents stage's counts less what semantic dedup dropped in each split's order
    (`dropped.semantic_duplicate`, documents and tokens kept, per split and in all)."""
    found = {split: info["order"]["semantic_dedup"] for split, info in orders.items()
             if "semantic_dedup" in info["order"]}
    if not found:
        return counts
    counts = copy.deepcopy(counts)
    for split, record in found.items():
        counts["documents_per_split"][split] -= record["dropped"]
        counts["tokens_per_split"][split] -= record["tokens_dropped"]
        counts["documents_kept"] -= record["dropped"]
        counts["tokens"] -= record["tokens_dropped"]
    dropped = {**counts["dropped"], DropReason.SEMANTIC_DUPLICATE: sum(r["dropped"] for r in found.values())}
    counts["dropped"] = dict(sorted(dropped.items()))
    return counts


def _build_split(options, tokenizer, work, out, split, order_fp, order_info, counts, summary, log) -> dict:
    order_stage = Stage(work / "order" / split, order_fp, options.overwrite)
    shards_fp = f"{order_fp}:{options.fingerprint('seq_len', 'tail', 'rows_per_shard', 'seed')}:{tokenizer.sha256}"
    shards_stage = Stage(out / split, shards_fp, options.overwrite)
    timer = _Timer(summary, f"shards/{split}", log)
    done = shards_stage.result()
    if done is not None:
        timer.skipped()
        return done
    with timer:
        tmp = shards_stage.start()
        manifest = write_split_shards(
            options,
            tokenizer,
            work / "documents",
            order_stage.folder,
            tmp,
            split,
            {
                "counts": {"pipeline": counts},
                "order": order_info["order"],
                "embedder": order_info.get("embedder"),
                "index": order_info.get("index"),
                "options": options.to_dict(),
                "created_by": "lory 0.1.0",
            },
        )
        result = {
            "documents": manifest.counts["documents"],
            "sequences": manifest.num_rows,
            "tokens": manifest.counts["tokens"],
            "shards": len(manifest.shards),
            "folder": str(out / split),
        }
        return shards_stage.finish(result)
