"""`lory build-corpus`: text dumps → similarity-ordered (or random) zstd Arrow shards.

The stages, in order (each in its own package; `pipelines/README.md` says what each reads
and writes):

1. documents: read → clean → exact dedup → tokenize → near dedup.
2. embeddings (similarity order only).
3. order, per split: kNN graph + walk, or seeded hash keys. Every split is ordered before
   any is packed (semantic dedup changes the counts every manifest records).
4. shards, per split: pack, shuffle, write shards + manifest.

Each stage is resumable (`pipelines.markers.Stage`): it reruns only when the options it
depends on (its fingerprint, chained from the stages before it) changed. This driver is the
only place that sees the whole `BuildOptions`; every stage gets its own small config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path

from lorydata.clean import CleanConfig
from lorydata.documents import DropReason
from lorydata.embed import Embedder, EmbedderConfig, pick_device
from lorydata.errors import LoryDataError
from lorydata.knn import check_index_string, use_faiss_gpu
from lorydata.minhash import MinHashConfig
from lorydata.readers import ReaderConfig, expand_inputs
from lorydata.tokenizer import Tokenizer
from pipelines import layout
from pipelines.documents import DocumentsConfig, run_documents_stage
from pipelines.embed import run_embed_stage
from pipelines.markers import Stage
from pipelines.options import BuildOptions
from pipelines.order import compute_order
from pipelines.order.config import OrderConfig, SemanticDedupConfig
from pipelines.runner.beam import BeamRunner
from pipelines.shards import ShardsConfig, write_split_shards


@dataclass
class BuildSummary:
    """What a build produced, for the CLI's summary table and `--json`."""

    out: str
    documents: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # name → "ran" / "skipped" and seconds

    def to_dict(self) -> dict:
        return {"out": self.out, "documents": self.documents, "splits": self.splits, "stages": self.stages}


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
    out = str(options.out)
    _check_out_folder(Path(out), options.overwrite)
    if options.order == "similarity":
        _check_similarity_options(options)
    runner = BeamRunner(options.runner, list(options.beam_args))
    summary = BuildSummary(out)
    log(f"{len(files)} input file(s), tokenizer {tokenizer.path.name} (vocab {tokenizer.vocab_size}), order {options.order}")


    def run_stage(name: str, folder: str, fingerprint: str, work: Callable[[str], dict]) -> tuple[Stage, dict]:
        return _run_stage(name, Stage(folder, fingerprint, options.overwrite), work, summary, log)

    # 1. documents
    doc_fp = options.fingerprint("text_field", "domain_field", "id_field", "min_chars", "max_chars", "heldout_fraction",
                                 "buckets")
    doc_fp = f"{doc_fp}:{_hash_json([_input_identity(files), tokenizer.sha256])}"
    if options.near_dedup == "on":  # off keeps the fingerprint of builds made before near-dedup existed
        doc_fp += ":" + options.fingerprint("near_dedup_threshold", "near_dedup_shingle", "near_dedup_bands",
                                            "near_dedup_rows")

    def documents_work(folder: str) -> dict:
        counts = run_documents_stage(documents_config(options, str(tokenizer.path)), runner, files, folder)
        _publish_documents_dead_letters(folder, out)  # before the stage is marked done: never lost
        return counts

    documents, counts = run_stage("documents", layout.documents_stage(out), doc_fp, documents_work)

    # 2. embeddings
    embeddings_dir, embedder, prior_fp = None, None, doc_fp
    if options.order == "similarity":
        prior_fp = f"{doc_fp}:{options.fingerprint('embedder', 'embed_max_tokens', 'embed_long', 'embed_batch_size')}"
        embed, embedded = run_stage("embeddings", layout.embeddings_stage(out), prior_fp,
                                    lambda folder: run_embed_stage(embedder_config(options), runner,
                                                                   str(documents.folder), folder))
        embeddings_dir, embedder = str(embed.folder), embedded.get("embedder")

    # 3. order, every split
    order_fp = f"{prior_fp}:{options.fingerprint('order', 'index', 'k', 'nprobe', 'partitions', 'seed', 'seq_len')}"
    if options.semantic_dedup is not None:  # off keeps the fingerprint of builds made before it existed
        order_fp += ":" + options.fingerprint("semantic_dedup", "semantic_dedup_jaccard", "near_dedup_shingle",
                                              "near_dedup_bands", "near_dedup_rows")
    splits = [split for split in layout.SPLITS if counts["documents_per_split"].get(split, 0) > 0]
    orders = {}
    for split in splits:
        order = partial(compute_order, order_config(options), runner, str(documents.folder), embeddings_dir, split,
                        counts=counts)
        orders[split] = run_stage(f"order/{split}", layout.order_stage(out, split), order_fp, order)
        _copy_semantic_dead_letters(str(orders[split][0].folder), out, split)
    counts = _with_semantic_drops(counts, {split: info for split, (_, info) in orders.items()})
    summary.documents = counts

    # 4. shards, every split
    shards_fp = f"{order_fp}:{options.fingerprint('seq_len', 'tail', 'rows_per_shard', 'seed')}:{tokenizer.sha256}"
    for split in splits:
        order_stage, order_info = orders[split]
        manifest_fields = {"counts": {"pipeline": counts}, "order": order_info["order"], "embedder": embedder,
                           "index": order_info.get("index"), "options": options.to_dict(),
                           "created_by": f"lory {version('lory')}"}
        write = partial(_write_split, shards_config(options), runner, tokenizer, str(documents.folder),
                        str(order_stage.folder), out, split, manifest_fields)
        _, summary.splits[split] = run_stage(f"shards/{split}", layout.split_folder(out, split), shards_fp, write)
    if not summary.splits:
        raise LoryDataError("no document survived reading and cleaning; see the dead letters in "
                            + layout.dead_letters(out))
    return summary


