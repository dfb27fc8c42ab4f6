"""Last stage: pack one split unit by unit, spread the sequences over shuffled shards, write
the shards and the manifest. Three Beam steps, everything between them in files:

1. **route** (`RouteTokensFn`, per bucket): each document's tokens and domain to the files
   of its unit, `units/u<unit>/b<bucket>.parquet`, with its key (the routes of the order
   stage).
2. **pack** (`PackUnitFn`, per unit): the unit's documents in key order, packed into
   sequences numbered from the unit's first `seq_id` (known in advance from the units'
   token counts); the tail of the unit is dropped or padded per `--tail`. Sequence `seq_id`
   goes to place `permute(seq_id)` of a seeded permutation of all sequences of the split,
   i.e. to shard `place // rows_per_shard`: written to `parts/s<shard>/u<unit>.arrow`.
3. **assemble** (`AssembleShardFn`, per shard): the shard's parts, rows in place order,
   written atomically as a zstd Arrow shard; its `ShardInfo` beside.

So every shard is a uniform sample of the whole split, as with one global shuffle, while
a worker holds one unit's tokens (about `split_data.UNIT_TOKENS`, or one k-means cell) or
one shard. The driver reads the per-unit and per-shard results and writes the manifest.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pyarrow as pa

from lorydata.manifest import Manifest, ShardInfo
from lorydata.pack import PackStats, SequencePacker
from lorydata.shards import sequences_to_table, shard_name, table_to_ipc_bytes
from lorydata.shuffle import permute
from lorydata.tokenizer import Tokenizer
from pipelines import fileio
from pipelines.documents_stage import bucket_files
from pipelines.options import BuildOptions
from pipelines.split_data import UNITS, routes_file
from pipelines.transforms import count, run_steps

SCRATCH = "_scratch"
UNIT_SCHEMA = pa.schema([("key", pa.int64()), ("tokens", pa.list_(pa.int32())), ("domain", pa.string())])


def unit_name(unit: int) -> str:
    return f"u{unit:06d}"


def sequences_per_unit(tokens: np.ndarray, seq_len: int, tail: str) -> np.ndarray:
    """Sequences that packing a unit of `tokens` tokens (EOS included) yields."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens // seq_len + ((tokens % seq_len > 0) if tail == "pad" else 0)


class RouteTokensFn(beam.DoFn):
    """documents file → its split's documents in their units' files.

    Args:
        order_dir: the finished order stage folder (routes).
        scratch: the shards stage's scratch folder.
    """

    def __init__(self, order_dir: str, scratch: str):
        self.order_dir, self.scratch = order_dir, scratch

    def process(self, path: str):
        routes = fileio.load_npy(routes_file(self.order_dir, path))
        mine = np.flatnonzero(routes[:, 0] >= 0)
        if len(mine) == 0:
            return
        table = fileio.read_table(path, ["tokens", "domain"]).take(mine)
        units, keys = routes[mine, 0], routes[mine, 1]
        bucket = fileio.stem(path)
        for unit in np.unique(units):
            rows = np.flatnonzero(units == unit)
            part = pa.table({"key": keys[rows], "tokens": table.column("tokens").take(rows),
                             "domain": table.column("domain").take(rows)}, schema=UNIT_SCHEMA)
            fileio.write_table(fileio.join(self.scratch, "units", unit_name(int(unit)), f"{bucket}.parquet"), part)
        yield len(mine)


