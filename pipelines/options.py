"""Options of `lory build-corpus`.

`BuildOptions` is what a user says; it travels no further than the driver
(`pipelines.build_corpus`), which derives each stage's own small config from it. This
module imports no Beam, so the CLI reads its defaults at start-up for free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from lorydata.errors import LoryDataError
from lorydata.readers import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_LINE_BYTES
from pipelines.runner.session import LOCAL_RUNNER


@dataclass
class BuildOptions:
    """Everything `lory build-corpus` can be told.

    Args:
        inputs: files, folders, globs or fsspec URLs of text dumps.
        out: output folder (shards under `train/` and `heldout/`).
        text_field / domain_field / id_field: record fields to read; dotted paths reach into
            objects and Parquet structs (`meta.pile_set_name`).
        domain_from_path: `parent` or a regex with a group: the domain from each file's path
            (a non-empty domain field wins).
        max_line_bytes: JSON lines longer than this are dead-lettered as `line_too_long`.
        max_json_depth: JSON nested deeper than this is dead-lettered as `json_too_deep`.
        strict: fail when an input file lost most of its records (or, with a domain
            option, most domains) instead of warning.
        min_chars / max_chars: document length limits (characters, after cleaning).
        tokenizer: tokenizer.json file or folder; None = the bundled BPE.
        seq_len: tokens per packed sequence.
        tail: "drop" or "pad" the last partial sequence of each split.
        order: "similarity" (embed, kNN, walk) or "random".
        embedder: None = the bundled MiniLM; a sentence-transformers folder or name (a
            transformer or a StaticEmbedding), a model2vec folder, or "static" / "static-bpe":
            static models distilled from the bundled MiniLM once and cached (see
            `lorydata.embed`); "static-bpe" reads the documents' own BPE ids; "lsa": LSA of
            sublinear TF-IDF over the documents' own BPE ids, fitted by the embeddings stage
            on a sample of the train split (`lorydata.lexical_embed`).
        embed_backend: "torch", or for transformer models on CPU "onnx" / "onnx-int8".
        embed_batch_size: documents per embedding batch.
        embed_max_tokens: embedder tokens per document (None = the model's limit).
        embed_long: "start" (embed the beginning), "chunk-mean" (transformers: the mean over
            windows) or "whole" (static models: every token).
        device: "auto", "cpu" or "cuda" for embedding and FAISS.
        index: FAISS factory string, or None to choose by corpus size.
        k: neighbours per document in the kNN graph.
        nprobe: IVF cells searched (None = the index's default rule).
        partitions: 1 = one global walk; P > 1 = k-means cells walked in parallel.
        heldout_fraction: share of documents (by id hash) written to `heldout/`.
        buckets: content-hash buckets of the documents stage (None = by input size); each
            worker holds one bucket at a time.
        seed: seed of the random order, k-means and the sequence shuffle.
        rows_per_shard: sequences per shard file.
        runner: Beam runner name; default the in-process FnApiRunner.
        beam_args: extra Beam pipeline flags, passed through verbatim.
        overwrite: allow replacing outputs built with other options.
        near_dedup: "on" (default) or "off": MinHash LSH near-duplicate removal after exact
            dedup, before embedding (see `lorydata.minhash` for the defaults and why).
        near_dedup_threshold: estimated Jaccard at or above which two documents are copies.
        near_dedup_shingle: words per shingle.
        near_dedup_bands / near_dedup_rows: LSH bands × rows per band = permutations.
        semantic_dedup: None (off) or COS: similarity order only, drop documents whose kNN
            edge at cosine ≥ COS the MinHash Jaccard of the pair confirms (one kept per
            group; see `pipelines.semantic_dedup`).
        semantic_dedup_jaccard: estimated Jaccard that confirms a semantic pair.
    """

    inputs: list[str]
    out: str
    text_field: str = "text"
    domain_field: str | None = None
    id_field: str | None = None
    domain_from_path: str | None = None
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    strict: bool = False
    min_chars: int = 1
    max_chars: int = 1_000_000
    tokenizer: str | None = None
    seq_len: int = 4096
    tail: str = "drop"
    order: str = "similarity"
    embedder: str | None = None
    embed_batch_size: int = 64
    embed_max_tokens: int | None = None
    embed_long: str = "start"
    embed_backend: str = "torch"
    device: str = "auto"
    index: str | None = None
    k: int = 20
    nprobe: int | None = None
    partitions: int = 1
    heldout_fraction: float = 0.0
    buckets: int | None = None
    seed: int = 0
    rows_per_shard: int = 1024
    runner: str = LOCAL_RUNNER
    beam_args: list[str] = field(default_factory=list)
    overwrite: bool = False
    near_dedup: str = "on"
    near_dedup_threshold: float = 0.8
    near_dedup_shingle: int = 5
    near_dedup_bands: int = 16
    near_dedup_rows: int = 8
    semantic_dedup: float | None = None
    semantic_dedup_jaccard: float = 0.5

    def validate(self) -> None:
        """Raise `LoryDataError` for option values that cannot work."""
        checks = [
            (self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}"),
            (self.tail in ("drop", "pad"), f"--tail must be drop or pad, got {self.tail!r}"),
            (self.order in ("similarity", "random"), f"--order must be similarity or random, got {self.order!r}"),
            (self.embed_long in ("start", "chunk-mean", "whole"),
             f"--embed-long must be start, chunk-mean or whole, got {self.embed_long!r}"),
            (self.embed_backend in ("torch", "onnx", "onnx-int8"),
             f"--embed-backend must be torch, onnx or onnx-int8, got {self.embed_backend!r}"),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.k >= 1, f"--k must be positive, got {self.k}"),
            (self.partitions >= 1, f"--partitions must be positive, got {self.partitions}"),
            (0.0 <= self.heldout_fraction < 1.0, f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}"),
            (self.buckets is None or 1 <= self.buckets <= 65536, f"--buckets must be in [1, 65536], got {self.buckets}"),
            (self.rows_per_shard >= 1, f"--rows-per-shard must be positive, got {self.rows_per_shard}"),
            (self.embed_batch_size >= 1, f"--embed-batch-size must be positive, got {self.embed_batch_size}"),
            (0 <= self.min_chars <= self.max_chars, f"need 0 <= --min-chars <= --max-chars, got {self.min_chars}, {self.max_chars}"),
            (self.near_dedup in ("on", "off"), f"--near-dedup must be on or off, got {self.near_dedup!r}"),
            (0.0 < self.near_dedup_threshold <= 1.0,
             f"--near-dedup-threshold must be in (0, 1], got {self.near_dedup_threshold}"),
            (min(self.near_dedup_shingle, self.near_dedup_bands, self.near_dedup_rows) >= 1,
             "--near-dedup-shingle, --near-dedup-bands and --near-dedup-rows must be positive"),
            (self.semantic_dedup is None or 0.0 < self.semantic_dedup <= 1.0,
             f"--semantic-dedup must be a cosine in (0, 1], got {self.semantic_dedup}"),
            (self.semantic_dedup is None or self.order == "similarity",
             f"--semantic-dedup works on the kNN graph of --order similarity, not --order {self.order}"),
            (0.0 < self.semantic_dedup_jaccard <= 1.0,
             f"--semantic-dedup-jaccard must be in (0, 1], got {self.semantic_dedup_jaccard}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoryDataError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, *names: str) -> str:
        """A short hash of the named options: a stage reruns only when these change."""
        chosen = {name: getattr(self, name) for name in sorted(names)}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def default(cls, name: str):
        """The default value of option `name` (what the CLI falls back to)."""
        found = {f.name: f for f in fields(cls)}[name]
        return found.default_factory() if callable(found.default_factory) else found.default
