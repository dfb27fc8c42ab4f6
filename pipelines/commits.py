"""Partition commits: what makes a stage resumable inside itself.

Every Beam step of a stage runs one partition per element (an input file, a bucket, a
cell, a unit, a shard). A partition writes its files through a `Commit`, which records
each file's size and sha256 and the counts the partition adds, and writes that record last
(`_commits/<step>/<partition>.json` in the stage folder). So:

- a partition is done exactly when its record exists and every file it lists is there
  with its recorded size (`done_partitions`); a rerun after a kill runs only the others,
  and a partition whose files were damaged or removed runs again;
- a stage's counts are the sums over its records (`totals`), whatever ran when: counts of
  a partition are counted once even when its task was retried;
- nothing is renamed, so the same protocol works on object stores.
"""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipelines import fileio

COMMITS = "_commits"


def commits_folder(stage: str, step: str | None = None) -> str:
    return fileio.join(stage, COMMITS, step) if step else fileio.join(stage, COMMITS)


class Commit:
    """The files and counts of one partition of one step.

    Args:
        stage: the stage folder (every file written must be inside it).
        step: the step's name (a folder of records each).
        key: the partition's name, unique within the step.
    """

    def __init__(self, stage: str, step: str, key: str):
        self.stage, self.step, self.key = str(stage), step, key
        self.files: dict[str, list] = {}
        self.counts: dict[str, int] = {}

    def write_bytes(self, path: str, data: bytes) -> None:
        fileio.write_bytes(path, data)
        self.files[fileio.relative(path, self.stage)] = [len(data), hashlib.sha256(data).hexdigest()]

    def write_table(self, path: str, table: pa.Table) -> None:
        self.write_bytes(path, fileio.table_bytes(table))

    def write_scratch(self, path: str, table: pa.Table) -> None:
        """A table the next step reads once, as Arrow IPC (`fileio.scratch_compression`)."""
        self.write_bytes(path, fileio.ipc_bytes(table, fileio.scratch_compression(path)))

    def save_npy(self, path: str, array: np.ndarray) -> None:
        self.write_bytes(path, fileio.npy_bytes(array))

    def save_npz(self, path: str, **arrays: np.ndarray) -> None:
        self.write_bytes(path, fileio.npz_bytes(**arrays))

    def save_json(self, path: str, value) -> None:
        self.write_bytes(path, fileio.json_bytes(value))

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def close(self) -> None:
        """Write the record: from now on the partition is done."""
        record = {"key": self.key, "files": self.files, "counts": self.counts}
        fileio.write_bytes(fileio.join(commits_folder(self.stage, self.step), f"{self.key}.json"),
                           json.dumps(record, sort_keys=True).encode())


class PartitionFn(beam.DoFn):
    """A DoFn that processes one partition per element through a `Commit`.

    Subclasses implement `run(element, out)` (write files and counts through `out`) and,
    where the element is not a plain name or number, `key(element)`. `BeamRunner.run_steps`
    binds the stage folder and step name before the pipeline is built.
    """

    stage: str = ""
    step: str = ""

    def bind(self, stage: str, step: str) -> PartitionFn:
        self.stage, self.step = str(stage), step
        return self

    def key(self, element) -> str:
        if isinstance(element, (int, np.integer)):
            return f"{int(element):06d}"
        return fileio.stem(element)

    def run(self, element, out: Commit) -> None:
        raise NotImplementedError

    def process(self, element, after=None):
        out = Commit(self.stage, self.step, self.key(element))
        self.run(element, out)
        out.close()
        yield out.key


def load_records(stage: str, step: str) -> dict[str, dict]:
    """{partition: record} of every record of a step."""
    records = {}
    for path in fileio.match(fileio.join(commits_folder(stage, step), "*.json")):
        record = json.loads(fileio.read_bytes(path))
        records[record["key"]] = record
    return records


def done_partitions(stage: str, step: str, stored: dict[str, int] | None = None) -> dict[str, dict]:
    """The records of the partitions whose listed files are all there with their sizes.

    Args:
        stage: the stage folder.
        step: the step.
        stored: {path: bytes} below the stage folder (`fileio.sizes`), when already listed.
    """
    records = load_records(stage, step)
    if not records:
        return {}
    stored = fileio.sizes(stage) if stored is None else stored
    return {key: record for key, record in records.items()
            if all(stored.get(fileio.join(stage, name)) == size for name, (size, _) in record["files"].items())}


def totals(records: list[dict]) -> dict[str, int]:
    """The counts of several records added up."""
    found: dict[str, int] = {}
    for record in records:
        for name, value in record["counts"].items():
            found[name] = found.get(name, 0) + value
    return found