class PackUnitFn(beam.DoFn):
    """(unit, first seq_id, sequences expected) → the unit's sequences in the shard parts,
    and its `PackStats` in `packstats/u<unit>.json`.

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

    def process(self, element: tuple[int, int, int], after=None):
        unit, first, expected = element
        parts = fileio.match(fileio.join(self.scratch, "units", unit_name(unit), "*.parquet"))
        table = fileio.read_tables(parts, schema=UNIT_SCHEMA).sort_by("key")
        tokens = table.column("tokens").combine_chunks()
        offsets = tokens.offsets.to_numpy()
        values = tokens.values.to_numpy(zero_copy_only=False)
        domains = table.column("domain").to_pylist()
        packer = SequencePacker(self.seq_len, self.eos_id, self.pad_id, self.tail, first_seq_id=first)
        sequences = []
        for i, domain in enumerate(domains):
            sequences.extend(packer.add(values[offsets[i]: offsets[i + 1]], domain))
        sequences.extend(packer.finish())
        if len(sequences) != expected:
            raise RuntimeError(f"unit {unit} packed {len(sequences)} sequences, expected {expected}")
        if sequences:
            shard = permute(np.array([s.seq_id for s in sequences]), self.total, self.seed) // self.rows_per_shard
            for target in np.unique(shard):
                chosen = [sequences[i] for i in np.flatnonzero(shard == target)]
                data = table_to_ipc_bytes(sequences_to_table(chosen, self.seq_len), compression=None)
                fileio.write_bytes(fileio.join(self.scratch, "parts", f"s{target:05d}", f"{unit_name(unit)}.arrow"),
                                   data)
        fileio.save_json(fileio.join(self.scratch, "packstats", f"{unit_name(unit)}.json"), packer.stats.to_dict())
        count("sequences_packed", len(sequences))
        yield unit


class AssembleShardFn(beam.DoFn):
    """shard → the shard file (rows in the order of their places), written atomically, and
    its `ShardInfo` in `shardinfo/s<shard>.json`.

    Args:
        scratch: the shards stage's scratch folder.
        folder: the output folder of the split.
        total / rows_per_shard / seed: as for `PackUnitFn`.
    """

    def __init__(self, scratch: str, folder: str, total: int, rows_per_shard: int, seed: int):
        self.scratch, self.folder = scratch, folder
        self.total, self.rows_per_shard, self.seed = total, rows_per_shard, seed

    def process(self, shard: int, after=None):
        parts = fileio.match(fileio.join(self.scratch, "parts", f"s{shard:05d}", "*.arrow"))
        tables = [pa.ipc.open_file(pa.BufferReader(fileio.read_bytes(p))).read_all() for p in parts]
        table = pa.concat_tables(tables)
        place = permute(table.column("seq_id").to_numpy(), self.total, self.seed)
        expected = min(self.rows_per_shard, self.total - shard * self.rows_per_shard)
        if table.num_rows != expected or (place // self.rows_per_shard != shard).any():
            raise RuntimeError(f"shard {shard} assembled {table.num_rows} rows, expected {expected}")
        table = table.take(pa.array(np.argsort(place, kind="stable")))
        data = table_to_ipc_bytes(table)
        name = shard_name(shard)
        fileio.write_bytes(fileio.join(self.folder, name), data)
        info = ShardInfo.of(name, data, table.num_rows)
        fileio.save_json(fileio.join(self.scratch, "shardinfo", f"s{shard:05d}.json"), info.__dict__)
        yield shard


def write_split_shards(options: BuildOptions, tokenizer: Tokenizer, documents_dir, order_dir, folder, split: str,
                       manifest_fields: dict) -> Manifest:
    """Pack the split unit by unit, write shuffled shards and the manifest into `folder`.

    Args:
        options: build options (seq_len, tail, rows_per_shard, seed, runner).
        tokenizer: supplies EOS / pad ids and the identity recorded in the manifest.
        documents_dir: the finished documents stage folder.
        order_dir: the finished order stage folder of the split (routes, `units.npy`).
        folder: output folder (the shards stage's temp folder).
        split: "train" or "heldout".
        manifest_fields: extra manifest fields (counts, order, embedder, index, options).
    """
    folder, order_dir = str(folder), str(order_dir)
    scratch = fileio.join(folder, SCRATCH)
    units = fileio.load_npy(fileio.join(order_dir, UNITS))
    per_unit = sequences_per_unit(units[:, 1], options.seq_len, options.tail)
    first = np.cumsum(per_unit) - per_unit
    total = int(per_unit.sum())
    rows = options.rows_per_shard
    files = bucket_files(str(documents_dir))
    work = [(int(u), int(first[u]), int(per_unit[u])) for u in np.flatnonzero(units[:, 0] > 0)]
    # Largest units first, so the longest task is not the last one a worker picks up.
    work.sort(key=lambda e: -units[e[0], 1])
    shard_count = math.ceil(total / rows)
    run_steps(options, [
        ("Route", files, RouteTokensFn(order_dir, scratch)),
        ("Pack", work, PackUnitFn(scratch, options.seq_len, tokenizer.eos_id, tokenizer.pad_id, options.tail, total,
                                  rows, options.seed)),
        ("Assemble", list(range(shard_count)), AssembleShardFn(scratch, folder, total, rows, options.seed)),
    ])
    shards = [ShardInfo(**fileio.load_json(fileio.join(scratch, "shardinfo", f"s{s:05d}.json")))
              for s in range(shard_count)]
    stats = PackStats()
    for path in fileio.match(fileio.join(scratch, "packstats", "*.json")):
        for name, value in fileio.load_json(path).items():
            setattr(stats, name, getattr(stats, name) + value)
    fileio.delete_tree(scratch)
    counts = dict(manifest_fields.pop("counts", {}))
    counts.update({"documents": int(units[:, 0].sum()), "sequences": stats.sequences, "tokens": stats.tokens,
                   "continued_documents": stats.continued_documents, "packing_units": len(units),
                   "tail_tokens_dropped": stats.tail_tokens_dropped, "pad_tokens": stats.pad_tokens})
    manifest = Manifest(seq_len=options.seq_len, tokenizer=tokenizer.identity().to_dict(), shards=shards,
                        counts=counts, split=split, **manifest_fields)
    manifest.write(folder)
    return manifest
