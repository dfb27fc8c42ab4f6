"""Near-duplicate removal on Beam: MinHash LSH over the exactly deduplicated documents.

Runs after the documents stage (exact dedup) and before embedding, for both orders (so
similarity and random builds of one input hold the same documents, and copies are never
embedded). It reads the documents stage's bucket files (`documents_stage.bucket_files`) and
writes the same files without the near-duplicates, so the stages after it read its folder
instead. Documents move between steps through files partitioned by destination, never
through an in-memory shuffle, and Beam carries only file names and bucket numbers:

1. sign (`SignFileFn`, one documents file per element): MinHash signature and band keys of
   every document; each (band key, content hash, length, id, signature) record goes to the
   LSH bucket file of `band key % lsh_buckets` (`lsh/l<bucket>/<file>-<part>.arrow`).
2. verify (`VerifyBucketFn`, one LSH bucket per element): records sorted by (band key,
   content hash), candidate pairs within each band key verified by estimated Jaccard, and a
   spanning forest of the verified pairs (at most m - 1 edges per band key of m members)
   written to `edges/l<bucket>.jsonl`.
3. driver: connected components over the (few) edges, one keeper per component
   (`lorydata.near_dedup.group_duplicates`); the drop list is written per documents file
   (`drops/<file>.json`: dropped hash → [kept id, group size]), so a worker loads only the
   drops of the file it filters.
4. apply (`ApplyDropsFn`, one documents file per element): the file rewritten without its
   dropped documents, which become `near_duplicate` dead letters naming the id they
   duplicate (`dead_letters/near_dedup-<file>.jsonl`).

Dedup spans both splits, so a held-out document never has a near-copy in training. Every
output depends on the documents only (members sorted, keeper by length then hash, files
named after their input), so any runner and worker count gives the same result, and a
retried bundle rewrites its own files. Memory: a worker holds one documents file or one LSH
bucket (`RECORDS_PER_BUCKET`); the driver holds the edges and the drop list, both
proportional to the near-duplicates, not to the corpus.
"""

from __future__ import annotations

import json
import math
import posixpath

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.documents import DeadLetter, DropReason
from lorydata.minhash import MinHashConfig, MinHasher
from lorydata.near_dedup import PAIRWISE_LIMIT, DocRef, bucket_pairs, group_duplicates
from pipelines import fileio
from pipelines.documents_stage import (
    DEAD_LETTERS,
    SPLITS,
    _run_each,
    bucket_files,
    bucket_name,
    bucket_of,
    write_dead_letters,
)
from pipelines.options import BuildOptions
from pipelines.transforms import count

# Band records per LSH bucket the stage aims for: ≈ 100k × (4·128 + ~100) bytes ≈ 60 MB for
# one verifying worker at the default 128 permutations.
RECORDS_PER_BUCKET = 100_000
# A signing worker writes its buffered records out every this many records.
FLUSH_RECORDS = 50_000
LSH, EDGES, DROPS = "lsh", "edges", "drops"


def minhash_config(options: BuildOptions) -> MinHashConfig:
    """The MinHash LSH parameters the build options describe."""
    return MinHashConfig(shingle_words=options.near_dedup_shingle, bands=options.near_dedup_bands,
                         rows=options.near_dedup_rows, threshold=options.near_dedup_threshold)


def lsh_bucket_count(documents: int, bands: int) -> int:
    """LSH buckets for `documents` documents, each holding about `RECORDS_PER_BUCKET` records."""
    return max(1, math.ceil(documents * bands / RECORDS_PER_BUCKET))


def band_schema(num_perm: int) -> pa.Schema:
    return pa.schema([("band", pa.uint64()), ("key", pa.string()), ("length", pa.int64()), ("id", pa.string()),
                      ("signature", pa.list_(pa.uint32(), num_perm))])


def _stem(path: str) -> str:
    return posixpath.basename(path).rsplit(".", 1)[0]


def _lsh_name(bucket: int) -> str:
    return f"l{bucket:05d}"