# ---- each stage's config, derived from the options once ---------------------------------
def minhash_config(options: BuildOptions) -> MinHashConfig:
    """MinHash parameters of near-dedup (and of the semantic-dedup confirmation)."""
    return MinHashConfig(shingle_words=options.near_dedup_shingle, bands=options.near_dedup_bands,
                         rows=options.near_dedup_rows, threshold=options.near_dedup_threshold)


def documents_config(options: BuildOptions, tokenizer_path: str | None) -> DocumentsConfig:
    return DocumentsConfig(
        reader=ReaderConfig(options.text_field, options.domain_field, options.id_field, options.max_chars),
        cleaner=CleanConfig(min_chars=options.min_chars, max_chars=options.max_chars),
        tokenizer=tokenizer_path,
        heldout_fraction=options.heldout_fraction,
        buckets=options.buckets,
        near_dedup=minhash_config(options) if options.near_dedup == "on" else None,
    )


def embedder_config(options: BuildOptions) -> EmbedderConfig:
    return EmbedderConfig(model=options.embedder, device=options.device, batch_size=options.embed_batch_size,
                          max_tokens=options.embed_max_tokens, long_documents=options.embed_long)


def order_config(options: BuildOptions) -> OrderConfig:
    semantic = None
    if options.semantic_dedup is not None:
        semantic = SemanticDedupConfig(options.semantic_dedup, options.semantic_dedup_jaccard, minhash_config(options))
    return OrderConfig(method=options.order, seed=options.seed, seq_len=options.seq_len, k=options.k,
                       index=options.index, nprobe=options.nprobe, device=options.device,
                       partitions=options.partitions, semantic=semantic)


def shards_config(options: BuildOptions) -> ShardsConfig:
    return ShardsConfig(seq_len=options.seq_len, tail=options.tail, rows_per_shard=options.rows_per_shard,
                        seed=options.seed)


# ---- driver helpers ----------------------------------------------------------------------
def _run_stage(name: str, stage: Stage, work: Callable[[str], dict], summary: BuildSummary,
               log) -> tuple[Stage, dict]:
    """Skip a stage that is done with the same options, or run `work` on a fresh temp
    folder and mark the stage done with its result.

    Returns:
        (the stage, its result).
    """
    result = stage.result()
    if result is not None:
        summary.stages[name] = {"status": "skipped (done)", "seconds": 0.0}
        log(f"{name}: done earlier with the same options, skipped")
        return stage, result
    log(f"{name}: running")
    start = time.perf_counter()
    result = stage.finish(work(str(stage.start())))
    summary.stages[name] = {"status": "ran", "seconds": round(time.perf_counter() - start, 2)}
    log(f"{name}: finished in {summary.stages[name]['seconds']:.1f} s")
    return stage, result


def _write_split(config, runner, tokenizer: Tokenizer, documents_dir: str, order_dir: str, out: str, split: str,
                 manifest_fields: dict, folder: str) -> dict:
    """The shards stage of one split; its result is the CLI's summary of the split."""
    manifest = write_split_shards(config, runner, tokenizer, documents_dir, order_dir, folder, split, manifest_fields)
    return {"documents": manifest.counts["documents"], "sequences": manifest.num_rows,
            "tokens": manifest.counts["tokens"], "shards": len(manifest.shards),
            "folder": layout.split_folder(out, split)}


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


def _hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _check_out_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LoryDataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / layout.WORK).is_dir() and not overwrite:
        raise LoryDataError(f"--out {out} is not empty and is not a lory corpus folder; choose another --out")


def _check_similarity_options(options: BuildOptions) -> None:
    """Fail before any stage runs on an embedding model that cannot be found or loaded, a
    FAISS index string that cannot be built, or `--device cuda` without a GPU for torch or
    FAISS (inside Beam workers these would surface late, after reading and embedding)."""
    dim = Embedder.describe(embedder_config(options))["dim"]
    check_index_string(options.index, dim)
    if options.device == "cuda":
        pick_device("cuda")  # raises when torch sees no GPU
        use_faiss_gpu("cuda")  # raises when the installed faiss has no GPU support


def _publish_documents_dead_letters(stage: str, out: str) -> None:
    """The documents stage's dead letters become the corpus' `dead_letters/` (replacing those
    of an earlier build)."""
    dead = Path(layout.dead_letters(out))
    shutil.rmtree(dead, ignore_errors=True)
    own = Path(layout.dead_letters(stage))
    own.mkdir(exist_ok=True)  # absent when nothing was dropped
    own.rename(dead)


def _copy_semantic_dead_letters(order_dir: str, out: str, split: str) -> None:
    """The split's `semantic_duplicate` dead letters into the corpus' `dead_letters/`,
    replacing those of an earlier order of the split."""
    dead, pattern = Path(layout.dead_letters(out)), layout.semantic_dead_letter_pattern(split)
    for old in dead.glob(pattern):
        old.unlink()
    for letters in sorted(Path(layout.dead_letters(order_dir)).glob(pattern)):
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
