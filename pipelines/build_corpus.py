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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version

from lorydata.clean import CleanConfig
from lorydata.documents import DropReason
from lorydata.embed import LSA_MODEL, Embedder, EmbedderConfig, pick_device
from lorydata.errors import LoryDataError
from lorydata.inputs import InputSelection, select_inputs
from lorydata.knn import check_index_string, use_faiss_gpu
from lorydata.minhash import MinHashConfig
from lorydata.read_summary import check_losses
from lorydata.readers import ReaderConfig
from lorydata.tokenizer import Tokenizer
from pipelines import fileio, layout
from pipelines.documents import DocumentsConfig, read_summaries, run_documents_stage
from pipelines.embed import run_embed_stage
from pipelines.lock import build_lock
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
    partitions: dict = field(default_factory=dict)  # "<stage>/<step>" → partitions and those done before

    def to_dict(self) -> dict:
        return {"out": self.out, "documents": self.documents, "splits": self.splits, "stages": self.stages,
                "partitions": self.partitions}


def build_corpus(options: BuildOptions, log=print) -> BuildSummary:
    """Run every stage that is not done yet; returns what was built.

    Args:
        options: the build options (validated here).
        log: where progress lines go (the CLI passes a rich console's print).

    Raises:
        LoryDataError: for bad options, missing inputs, a bad tokenizer, an unwritable or
            busy `--out`, or outputs built with other options (without `overwrite`); all
            before any stage runs.
    """
    options.validate()
    fileio.configure(list(options.beam_args))
    out = str(options.out).rstrip("/")
    selection = select_inputs(options.inputs, exclude=out, lister=fileio.lister, opener=fileio.opener)
    documents_config(options, None).reader.check_paths(selection.files)
    tokenizer = Tokenizer(options.tokenizer)
    if options.order == "similarity":
        _check_similarity_options(options)
    if fileio.is_local(out) and os.path.exists(out) and not os.path.isdir(out):
        raise LoryDataError(f"--out {out} exists and is not a folder")
    with build_lock(out):  # also the check that --out can be written
        _check_out_folder(out, options.overwrite)
        try:
            return _build(options, out, selection, tokenizer, log)
        except OSError as exc:
            reason = fileio.write_failure(exc)
            if reason is None:
                raise
            raise LoryDataError(f"cannot write the build in {out}: {reason}; every partition written so far is "
                                "kept: make room and rerun the same command to resume") from None


def _build(options: BuildOptions, out: str, selection: InputSelection, tokenizer: Tokenizer, log) -> BuildSummary:
    """The stages in order (the lock on `out` is held)."""
    runner = BeamRunner(options.runner, list(options.beam_args), log=log)
    summary = BuildSummary(out)
    files, skipped = selection.files, selection.counts()
    log(f"{selection.describe()}; tokenizer {tokenizer.path.name} (vocab {tokenizer.vocab_size}), "
        f"order {options.order}")
    depends: dict = {}  # what the fingerprints cover so far, named when a rerun is refused

    def run_stage(name: str, kind: str, folder: str, fingerprint: str, names: tuple[str, ...],
                  work: Callable[[str], dict]) -> tuple[Stage, dict]:
        depends.update({option: getattr(options, option) for option in names})
        stage = Stage(folder, fingerprint, options.overwrite, dict(depends), layout.SCRATCH[kind])
        return _run_stage(name, stage, work, summary, log)

    # 1. documents
    names = ("text_field", "domain_field", "id_field", "min_chars", "max_chars", "heldout_fraction", "buckets",
             "near_dedup")
    doc_fp = options.fingerprint(*names[:-1])
    doc_fp = f"{doc_fp}:{_hash_json([_input_identity(files), tokenizer.sha256])}"
    reading = tuple(name for name in ("domain_from_path", "max_line_bytes", "max_json_depth")
                    if getattr(options, name) != BuildOptions.default(name))
    if reading:  # the defaults keep the fingerprint of builds made before these options existed
        doc_fp += ":" + options.fingerprint(*reading)
        names += reading
    depends.update(inputs=_hash_json(_input_identity(files)), tokenizer=tokenizer.sha256)
    if options.near_dedup == "on":  # off keeps the fingerprint of builds made before near-dedup existed
        near = ("near_dedup_threshold", "near_dedup_shingle", "near_dedup_bands", "near_dedup_rows")
        doc_fp += ":" + options.fingerprint(*near)
        names += near

    def documents_work(folder: str) -> dict:
        counts = run_documents_stage(documents_config(options, str(tokenizer.path)), runner, files, folder)
        _publish_dead_letters(folder, out, "*.jsonl")  # before the stage is marked done: never lost
        wanted = bool(options.domain_field or options.domain_from_path)
        # --strict fails here, before the stage is marked done: a rerun without it resumes.
        for line in check_losses(read_summaries(folder), options.strict, domain_wanted=wanted):
            log(f"[yellow]warning[/]: {line}")
        return {**counts, "inputs_skipped": skipped}

    documents, counts = run_stage("documents", "documents", layout.documents_stage(out), doc_fp, names,
                                  documents_work)

    # 2. embeddings
    embeddings_dir, embedder, prior_fp = None, None, doc_fp
    if options.order == "similarity":
        names = ("embedder", "embed_max_tokens", "embed_long", "embed_batch_size")
        prior_fp = f"{doc_fp}:{options.fingerprint(*names)}"
        if options.embedder is not None or options.embed_backend != "torch":
            # the files actually used: a rerun after the model (or its cached distillation) changed embeds again
            prior_fp += ":" + _hash_json([options.embed_backend, Embedder.describe(embedder_config(options))])
            names += ("embed_backend",)
        embed, embedded = run_stage("embeddings", "embeddings", layout.embeddings_stage(out), prior_fp, names,
                                    lambda folder: run_embed_stage(embedder_config(options), runner,
                                                                   str(documents.folder), folder,
                                                                   ids_tokenizer=tokenizer.sha256))
        embeddings_dir, embedder = str(embed.folder), embedded.get("embedder")
        if options.embedder == LSA_MODEL:  # fitted in the stage: the later stages cover the fitted table too
            prior_fp += f":{embedder['fingerprint']}"

    # 3. order, every split
    names = ("order", "index", "k", "nprobe", "partitions", "seed", "seq_len")
    order_fp = f"{prior_fp}:{options.fingerprint(*names)}"
    if options.semantic_dedup is not None:  # off keeps the fingerprint of builds made before it existed
        semantic = ("semantic_dedup", "semantic_dedup_jaccard", "near_dedup_shingle", "near_dedup_bands",
                    "near_dedup_rows")
        order_fp += ":" + options.fingerprint(*semantic)
        names += semantic
    splits = [split for split in layout.SPLITS if counts["documents_per_split"].get(split, 0) > 0]
    orders = {}
    for split in splits:
        order = partial(compute_order, order_config(options), runner, str(documents.folder), embeddings_dir, split,
                        counts=counts)
        orders[split] = run_stage(f"order/{split}", "order", layout.order_stage(out, split), order_fp, names, order)
        _publish_dead_letters(str(orders[split][0].folder), out, layout.semantic_dead_letter_pattern(split))
    counts = _with_semantic_drops(counts, {split: info for split, (_, info) in orders.items()})
    summary.documents = counts

    # 4. shards, every split
    names = ("seq_len", "tail", "rows_per_shard", "seed")
    shards_fp = f"{order_fp}:{options.fingerprint(*names)}:{tokenizer.sha256}"
    for split in splits:
        order_stage, order_info = orders[split]
        manifest_fields = {"counts": {"pipeline": counts}, "order": order_info["order"], "embedder": embedder,
                           "index": order_info.get("index"), "options": options.to_dict(),
                           "created_by": f"lory {version('lory')}"}
        write = partial(_write_split, shards_config(options), runner, tokenizer, str(documents.folder),
                        str(order_stage.folder), out, split, manifest_fields)
        _, summary.splits[split] = run_stage(f"shards/{split}", "shards", layout.split_folder(out, split),
                                             shards_fp, names, write)
    if not summary.splits:
        raise LoryDataError("no document survived reading and cleaning; see the dead letters in "
                            + layout.dead_letters(out))
    summary.partitions = dict(runner.partitions)
    return summary


