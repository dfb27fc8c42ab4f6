"""`ShardDataset`: a PyTorch IterableDataset over a lory shard folder, for any model.

The sample stream is a pure function of (seed, epoch, rank, world size), so a run can
stop anywhere and resume at the exact next sample from one integer, `position`.

Order: every epoch permutes the shard order and, inside each shard, the rows (both seeded
by (seed, epoch)). Reading shard by shard keeps I/O sequential and decompression to one
shard at a time, and the writer already shuffled sequences globally, so this two-level
permutation mixes as well as a global one. Rank r of W takes every W-th sample of the
epoch stream; with `even=True` each rank takes the same number (the remainder is skipped
that epoch), which DDP needs so that ranks run the same number of steps.

Dataloader workers take the rank's stream in blocks of `batch_size` round-robin, which is
exactly the order in which a `DataLoader(batch_size=batch_size, num_workers=n)` hands out
batches, so the loader's output order equals the rank's stream order for any number of
workers. Every sample carries its `position`; after consuming a batch, the next position
is `max(batch["position"]) + 1` (`ShardDataset.next_position(batch)`).

Saving the position, three ways that are exact:

- torchdata's `StatefulDataLoader`: `loader.state_dict()` / `loader.load_state_dict()`, any
  `num_workers`. The loader asks every worker's copy of the dataset for its state after each
  batch it yields (`state_dict()` in a worker records that worker's own next position) and
  hands each copy its state back on resume.
- a plain `DataLoader` with `num_workers=0`: `dataset.state_dict()` after a batch.
- a plain `DataLoader` with workers: the workers' copies advance, not this object, so
  `dataset.state_dict()` raises `LoryDataError` once workers have read from it; pass the
  position of the last consumed batch, `dataset.state_dict(position=ShardDataset.next_position(batch))`,
  or assign `dataset.position` first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lorydata.continuation import continued_sequences
from lorydata.errors import LoryDataError, MismatchError, ShardError
from lorydata.shard_source import open_shards
from lorydata.token_ids import check_token_ids


class ShardDataset(IterableDataset):
    """Deterministic, resumable, rank- and worker-sharded stream of training sequences.

    Args:
        folder: a shard folder with `.manifest.json`, or its URL (`s3://bucket/prefix/train`).
        seed: seed of the per-epoch permutations.
        rank: data-parallel rank; defaults to torch.distributed's when initialised, else 0.
        world_size: data-parallel size; defaults like `rank`.
        shuffle: permute per epoch; off streams rows in manifest order.
        epochs: number of epochs to stream, or None for an endless stream.
        even: give every rank the same number of samples per epoch (drops < world_size
            samples per epoch); off gives ranks disjoint parts whose union is every row.
        batch_size: block size of the split across dataloader workers: pass the
            DataLoader's batch_size so that its output keeps the stream order.
        expected_seq_len: raise `MismatchError` unless the shards have this seq_len.
        expected_tokenizer: raise `MismatchError` unless the shards were made by the
            tokenizer with this sha256 (a string or any object with a `sha256` attribute).
        with_metadata: also yield `doc_starts`, `domains` and `continues` (whether the first piece
            continues a document of the previous sequence, `lorydata.continuation`; costs one
            read of every shard when the dataset is made). Use `collate` to batch them.
        check_files: check that every shard exists with the manifest's size before starting
            (cheap: one listing for a URL; full sha256 verification of a local folder is
            `lory inspect`'s job, while shards fetched from a URL are verified as they come).
        cache_shards: decompressed shards each worker keeps in memory.
        cache_dir: for a URL, the local cache folder (default `~/.cache/lory/shards`, or
            `$XDG_CACHE_HOME/lory/shards`), shared by every worker and process using it.
        cache_limit: for a URL, most bytes in the cache folder (int, or a size such as
            "20GB"); default 3 times the largest shard per reading process.
        filesystem: for a URL, a function returning the `pyarrow.fs` filesystem to read it
            with, called once in each reading process; default the URL scheme's own, set up
            from the standard environment (`lorydata.remote`).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        epochs: int | None = None,
        even: bool = True,
        batch_size: int = 1,
        expected_seq_len: int | None = None,
        expected_tokenizer=None,
        with_metadata: bool = False,
        check_files: bool = True,
        cache_shards: int = 2,
        cache_dir: str | Path | None = None,
        cache_limit: int | str | None = None,
        filesystem: Callable[[], pafs.FileSystem] | None = None,
    ):
        super().__init__()
        self.shards = open_shards(folder, cache_dir=cache_dir, cache_limit=cache_limit, filesystem=filesystem)
        self.folder = self.shards.folder
        self.manifest = self.shards.manifest
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if ready else 1)
        if not 0 <= rank < world_size:
            raise LoryDataError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise LoryDataError(f"batch_size must be positive, got {batch_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.epochs, self.even, self.batch_size = shuffle, epochs, even, batch_size
        self.with_metadata, self.cache_shards = with_metadata, cache_shards
        self.seq_len = self.manifest.seq_len
        self._check_expectations(expected_seq_len, expected_tokenizer)
        if check_files:
            self.shards.check_files()
        self._rows = np.array([s.rows for s in self.manifest.shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)])
        self.num_rows = int(self._offsets[-1])
        if self.num_rows == 0:
            raise ShardError(f"{self.folder} holds no sequences")
        self.samples_per_epoch = self._local_count()
        if self.samples_per_epoch == 0:
            raise ShardError(f"{self.folder} has {self.num_rows} sequences, fewer than world size {world_size}")
        self._continued = None
        if with_metadata:
            self._continued = continued_sequences(self.folder, self.manifest, read=self.shards.table)
        # Which setting of `position` dataloader workers have read on from. Every setting
        # starts a generation; a worker copies the generation with the dataset and, when it
        # starts reading, marks that generation stale in shared memory, which this object sees.
        # A position set after the workers were made is a new generation, so a late-starting
        # worker cannot make it stale.
        self._generation = 0
        self._stale_generation = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        # Workers split the stream in blocks counted from where the stream started: a fresh
        # stream starts at `position`, a worker restored by StatefulDataLoader inside its old one.
        self._resume_origin: int | None = None
        self._stream_origin = 0
        self._position = 0

    @property
    def position(self) -> int:
        """The next sample this object streams (see the module docstring for workers)."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        """Resume at `value`: a fresh stream starts there, and this object's position is known again."""
        self._position, self._resume_origin = int(value), None
        if get_worker_info() is None:
            self._generation += 1

    # ---- checks -------------------------------------------------------------------------
    def _check_expectations(self, seq_len: int | None, tokenizer) -> None:
        if seq_len is not None and seq_len != self.seq_len:
            raise MismatchError(
                f"{self.folder} holds sequences of {self.seq_len} tokens, but {seq_len} were expected"
            )
        if tokenizer is not None:
            want = tokenizer if isinstance(tokenizer, str) else tokenizer.sha256
            have = self.manifest.tokenizer.get("sha256")
            if want != have:
                raise MismatchError(
                    f"{self.folder} was tokenized with tokenizer sha256 {str(have)[:12]}… "
                    f"(vocab {self.manifest.tokenizer.get('vocab_size')}), but the consumer uses {want[:12]}…"
                )

    # ---- the stream ---------------------------------------------------------------------
    def _local_count(self) -> int:
        if self.even:
            return self.num_rows // self.world_size
        return len(range(self.rank, self.num_rows, self.world_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row ids of one epoch's stream (all ranks), in order."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for shard in rng.permutation(len(self._rows)):
            parts.append(self._offsets[shard] + rng.permutation(self._rows[shard]))
        return np.concatenate(parts)

    def rank_order(self, epoch: int) -> np.ndarray:
        """Global row ids this rank reads in `epoch`, in order."""
        return self.epoch_order(epoch)[self.rank :: self.world_size][: self.samples_per_epoch]

    @property
    def total_samples(self) -> int | None:
        """Samples this rank streams in all, or None for an endless stream."""
        return None if self.epochs is None else self.epochs * self.samples_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            self._stale_generation.clamp_(min=self._generation)
        else:  # read in this process: its own position is where the reader stands
            self._generation += 1
        origin = self._resume_origin if self._resume_origin is not None else self._position
        self._resume_origin, self._stream_origin = None, origin
        end = self.total_samples
        cache: OrderedDict[int, dict] = OrderedDict()
        epoch, order = -1, None
        position = self._position
        current = None  # the shard of the last sample, to prefetch the next one when it changes
        if self.shards.remote:
            self.shards.readers = workers
        try:
            while end is None or position < end:
                block = (position - origin) // self.batch_size
                if block % workers != worker:  # another worker's block: jump to our next one
                    position = origin + (block + (worker - block) % workers) * self.batch_size
                    self._position = position
                    continue
                if position // self.samples_per_epoch != epoch:
                    epoch = position // self.samples_per_epoch
                    order = self.rank_order(epoch)
                row = int(order[position % self.samples_per_epoch])
                sample = self._sample(row, cache)
                shard = self._shard_of(row)
                if self.shards.remote and shard != current:
                    current = shard
                    upcoming = self._upcoming_shard(position, shard, origin, worker, workers, epoch, order)
                    if upcoming is not None and upcoming not in cache:
                        self.shards.prefetch(self.manifest.shards[upcoming])
                sample["position"] = position
                position += 1
                self._position = position
                yield sample
        finally:
            if self.shards.remote:
                self.shards.close()

    def _shard_of(self, row: int) -> int:
        return int(np.searchsorted(self._offsets, row, side="right") - 1)

    def _upcoming_shard(self, position: int, current: int, origin: int, worker: int, workers: int, epoch: int,
                        order: np.ndarray) -> int | None:
        """The first shard other than `current` that this worker's stream reads after
        `position`, looking into the next epoch at most; None when the stream ends first."""
        end = self.total_samples
        stop = (epoch + 2) * self.samples_per_epoch if end is None else min(end, (epoch + 2) * self.samples_per_epoch)
        # Shards are contiguous in an epoch's order, so the next one is near: look in a short
        # window first and only then through the rest.
        window = 4 * (int(self._rows.max()) + workers * self.batch_size)
        start = position + 1
        middle = min(stop, start + window)
        for lo, hi in ((start, middle), (middle, stop)):
            while lo < hi:  # one epoch at a time
                part_epoch = lo // self.samples_per_epoch
                part_end = min(hi, (part_epoch + 1) * self.samples_per_epoch)
                positions = np.arange(lo, part_end)
                positions = positions[((positions - origin) // self.batch_size) % workers == worker]
                rows = (order if part_epoch == epoch else self.rank_order(part_epoch))[positions % self.samples_per_epoch]
                shards = np.searchsorted(self._offsets, rows, side="right") - 1
                later = np.flatnonzero(shards != current)
                if later.size:
                    return int(shards[later[0]])
                lo = part_end
        return None

    def _sample(self, row: int, cache: OrderedDict) -> dict:
        shard = self._shard_of(row)
        if shard not in cache:
            cache[shard] = self._load(shard)
            while len(cache) > self.cache_shards:
                cache.popitem(last=False)
        cache.move_to_end(shard)
        data, local = cache[shard], row - int(self._offsets[shard])
        sample = {
            "input_ids": torch.from_numpy(data["input_ids"][local].astype(np.int64)),
            "seq_id": int(data["seq_id"][local]),
        }
        if self.with_metadata:
            sample["doc_starts"] = data["doc_starts"][local].as_py()
            sample["domains"] = data["domains"][local].as_py()
            sample["continues"] = bool(self._continued[sample["seq_id"]])
        return sample

    def _load(self, shard: int) -> dict:
        entry = self.manifest.shards[shard]
        table = self.shards.table(entry)
        if table.num_rows != entry.rows:
            raise ShardError(f"shard {entry.file} has {table.num_rows} rows, manifest says {entry.rows}")
        flat = table.column("input_ids").combine_chunks().values.to_numpy()
        check_token_ids(flat, self.manifest, self.shards.where(entry))  # a bad id would crash deep in the embedding
        return {
            "input_ids": flat.reshape(-1, self.seq_len),
            "seq_id": table.column("seq_id").to_numpy(),
            "doc_starts": table.column("doc_starts").combine_chunks(),
            "domains": table.column("domains").combine_chunks(),
        }

    # ---- resumption ---------------------------------------------------------------------
    def state_dict(self, position: int | None = None) -> dict:
        """The data position, with what it depends on. Save it with the checkpoint.

        Args:
            position: the position to record instead of this object's own, e.g.
                `ShardDataset.next_position(batch)` after a plain multi-worker DataLoader.

        Raises:
            LoryDataError: dataloader workers have read copies of this dataset since its
                position was last set, so its own position is not where the loader stands.
        """
        info = get_worker_info()
        if position is None and info is None and int(self._stale_generation.item()) >= self._generation:
            raise LoryDataError(
                "ShardDataset.state_dict(): DataLoader workers read this dataset, so its own position is stale. "
                "Save the loader's state with torchdata's StatefulDataLoader (loader.state_dict()), or pass "
                "position=ShardDataset.next_position(last_batch)"
            )
        state = {
            "position": self._position if position is None else int(position),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
            "shuffle": self.shuffle,
            "even": self.even,
            "batch_size": self.batch_size,
        }
        if info is not None and position is None:  # a worker's copy, asked by StatefulDataLoader
            origin = self._resume_origin if self._resume_origin is not None else self._stream_origin
            state.update(origin=origin, worker=info.id, num_workers=info.num_workers)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["position"]`; refuses a state from a different stream.

        A state saved by a dataloader worker (StatefulDataLoader) is only accepted by the same
        worker of a loader with as many workers.
        """
        for key in ("seed", "world_size", "num_rows", "shuffle", "even"):
            if key in state and state[key] != getattr(self, key):
                raise MismatchError(
                    f"cannot resume data position: saved {key}={state[key]!r}, dataset has {getattr(self, key)!r}"
                )
        if "worker" in state:
            info = get_worker_info()
            here = (info.id, info.num_workers) if info is not None else None
            if here != (state["worker"], state["num_workers"]):
                raise MismatchError(
                    f"this data state belongs to dataloader worker {state['worker']} of {state['num_workers']}: "
                    "restore it with StatefulDataLoader.load_state_dict on a loader with as many workers"
                )
            if state.get("batch_size", self.batch_size) != self.batch_size:
                raise MismatchError(f"cannot resume data position: saved batch_size={state['batch_size']}, "
                                    f"dataset has {self.batch_size}")
        self.position = int(state["position"])
        if "worker" in state:
            self._resume_origin = int(state["origin"])

    @staticmethod
    def next_position(batch: dict) -> int:
        """The position to resume from after consuming `batch` (DataLoader output)."""
        return int(torch.as_tensor(batch["position"]).max()) + 1

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Batch samples: stacks tensors, keeps `doc_starts` and `domains` as lists."""
        batch = {
            "input_ids": torch.stack([s["input_ids"] for s in samples]),
            "seq_id": torch.tensor([s["seq_id"] for s in samples]),
            "position": torch.tensor([s["position"] for s in samples]),
        }
        if "continues" in samples[0]:
            batch["continues"] = torch.tensor([s["continues"] for s in samples])
        for key in ("doc_starts", "domains"):
            if key in samples[0]:
                batch[key] = [s[key] for s in samples]
        return batch
