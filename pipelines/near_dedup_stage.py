"""Near-duplicate removal on Beam: MinHash LSH over the exactly deduplicated documents.

Runs after exact dedup and before embedding, for both orders (so similarity and random
builds of one input hold the same documents, and copies are never embedded). Documents
move between steps through files partitioned by destination, never through an in-memory
shuffle, so no process holds the corpus:

1. `SignFileFn`, one documents file at a time: MinHash signature and band keys of every
   document; each (band key, content hash, length, id, signature) record is written to the
   bucket file of `band key % buckets`. Yields (bucket, file name) only.
2. `VerifyBucketFn`, one bucket at a time (its file names grouped by bucket, a small
   GroupByKey): records sorted by (band key, content hash), candidate pairs within each
   band key verified by estimated Jaccard, and a spanning forest of the verified pairs
   written out as edges (at most m - 1 per band key of m members).
3. Driver: connected components over the (few) edges, one keeper per component
   (`lorydata.near_dedup.group_duplicates`), the drop list written as a file
   (per dropped document: its hash, the kept id, the group size).
4. `ApplyDropsFn`, one documents file at a time: rewrites the file without the dropped
   documents, which become `near_duplicate` dead letters naming the id they duplicate.

Dedup spans both splits, so a held-out document never has a near-copy in training.
Every step's output depends on the documents only (sorted members, keeper by length then
hash, files named after their input file), so any runner and worker count gives the same
result, and a retried bundle rewrites the same files.
"""

from __future__ import annotations

import json
import math
import posixpath

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lorydata.documents import DeadLetter, DropReason
from lorydata.minhash import MinHashConfig, MinHasher
from lorydata.near_dedup import PAIRWISE_LIMIT, DocRef, bucket_pairs, group_duplicates
from pipelines.documents_stage import counters
from pipelines.options import BuildOptions, make_pipeline
from pipelines.transforms import DEAD, count, drop, run_pipeline

# Band records per bucket the stage aims for: ≈ 100k × (4·128 + ~100) bytes ≈ 60 MB for
# one verifying worker at the default 128 permutations.
RECORDS_PER_BUCKET = 100_000
# A signing worker writes its buffered records out every this many records.
FLUSH_RECORDS = 50_000
DROPS_FILE = "drops.json"


def minhash_config(options: BuildOptions) -> MinHashConfig:
    """The MinHash LSH parameters the build options describe."""
    return MinHashConfig(shingle_words=options.near_dedup_shingle, bands=options.near_dedup_bands,
                         rows=options.near_dedup_rows, threshold=options.near_dedup_threshold)


def bucket_count(documents: int, bands: int) -> int:
    """Buckets for `documents` documents, so each holds about `RECORDS_PER_BUCKET` records."""
    return max(1, math.ceil(documents * bands / RECORDS_PER_BUCKET))


def band_schema(num_perm: int) -> pa.Schema:
    return pa.schema([("band", pa.uint64()), ("key", pa.string()), ("length", pa.int64()), ("id", pa.string()),
                      ("signature", pa.list_(pa.uint32(), num_perm))])


def _stem(path: str) -> str:
    return posixpath.basename(path).rsplit(".", 1)[0]