class SignFileFn(beam.DoFn):
    """documents file → its band records in LSH bucket files.

    Args:
        folder: the stage folder.
        config: MinHash LSH parameters.
        buckets: LSH buckets (a band key modulo this picks the bucket).
    """

    def __init__(self, folder: str, config: MinHashConfig, buckets: int):
        self.folder, self.config, self.buckets = folder, config, buckets

    def setup(self):
        self.hasher = MinHasher(self.config)

    def process(self, path: str):
        stem, part, pending = _stem(path), 0, []
        table = fileio.read_table(path, columns=["content_hash", "id", "text"])
        for key, doc_id, text in zip(*(table.column(i).to_pylist() for i in range(3)), strict=True):
            signature = self.hasher.signature(text)
            if signature is None:
                count("near_dedup.no_words")
                continue
            count("near_dedup.signed")
            pending.append((key, len(text), doc_id, signature))
            if len(pending) * self.config.bands >= FLUSH_RECORDS:
                self._write(pending, f"{stem}-{part:04d}")
                pending, part = [], part + 1
        if pending:
            self._write(pending, f"{stem}-{part:04d}")

    def _write(self, docs: list[tuple], name: str) -> None:
        signatures = np.stack([d[3] for d in docs])
        bands = np.stack([self.hasher.band_keys(s) for s in signatures])  # (documents, bands)
        destination = bands % np.uint64(self.buckets)
        schema = band_schema(self.config.num_perm)
        for bucket in np.unique(destination).tolist():
            rows, cols = np.nonzero(destination == bucket)
            table = pa.table(
                [
                    pa.array(bands[rows, cols], pa.uint64()),
                    pa.array([docs[r][0] for r in rows], pa.string()),
                    pa.array([docs[r][1] for r in rows], pa.int64()),
                    pa.array([docs[r][2] for r in rows], pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(signatures[rows].ravel(), pa.uint32()),
                                                      self.config.num_perm),
                ],
                schema=schema,
            )
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, schema) as writer:
                writer.write_table(table)
            fileio.write_bytes(fileio.join(self.folder, LSH, _lsh_name(bucket), name + ".arrow"),
                               sink.getvalue().to_pybytes())


