"""The Beam steps of the shards stage (see `pipelines.shards`), everything between them in
files (`pipelines.layout`, shards stage scratch):

1. route (`RouteTokensFn`, per documents file): each document's tokens and domain to the
   files of its unit, with its key (the routes of the order stage).
2. pack (`PackUnitFn`, per unit): the unit's documents in key order, packed into sequences
   numbered from the unit's first `seq_id`; sequence `seq_id` goes to place
   `permute(seq_id)` of a seeded permutation of all sequences of the split, i.e. to shard
   `place // rows_per_shard`, written as the unit's part of that shard.
3. assemble (`AssembleShardFn`, per shard): the shard's parts, rows in place order, written
   atomically as a zstd Arrow shard; its `ShardInfo` beside.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorydata.manifest import ShardInfo
from lorydata.pack import SequencePacker
from lorydata.shards import sequences_to_table, shard_name, table_to_ipc_bytes
from lorydata.shuffle import permute
from pipelines import fileio, layout
from pipelines.commits import Commit, PartitionFn

UNIT_SCHEMA = pa.schema([("key", pa.int64()), ("tokens", pa.list_(pa.int32())), ("domain", pa.string())])


def sequences_per_unit(tokens: np.ndarray, seq_len: int, tail: str) -> np.ndarray:
    """Sequences that packing a unit of `tokens` tokens (EOS included) yields."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens // seq_len + ((tokens % seq_len > 0) if tail == "pad" else 0)


class RouteTokensFn(PartitionFn):
    """documents file → its split's documents in their units' files.

    Args:
        order_dir: the finished order stage folder (routes).
        scratch: the shards stage's scratch folder.
    """

    def __init__(self, order_dir: str, scratch: str):
        self.order_dir, self.scratch = order_dir, scratch

    def run(self, path: str, out: Commit) -> None:
        routes = fileio.load_npy(layout.routes_file(self.order_dir, path))
        mine = np.flatnonzero(routes[:, 0] >= 0)
        if len(mine) == 0:
            return
        table = fileio.read_table(path, ["tokens", "domain"]).take(mine)
        units, keys = routes[mine, 0], routes[mine, 1]
        for unit in np.unique(units):
            rows = np.flatnonzero(units == unit)
            part = pa.table({"key": keys[rows], "tokens": table.column("tokens").take(rows),
                             "domain": table.column("domain").take(rows)}, schema=UNIT_SCHEMA)
            out.write_scratch(layout.unit_part_file(self.scratch, int(unit), path), part)


class PackUnitFn(PartitionFn):
    """(unit, first seq_id, sequences expected) → the unit's sequences in the shard parts,
    and its `PackStats` beside (`layout.pack_stats_file`).

    Args:
        scratch: the shards stage's scratch folder.
        seq_len / eos_id / pad_id / tail: packing options.
        total: sequences of the whole split (the permuted range).
        rows_per_shard: rows of every shard but the last.
        seed: the shuffle's seed.
    """

    def __init__(self, scratch: str, seq_len: int, eos_id: int, pad_id: int, tail: str, total: int,
                 rows_per_shard: int, seed: int):
        self.scratch, self.seq_len, self.eos_id, self.pad_id, self.tail = scratch, seq_len, eos_id, pad_id, tail
        self.total, self.rows_per_shard, self.seed = total, rows_per_shard, seed

    def key(self, element: tuple[int, int, int]) -> str:
        return layout.unit_name(element[0])

    def run(self, element: tuple[int, int, int], out: Commit) -> None:
        unit, first, expected = element
        offsets, values, domains = self._unit_tokens(unit)
        packer = SequencePacker(self.seq_len, self.eos_id, self.pad_id, self.tail, first_seq_id=first)
        sequences = []
        for i, domain in enumerate(domains):
            sequences.extend(packer.add(values[offsets[i]: offsets[i + 1]], domain))
        sequences.extend(packer.finish())
        del offsets, values, domains  # the unit's tokens now live in the sequences
        if len(sequences) != expected:
            raise RuntimeError(f"unit {unit} packed {len(sequences)} sequences, expected {expected}")
        if sequences:
            shard = permute(np.array([s.seq_id for s in sequences]), self.total, self.seed) // self.rows_per_shard
            for target in np.unique(shard):
                chosen = [sequences[i] for i in np.flatnonzero(shard == target)]
                data = table_to_ipc_bytes(sequences_to_table(chosen, self.seq_len), compression=None)
                out.write_bytes(layout.shard_part_file(self.scratch, int(target), unit), data)
        out.save_json(layout.pack_stats_file(self.scratch, unit), packer.stats.to_dict())
        out.count("sequences_packed", len(sequences))

    def _unit_tokens(self, unit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(offsets, token values, domains) of the unit's documents in key order, holding one
        copy of its tokens (the worker's memory is a few times a unit's tokens at most)."""
        table = fileio.read_tables(layout.unit_part_files(self.scratch, unit), schema=UNIT_SCHEMA)
        order = pc.sort_indices(table.column("key"))
        domains = table.column("domain").take(order).to_pylist()
        tokens = table.column("tokens").take(order)
        del table  # the parts as read
        tokens = tokens.combine_chunks() if tokens.num_chunks != 1 else tokens.chunk(0)
        # offsets index the whole child array (`values`), sliced or not
        return tokens.offsets.to_numpy(), tokens.values.to_numpy(zero_copy_only=False), domains


class AssembleShardFn(PartitionFn):
    """shard → the shard file (rows in the order of their places), written atomically, and
    its `ShardInfo` beside (`layout.shard_info_file`).

    Args:
        scratch: the shards stage's scratch folder.
        folder: the output folder of the split.
        total / rows_per_shard / seed: as for `PackUnitFn`.
    """

    def __init__(self, scratch: str, folder: str, total: int, rows_per_shard: int, seed: int):
        self.scratch, self.folder = scratch, folder
        self.total, self.rows_per_shard, self.seed = total, rows_per_shard, seed

    def run(self, shard: int, out: Commit) -> None:
        parts = layout.shard_part_files(self.scratch, shard)
        table = fileio.read_tables(parts)
        place = permute(table.column("seq_id").to_numpy(), self.total, self.seed)
        expected = min(self.rows_per_shard, self.total - shard * self.rows_per_shard)
        if table.num_rows != expected or (place // self.rows_per_shard != shard).any():
            raise RuntimeError(f"shard {shard} assembled {table.num_rows} rows, expected {expected}")
        table = table.take(pa.array(np.argsort(place, kind="stable")))
        data = table_to_ipc_bytes(table)
        name = shard_name(shard)
        out.write_bytes(fileio.join(self.folder, name), data)
        out.save_json(layout.shard_info_file(self.scratch, shard), ShardInfo.of(name, data, table.num_rows).__dict__)