class SignFileFn(beam.DoFn):
    """documents file → its band records in bucket files; yields (bucket, bucket file).

    Args:
        folder: where bucket folders go (`<folder>/bucket-00012/<file stem>-<part>.arrow`).
        config: MinHash LSH parameters.
        buckets: number of buckets (band key modulo this picks a document's bucket).
    """

    def __init__(self, folder: str, config: MinHashConfig, buckets: int):
        self.folder, self.config, self.buckets = folder, config, buckets

    def setup(self):
        self.hasher = MinHasher(self.config)

    def process(self, path: str):
        stem, part = _stem(path), 0
        pending: list[tuple] = []
        with FileSystems.open(path) as f:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(columns=["content_hash", "id", "text"], batch_size=512):
                for key, doc_id, text in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                    signature = self.hasher.signature(text)
                    if signature is None:
                        count("near_dedup.no_words")
                        continue
                    count("near_dedup.signed")
                    pending.append((key, len(text), doc_id, signature))
                if len(pending) * self.config.bands >= FLUSH_RECORDS:
                    yield from self._write(pending, f"{stem}-{part:04d}")
                    pending, part = [], part + 1
        if pending:
            yield from self._write(pending, f"{stem}-{part:04d}")

    def _write(self, docs: list[tuple], name: str):
        signatures = np.stack([d[3] for d in docs])
        bands = np.stack([self.hasher.band_keys(s) for s in signatures])  # (n, bands)
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
            target = posixpath.join(self.folder, f"bucket-{bucket:05d}", name + ".arrow")
            with FileSystems.create(target) as f, pa.ipc.new_file(f, schema) as writer:
                writer.write_table(table)
            yield bucket, target