class VerifyBucketFn(beam.DoFn):
    """LSH bucket → its verified near-duplicate edges (a spanning forest per band key).

    Args:
        folder: the stage folder.
        threshold: minimum estimated Jaccard of a duplicate pair.
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.
    """

    def __init__(self, folder: str, threshold: float, pairwise_limit: int = PAIRWISE_LIMIT):
        self.folder, self.threshold, self.pairwise_limit = folder, threshold, pairwise_limit

    def process(self, bucket: int):
        paths = fileio.match(fileio.join(self.folder, LSH, _lsh_name(bucket), "*.arrow"))
        if not paths:
            return
        tables = [pa.ipc.open_file(pa.BufferReader(fileio.read_bytes(p))).read_all() for p in paths]
        table = pa.concat_tables(tables).sort_by([("band", "ascending"), ("key", "ascending")])
        bands = table.column("band").to_numpy()
        starts = np.flatnonzero(np.r_[True, bands[1:] != bands[:-1]])
        ends = np.r_[starts[1:], len(bands)]
        shared = [(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True) if e - s > 1]
        count("near_dedup.band_records", len(bands))
        if not shared:
            return
        num_perm = table.schema.field("signature").type.list_size
        signatures = table.column("signature").combine_chunks().flatten().to_numpy().reshape(-1, num_perm)
        keys, lengths, ids = (table.column(c).to_pylist() for c in ("key", "length", "id"))
        lines = []
        for start, end in shared:
            count("near_dedup.candidate_pairs", (end - start) * (end - start - 1) // 2)
            parent = list(range(end - start))
            for i, j, _ in bucket_pairs(signatures[start:end], self.threshold, self.pairwise_limit):
                ri, rj = _root(parent, i), _root(parent, j)
                if ri == rj:
                    continue  # already connected within this band key: the edge adds nothing
                parent[max(ri, rj)] = min(ri, rj)
                a, b = start + i, start + j
                lines.append(json.dumps([keys[a], lengths[a], ids[a], keys[b], lengths[b], ids[b]]) + "\n")
        count("near_dedup.edges", len(lines))
        if lines:
            fileio.write_bytes(fileio.join(self.folder, EDGES, _lsh_name(bucket) + ".jsonl"), "".join(lines).encode())


def _root(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


class ApplyDropsFn(beam.DoFn):
    """documents file → the same file in the stage folder without its dropped documents,
    which become `near_duplicate` dead letters. A file left empty is not written (as the
    documents stage writes no file for an empty bucket).

    Args:
        folder: the stage folder (drop lists in `drops/`, output files at the top).
    """

    def __init__(self, folder: str):
        self.folder = folder

    def process(self, path: str):
        stem = _stem(path)
        drops_path = fileio.join(self.folder, DROPS, stem + ".json")
        drops = fileio.load_json(drops_path) if fileio.exists(drops_path) else {}
        table = fileio.read_table(path)
        hashes = table.column("content_hash").to_pylist()
        keep = np.array([h not in drops for h in hashes], dtype=bool)
        letters = []
        if drops:
            sources, lines = table.column("source").to_pylist(), table.column("line").to_pylist()
            texts, tokens = table.column("text"), table.column("tokens")
            for i in np.flatnonzero(~keep).tolist():
                kept_id, group = drops[hashes[i]]
                count(f"dropped.{DropReason.NEAR_DUPLICATE}")
                count("near_dedup.dropped_tokens", len(tokens[i].values))
                letters.append(DeadLetter(sources[i], lines[i], DropReason.NEAR_DUPLICATE,
                                          f"near-duplicate of id {kept_id}, the document kept of a group of {group}",
                                          texts[i].as_py()[:200]))
        write_dead_letters(fileio.join(self.folder, DEAD_LETTERS, f"near_dedup-{stem}.jsonl"), letters)
        kept = table.filter(pa.array(keep))
        splits = kept.column("split").to_pylist()
        token_counts = pc.list_value_length(kept.column("tokens")).to_numpy()
        for split in SPLITS:
            chosen = np.fromiter((s == split for s in splits), bool, len(splits))
            count(f"near_dedup.documents.{split}", int(chosen.sum()))
            count(f"near_dedup.tokens.{split}", int(token_counts[chosen].sum()))
        if kept.num_rows:
            fileio.write_table(fileio.join(self.folder, posixpath.basename(path)), kept)


def read_edges(folder: str):
    """The (DocRef, DocRef) pairs of the stage's edge files."""
    for path in fileio.match(fileio.join(folder, EDGES, "*.jsonl")):
        for line in fileio.read_bytes(path).decode("utf-8").splitlines():
            ka, la, ia, kb, lb, ib = json.loads(line)
            yield DocRef(ka, la, ia), DocRef(kb, lb, ib)


def run_near_dedup_stage(options: BuildOptions, documents_dir: str, out: str, counts: dict,
                         lsh_buckets: int | None = None, pairwise_limit: int = PAIRWISE_LIMIT) -> dict:
    """Drop the near-duplicates of the documents stage's files into `out` (same file names),
    with `out/dead_letters/near_dedup-*.jsonl`.

    Args:
        options: the build options (MinHash parameters, runner).
        documents_dir: the finished documents stage's folder.
        out: the stage's temp folder.
        counts: the documents stage's counts (documents kept, buckets).
        lsh_buckets: override the LSH bucket count (default: `lsh_bucket_count`).
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.

    Returns:
        Counts: documents signed and without words, LSH buckets, band records, edges,
        documents dropped and their groups and tokens, documents and tokens kept per split,
        and the MinHash parameters.
    """
    config = minhash_config(options)
    lsh_buckets = lsh_buckets or lsh_bucket_count(counts["documents_kept"], config.bands)
    files = bucket_files(documents_dir)
    found = _run_each(options, "Sign", files, SignFileFn(out, config, lsh_buckets))
    for name, value in _run_each(options, "Verify", list(range(lsh_buckets)),
                                 VerifyBucketFn(out, config.threshold, pairwise_limit)).items():
        found[name] = found.get(name, 0) + value

    dropped = group_duplicates(read_edges(out))
    per_file: dict[str, dict[str, list]] = {}
    for d in dropped:
        stem = bucket_name(bucket_of(d.dropped.key, counts["buckets"]))
        per_file.setdefault(stem, {})[d.dropped.key] = [d.kept.id, d.group_size]
    for path in files:
        drops = per_file.pop(_stem(path), None)
        if drops:
            fileio.save_json(fileio.join(out, DROPS, _stem(path) + ".json"), drops)
    if per_file:  # a documents bucket with no file cannot hold a document: a stage-order bug
        raise ValueError(f"near-duplicates in documents buckets without a file: {sorted(per_file)}")

    applied = _run_each(options, "Apply", files, ApplyDropsFn(out))
    fileio.delete_tree(fileio.join(out, LSH))
    return {
        "documents_signed": found.get("near_dedup.signed", 0),
        "documents_without_words": found.get("near_dedup.no_words", 0),
        "lsh_buckets": lsh_buckets,
        "band_records": found.get("near_dedup.band_records", 0),
        "edges": found.get("near_dedup.edges", 0),
        "dropped": applied.get(f"dropped.{DropReason.NEAR_DUPLICATE}", 0),
        "groups": len({d.kept.key for d in dropped}),
        "dropped_tokens": applied.get("near_dedup.dropped_tokens", 0),
        "documents_per_split": {s: applied.get(f"near_dedup.documents.{s}", 0) for s in SPLITS},
        "tokens_per_split": {s: applied.get(f"near_dedup.tokens.{s}", 0) for s in SPLITS},
        "config": {"shingle_words": config.shingle_words, "num_perm": config.num_perm, "bands": config.bands,
                   "rows": config.rows, "threshold": config.threshold, "seed": config.seed},
    }
