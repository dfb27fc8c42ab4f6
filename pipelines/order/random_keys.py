"""The random order of a split: each document's unit and key come from a seeded hash of its
content hash, so nothing of the split is ever in one process."""

from __future__ import annotations

import math

import numpy as np

from lorydata.shuffle import mix64
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn
from pipelines.order.split_data import (
    UNIT_TOKENS,
    empty_routes,
    hash_keys,
    split_rows,
    token_lengths,
    unit_counts,
)
from pipelines.runner.beam import BeamRunner


class RandomRoutesFn(PartitionFn):
    """documents file → its routes for the random order: key = seeded hash of the content
    hash, unit = the key's range among `units` equal ranges; per-unit counts beside.

    Args:
        order_dir: the order stage folder.
        split: the split being ordered.
        units: number of units.
        seed: the order's seed.
    """

    def __init__(self, order_dir: str, split: str, units: int, seed: int):
        self.order_dir, self.split, self.units, self.seed = order_dir, split, units, seed

    def run(self, path: str, out: Commit) -> None:
        table = fileio.read_table(path, ["content_hash", "split", "tokens"])
        rows = split_rows(table, self.split)
        keys = mix64(hash_keys(table.column("content_hash").take(rows)), self.seed)
        unit = np.minimum(((keys >> np.uint64(11)).astype(np.float64) * self.units / 2.0**53).astype(np.int64),
                          self.units - 1)
        routes = empty_routes(table.num_rows)
        routes[rows, 0] = unit
        routes[rows, 1] = (keys >> np.uint64(1)).astype(np.int64)
        out.save_npy(layout.routes_file(self.order_dir, path), routes)
        lengths = token_lengths(table.take(rows))
        out.save_npy(layout.unit_counts_file(self.order_dir, path), unit_counts(unit, lengths, self.units))


def random_order(seed: int, runner: BeamRunner, documents_dir: str, split: str, out: str, n: int,
                 tokens: int) -> dict:
    """Routes and units of the random order of `split` into `out`.

    Args:
        seed: the order's seed.
        runner: where the Beam step runs.
        documents_dir: the finished documents stage folder.
        split: the split.
        out: the order stage's (temp) folder.
        n / tokens: documents and tokens of the split (size the units: about `UNIT_TOKENS`).
    """
    units = max(1, math.ceil((tokens + n) / UNIT_TOKENS))
    runner.run_each(out, "RandomRoutes", layout.documents_files(documents_dir), RandomRoutesFn(out, split, units, seed))
    parts = fileio.match(fileio.join(layout.unit_counts_folder(out), "*.npy"))
    totals = sum((fileio.load_npy(p) for p in parts), np.zeros((units, 2), np.int64))
    fileio.save_npy(layout.units_file(out), totals)
    return {"order": {"method": "random", "seed": seed, "metrics": {}, "units": units}}