class VerifyBucketFn(beam.DoFn):
    """(bucket, its files) → verified near-duplicate edges (a spanning forest per band key).

    Args:
        threshold: minimum estimated Jaccard of a duplicate pair.
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.
    """

    def __init__(self, threshold: float, pairwise_limit: int = PAIRWISE_LIMIT):
        self.threshold, self.pairwise_limit = threshold, pairwise_limit

    def process(self, element):
        _, paths = element
        tables = []
        for path in sorted(set(paths)):
            with FileSystems.open(path) as f:
                tables.append(pa.ipc.open_file(pa.BufferReader(f.read())).read_all())
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
        for start, end in shared:
            count("near_dedup.candidate_pairs", (end - start) * (end - start - 1) // 2)
            parent = list(range(end - start))
            for i, j, _ in bucket_pairs(signatures[start:end], self.threshold, self.pairwise_limit):
                ri, rj = _root(parent, i), _root(parent, j)
                if ri == rj:
                    continue  # already connected within this band key: the edge adds nothing
                parent[max(ri, rj)] = min(ri, rj)
                a, b = start + i, start + j
                count("near_dedup.edges")
                yield json.dumps([keys[a], lengths[a], ids[a], keys[b], lengths[b], ids[b]])


def _root(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


class ApplyDropsFn(beam.DoFn):
    """documents file → the same file in `out_folder` without the dropped documents, which
    go to the `dead` output as `near_duplicate` dead letters.

    Args:
        drops_path: the drop list (`{dropped hash: [kept id, group size]}`, JSON).
        out_folder: where the filtered files go (same names).
    """

    def __init__(self, drops_path: str, out_folder: str):
        self.drops_path, self.out_folder = drops_path, out_folder

    def setup(self):
        with FileSystems.open(self.drops_path) as f:
            self.drops = json.loads(f.read())

    def process(self, path: str):
        target = posixpath.join(self.out_folder, posixpath.basename(path))
        with FileSystems.open(path) as f:
            reader = pq.ParquetFile(f)
            with FileSystems.create(target) as sink, pq.ParquetWriter(sink, reader.schema_arrow,
                                                                      compression="zstd") as writer:
                for batch in reader.iter_batches(batch_size=512):
                    hashes = batch.column(batch.schema.get_field_index("content_hash")).to_pylist()
                    dropped = [i for i, h in enumerate(hashes) if h in self.drops]
                    for i in dropped:
                        row = {name: batch.column(name)[i].as_py() for name in ("source", "line", "text", "content_hash")}
                        kept_id, group = self.drops[row["content_hash"]]
                        count("near_dedup.dropped_tokens", len(batch.column("tokens")[i]))
                        detail = f"near-duplicate of id {kept_id}, the document kept of a group of {group}"
                        yield drop(DeadLetter(row["source"], row["line"], DropReason.NEAR_DUPLICATE, detail,
                                              row["text"][:200]))
                    keep = np.ones(len(hashes), dtype=bool)
                    keep[dropped] = False
                    kept = batch.filter(pa.array(keep))
                    for split in kept.column(kept.schema.get_field_index("split")).to_pylist():
                        count(f"near_dedup.documents.{split}")
                    writer.write_batch(kept)


def read_edges(pattern: str):
    """The (DocRef, DocRef) pairs in the edge files matching `pattern`."""
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                ka, la, ia, kb, lb, ib = json.loads(line)
                yield DocRef(ka, la, ia), DocRef(kb, lb, ib)


def run_near_dedup_stage(options: BuildOptions, document_files: list[str], out: str, documents: int,
                         buckets: int | None = None, pairwise_limit: int = PAIRWISE_LIMIT) -> dict:
    """Drop near-duplicates from the documents files into `out` (same file names), with
    `out/dead_letters/*.jsonl`.

    Args:
        options: the build options (MinHash parameters, runner).
        document_files: the documents stage's Parquet files (every split).
        out: the stage's temp folder.
        documents: how many documents the files hold (sizes the buckets).
        buckets: override the bucket count (default: `bucket_count`).
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.

    Returns:
        Counts: documents signed, without words, dropped, groups, edges, kept per split, and
        the parameters used.
    """
    config = minhash_config(options)
    buckets = buckets or bucket_count(documents, config.bands)
    files = sorted(document_files)

    find = make_pipeline(options)
    (
        find
        | "Files" >> beam.Create(files)
        | "SpreadFiles" >> beam.Reshuffle()
        | "Sign" >> beam.ParDo(SignFileFn(posixpath.join(out, "buckets"), config, buckets))
        | "FilesByBucket" >> beam.GroupByKey()
        | "Verify" >> beam.ParDo(VerifyBucketFn(config.threshold, pairwise_limit))
        | "WriteEdges" >> beam.io.WriteToText(posixpath.join(out, "edges", "edges"), file_name_suffix=".jsonl")
    )
    found = counters(run_pipeline(find))

    dropped = group_duplicates(read_edges(posixpath.join(out, "edges", "edges*.jsonl")))
    drops = {d.dropped.key: [d.kept.id, d.group_size] for d in dropped}
    drops_path = posixpath.join(out, DROPS_FILE)
    with FileSystems.create(drops_path) as f:
        f.write(json.dumps(drops, sort_keys=True).encode())

    apply = make_pipeline(options)
    result = (
        apply
        | "Files" >> beam.Create(files)
        | "SpreadFiles" >> beam.Reshuffle()
        | "Apply" >> beam.ParDo(ApplyDropsFn(drops_path, out)).with_outputs(DEAD, main="files")
    )
    (
        result[DEAD]
        | "DeadJson" >> beam.Map(lambda letter: letter.to_json())
        | "WriteDead" >> beam.io.WriteToText(posixpath.join(out, "dead_letters", "near_duplicates"),
                                             file_name_suffix=".jsonl")
    )
    applied = counters(run_pipeline(apply))
    FileSystems.delete([posixpath.join(out, "buckets"), posixpath.join(out, "edges")])
    return {
        "documents_signed": found.get("near_dedup.signed", 0),
        "documents_without_words": found.get("near_dedup.no_words", 0),
        "band_records": found.get("near_dedup.band_records", 0),
        "buckets": buckets,
        "edges": found.get("near_dedup.edges", 0),
        "dropped": applied.get(f"dropped.{DropReason.NEAR_DUPLICATE}", 0),
        "dropped_tokens": applied.get("near_dedup.dropped_tokens", 0),
        "groups": len({d.kept.key for d in dropped}),
        "documents_per_split": {k.rsplit(".", 1)[1]: v for k, v in sorted(applied.items())
                                if k.startswith("near_dedup.documents.")},
        "config": {"shingle_words": config.shingle_words, "num_perm": config.num_perm, "bands": config.bands,
                   "rows": config.rows, "threshold": config.threshold, "seed": config.seed},
    }
