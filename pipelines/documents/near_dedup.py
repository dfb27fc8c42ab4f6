"""Near-duplicate removal on Beam: MinHash LSH over the exactly deduplicated documents.

The last steps of the documents stage (`pipelines.documents.run_documents_stage` calls
`drop_near_duplicates` after exact dedup), so it runs before embedding for both orders:
similarity and random builds of one input hold the same documents, copies are never
embedded, and every later stage reads the documents files as before. Documents move
between steps through files partitioned by destination, never through an in-memory
shuffle, and Beam carries only file names and bucket numbers:

1. sign (`SignFileFn`, one deduplicated file per element): MinHash signature and band keys of
   every document; the signatures go once to the file's signatures file
   (`layout.minhash_file`, row-aligned), and each (band key, content hash, length, id,
   file, row) record to the LSH bucket file of `band key % lsh_buckets` (`layout.lsh_file`).
2. verify (`VerifyBucketFn`, one LSH bucket per element): records sorted by (band key,
   content hash); for the band keys two or more documents share, their signatures are read
   by row, candidate pairs within each key verified by estimated Jaccard, and a spanning
   forest of the verified pairs (at most m - 1 edges per band key of m members) written to
   the bucket's edges file.
   Steps 1 and 2 run as one Beam pipeline (`BeamRunner.run_steps`: verify starts when every
   file is signed).
3. driver: connected components over the (few) edges, one keeper per component
   (`lorydata.near_dedup.group_duplicates`); drop lists written per documents file
   (`layout.drops_file`: dropped hash → [kept id, group size]).
4. apply (`ApplyDropsFn`, one deduplicated file per element): the stage's documents file,
   which is the deduplicated (Arrow IPC scratch) file without its dropped documents, as Parquet;
   the dropped documents become `near_duplicate` dead letters naming the id they duplicate
   (`near_dedup-<file>.jsonl`). Inputs are never changed, so every step can be resumed.

Dedup spans both splits, so a held-out document never has a near-copy in training. Every
output depends on the documents only (members sorted, keeper by length then hash, files
named after their input), so any runner and worker count gives the same result. Memory: a
worker holds one documents file or one LSH bucket (`RECORDS_PER_BUCKET`); the driver holds
the edges and the drop lists, which grow with the near-duplicates, not with the corpus.
Edges and drop lists stay in the near-dedup folder for inspection.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.documents import DeadLetter, DropReason
from lorydata.minhash import MinHashConfig, MinHasher
from lorydata.near_dedup import PAIRWISE_LIMIT, DocRef, UnionFind, bucket_pairs, group_duplicates
from pipelines import dead_letters, fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.runner.beam import BeamRunner

# Band records per LSH bucket the step aims for: ≈ 100k × ~90 bytes ≈ 9 MB for one verifying
# worker (a record names its document's signature row instead of holding it).
RECORDS_PER_BUCKET = 100_000
# A signing worker writes its buffered records out every this many records.
FLUSH_RECORDS = 400_000


def lsh_bucket_count(documents: int, bands: int) -> int:
    """LSH buckets for `documents` documents, each holding about `RECORDS_PER_BUCKET` records."""
    return max(1, math.ceil(documents * bands / RECORDS_PER_BUCKET))


BAND_SCHEMA = pa.schema([("band", pa.uint64()), ("key", pa.string()), ("length", pa.int64()), ("id", pa.string()),
                         ("file", pa.string()), ("row", pa.uint32())])


class SignFileFn(PartitionFn):
    """deduplicated documents file → its signatures file and its band records in LSH bucket
    files.

    The signatures (num_perm × 4 bytes a document) are written once, row-aligned with the
    documents file; each of a document's band records names its row there, so the bucket
    files carry about 90 bytes a band instead of the whole signature once per band.

    Args:
        folder: the near-dedup work folder.
        config: MinHash LSH parameters.
        buckets: LSH buckets (a band key modulo this picks the bucket).
    """

    def __init__(self, folder: str, config: MinHashConfig, buckets: int):
        self.folder, self.config, self.buckets = folder, config, buckets

    def setup(self):
        self.hasher = MinHasher(self.config)

    def run(self, path: str, out: Commit) -> None:
        table = fileio.read_table(path, columns=["content_hash", "id", "text"])
        signatures, has_words = self.hasher.signatures(table.column("text").to_pylist())  # one compiled pass
        out.count("near_dedup.no_words", int((~has_words).sum()))
        out.count("near_dedup.signed", int(has_words.sum()))
        out.save_npy(layout.minhash_file(self.folder, path), signatures)
        signed = np.flatnonzero(has_words)
        lengths = pc.utf8_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
        per_part = -(-FLUSH_RECORDS // self.config.bands)  # documents per part: a bounded buffer per file
        for part, start in enumerate(range(0, len(signed), per_part)):
            rows = signed[start: start + per_part]
            self._write(out, table, rows, self.hasher.band_keys(signatures[rows]), lengths[rows], fileio.stem(path),
                        part)

    def _write(self, out: Commit, table: pa.Table, rows: np.ndarray, bands: np.ndarray, lengths: np.ndarray,
               stem: str, part: int) -> None:
        destination = bands % np.uint64(self.buckets)  # (documents, bands)
        order = np.argsort(destination, axis=None, kind="stable")
        members, cols = np.unravel_index(order, destination.shape)
        cuts = np.flatnonzero(np.diff(destination.ravel()[order])) + 1
        for chunk in np.split(np.arange(len(order)), cuts):
            if not len(chunk):
                continue
            m, c = members[chunk], cols[chunk]
            chosen = pa.array(rows[m])
            table_part = pa.table(
                [
                    pa.array(bands[m, c], pa.uint64()),
                    table.column("content_hash").take(chosen),
                    pa.array(lengths[m], pa.int64()),
                    table.column("id").take(chosen),
                    pa.array([stem] * len(m), pa.string()),
                    pa.array(rows[m], pa.uint32()),
                ],
                schema=BAND_SCHEMA,
            )
            bucket = int(destination[m[0], c[0]])
            out.write_scratch(layout.lsh_file(self.folder, bucket, f"{stem}-{part:04d}"), table_part)


class VerifyBucketFn(PartitionFn):
    """LSH bucket → its verified near-duplicate edges (a spanning forest per band key).

    Only the records of band keys that two or more documents share are looked at further:
    their signatures are read from the signing step's files, row by row.

    Args:
        folder: the near-dedup work folder.
        threshold: minimum estimated Jaccard of a duplicate pair.
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.
    """

    def __init__(self, folder: str, threshold: float, pairwise_limit: int = PAIRWISE_LIMIT):
        self.folder, self.threshold, self.pairwise_limit = folder, threshold, pairwise_limit

    def run(self, bucket: int, out: Commit) -> None:
        paths = layout.lsh_files(self.folder, bucket)
        if not paths:
            return
        table = fileio.read_tables(paths).sort_by([("band", "ascending"), ("key", "ascending")])
        bands = table.column("band").to_numpy()
        out.count("near_dedup.band_records", len(bands))
        starts = np.flatnonzero(np.r_[True, bands[1:] != bands[:-1]])
        sizes = np.diff(np.r_[starts, len(bands)])
        shared = sizes > 1
        if not shared.any():
            return
        # the records of shared band keys, in sorted order, and each key's run among them
        chosen = np.repeat(shared, sizes)
        table = table.filter(pa.array(chosen))
        runs = np.cumsum(np.r_[0, sizes[shared]])
        signatures = self._signatures(table)
        columns = [table.column(c).to_pylist() for c in ("key", "length", "id", "file")]
        lines = []
        for start, end in zip(runs[:-1].tolist(), runs[1:].tolist(), strict=True):
            out.count("near_dedup.candidate_pairs", (end - start) * (end - start - 1) // 2)
            sets = UnionFind()
            for i, j, _ in bucket_pairs(signatures[start:end], self.threshold, self.pairwise_limit):
                if not sets.union(i, j):
                    continue  # already connected within this band key: the edge adds nothing
                lines.append(json.dumps([[c[start + i] for c in columns], [c[start + j] for c in columns]]) + "\n")
        out.count("near_dedup.edges", len(lines))
        if lines:
            out.write_bytes(layout.edges_file(self.folder, bucket), "".join(lines).encode())

    def _signatures(self, table: pa.Table) -> np.ndarray:
        """(records, num_perm) signatures of `table`'s records, read from each file's rows."""
        files = np.asarray(table.column("file").to_pylist(), dtype=object)
        rows = table.column("row").to_numpy().astype(np.int64)
        signatures = None
        for stem in sorted(set(files.tolist())):
            where = np.flatnonzero(files == stem)
            needed, back = np.unique(rows[where], return_inverse=True)
            found = fileio.load_npy_rows(layout.minhash_file(self.folder, stem), needed)
            if signatures is None:
                signatures = np.empty((len(rows), found.shape[1]), dtype=found.dtype)
            signatures[where] = found[back]
        return signatures


class ApplyDropsFn(PartitionFn):
    """deduplicated documents file → the stage's documents file without its dropped documents
    (not written when nothing is left), and `near_duplicate` dead
    letters. The counts it adds are the documents stage's own (`documents_kept`, `tokens`,
    `documents.<split>`, `tokens.<split>`: down by what it drops; `dropped.near_duplicate`:
    up), so the stage's counts come out right by adding them.

    Args:
        folder: the near-dedup work folder (drop lists).
        stage: the documents stage folder.
        with_drops: names (`fileio.stem`) of the files that have drops.
    """

    def __init__(self, folder: str, stage: str, with_drops: set[str]):
        self.folder, self.stage, self.with_drops = folder, stage, with_drops

    def run(self, path: str, out: Commit) -> None:
        target = layout.documents_file(self.stage, int(fileio.stem(path)[1:]))
        table = fileio.read_table(path)
        if fileio.stem(path) not in self.with_drops:
            out.write_table(target, table)
            return
        drops = fileio.load_json(layout.drops_file(self.folder, path))
        hashes = table.column("content_hash").to_pylist()
        keep = np.array([h not in drops for h in hashes], dtype=bool)
        sources, lines, splits = (table.column(c).to_pylist() for c in ("source", "line", "split"))
        tokens = pc.list_value_length(table.column("tokens")).to_numpy()
        letters = []
        for i in np.flatnonzero(~keep).tolist():
            kept_id, group = drops[hashes[i]]
            out.count(f"dropped.{DropReason.NEAR_DUPLICATE}")
            for name, n in (("documents_kept", 1), (f"documents.{splits[i]}", 1), ("tokens", tokens[i]),
                            (f"tokens.{splits[i]}", tokens[i])):
                out.count(name, -int(n))
            letters.append(DeadLetter(sources[i], lines[i], DropReason.NEAR_DUPLICATE,
                                      f"near-duplicate of id {kept_id}, the document kept of a group of {group}",
                                      table.column("text")[i].as_py()[:200]))
        dead_letters.write(out, layout.dead_letter_file(self.stage, f"near_dedup-{fileio.stem(path)}"), letters)
        if keep.any():
            out.write_table(target, table.filter(pa.array(keep)))


def read_edges(folder: str):
    """The verified pairs of the edge files, as ((DocRef, file), (DocRef, file))."""
    for path in layout.edges_files(folder):
        for line in fileio.read_bytes(path).decode("utf-8").splitlines():
            (ka, la, ia, fa), (kb, lb, ib, fb) = json.loads(line)
            yield (DocRef(ka, la, ia), fa), (DocRef(kb, lb, ib), fb)


def drop_near_duplicates(config: MinHashConfig, runner: BeamRunner, files: list[str], documents: int, stage: str,
                         work: str, lsh_buckets: int | None = None,
                         pairwise_limit: int = PAIRWISE_LIMIT) -> tuple[dict, dict[str, int]]:
    """Write the stage's documents files: the deduplicated `files` without near-duplicates.

    Args:
        config: MinHash LSH parameters.
        runner: where the Beam steps run.
        files: the deduplicated documents files (`layout.deduped_files`).
        documents: how many documents they hold (sizes the LSH buckets).
        stage: the documents stage folder (documents files, `near_dedup-<file>.jsonl` dead
            letters, partition records).
        work: a folder for the step's files (LSH buckets are removed at the end; edges and
            drop lists stay).
        lsh_buckets: override the LSH bucket count (default: `lsh_bucket_count`).
        pairwise_limit: see `lorydata.near_dedup.bucket_pairs`.

    Returns:
        (what the step found: documents signed and without words, LSH buckets, band records,
        candidate pairs, edges kept, groups, dropped, parameters; counter changes for the
        documents stage).
    """
    lsh_buckets = lsh_buckets or lsh_bucket_count(documents, config.bands)
    found = runner.run_steps(stage, [
        ("Sign", files, SignFileFn(work, config, lsh_buckets)),
        ("Verify", list(range(lsh_buckets)), VerifyBucketFn(work, config.threshold, pairwise_limit)),
    ])

    pairs = list(read_edges(work))
    file_of = {ref.key: file for pair in pairs for ref, file in pair}
    dropped = group_duplicates((a, b) for (a, _), (b, _) in pairs)
    per_file: dict[str, dict[str, list]] = {}
    for d in dropped:
        per_file.setdefault(file_of[d.dropped.key], {})[d.dropped.key] = [d.kept.id, d.group_size]
    for path in files:
        if fileio.stem(path) in per_file:
            fileio.save_json(layout.drops_file(work, path), per_file[fileio.stem(path)])
    changes = runner.run_each(stage, "Apply", files, ApplyDropsFn(work, stage, set(per_file)))
    info = {
        "documents_signed": found.get("near_dedup.signed", 0),
        "documents_without_words": found.get("near_dedup.no_words", 0),
        "lsh_buckets": lsh_buckets,
        "band_records": found.get("near_dedup.band_records", 0),
        "candidate_pairs": found.get("near_dedup.candidate_pairs", 0),
        "edges": found.get("near_dedup.edges", 0),
        "groups": len({d.kept.key for d in dropped}),
        "dropped": len(dropped),
        "config": {"shingle_words": config.shingle_words, "num_perm": config.num_perm, "bands": config.bands,
                   "rows": config.rows, "threshold": config.threshold, "seed": config.seed},
    }
    return info, changes