# ---- each stage's config, derived from the options once ---------------------------------
def minhash_config(options: BuildOptions) -> MinHashConfig:
    """MinHash parameters of near-dedup (and of the semantic-dedup confirmation)."""
    return MinHashConfig(shingle_words=options.near_dedup_shingle, bands=options.near_dedup_bands,
                         rows=options.near_dedup_rows, threshold=options.near_dedup_threshold)


def documents_config(options: BuildOptions, tokenizer_path: str | None) -> DocumentsConfig:
    return DocumentsConfig(
        reader=ReaderConfig(options.text_field, options.domain_field, options.id_field, options.max_chars,
                            max_line_bytes=options.max_line_bytes, max_json_depth=options.max_json_depth,
                            domain_from_path=options.domain_from_path),
        cleaner=CleanConfig(min_chars=options.min_chars, max_chars=options.max_chars),
        tokenizer=tokenizer_path,
        heldout_fraction=options.heldout_fraction,
        buckets=options.buckets,
        near_dedup=minhash_config(options) if options.near_dedup == "on" else None,
    )


def embedder_config(options: BuildOptions) -> EmbedderConfig:
    return EmbedderConfig(model=options.embedder, device=options.device, batch_size=options.embed_batch_size,
                          max_tokens=options.embed_max_tokens, long_documents=options.embed_long,
                          backend=options.embed_backend, static_tokenizer=_tokenizer_file(options.tokenizer))


def _tokenizer_file(tokenizer: str | None) -> str | None:
    """The tokenizer.json a `--tokenizer` names (a file, or a folder holding one)."""
    if tokenizer is None or not os.path.isdir(tokenizer):
        return tokenizer
    return os.path.join(tokenizer, "tokenizer.json")


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
    result = stage.finish(work(stage.start()))
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
    """Paths with size (and mtime on local disk), so edited inputs invalidate the documents
    stage."""
    identity = []
    for path in files:
        if fileio.is_local(path):
            st = os.stat(path)
            identity.append([path, st.st_size, int(st.st_mtime)])
        else:
            identity.append([path, fileio.size(path)])
    return identity


def _hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _check_out_folder(out: str, overwrite: bool) -> None:
    """Refuse a non-empty `--out` that is not a lory build folder (unless overwriting)."""
    if fileio.is_empty_folder(out, ignore=(layout.LOCK,)) or overwrite:
        return
    if fileio.is_empty_folder(layout.work_dir(out)):
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


def _publish_dead_letters(stage: str, out: str, pattern: str) -> None:
    """A stage's dead-letter files matching `pattern` copied into the corpus'
    `dead_letters/`, replacing those of an earlier run (the stage keeps its own copy)."""
    for old in fileio.match(fileio.join(layout.dead_letters(out), pattern)):
        fileio.delete_tree(old)
    for letters in fileio.match(fileio.join(layout.dead_letters(stage), pattern)):
        fileio.copy(letters, fileio.join(layout.dead_letters(out), fileio.basename(letters)))


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
