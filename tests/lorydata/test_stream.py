"""`ShardDataset` over a shard folder in a bucket (moto's S3 server on 127.0.0.1, reached
through pyarrow's S3 filesystem as AWS or MinIO would be): the same samples in the same
order as the local copy, exact resume, a bounded cache shared by workers, verified shards,
retried transient failures."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from torch.utils.data import DataLoader

from lorydata import remote
from lorydata.confine import OutsideFolderError
from lorydata.dataset import ShardDataset
from lorydata.errors import LoryDataError, ShardError
from lorydata.hashing import file_sha256
from lorydata.manifest import MANIFEST_NAME, Manifest
from lorydata.remote import parse_size, s3_filesystem
from lorydata.shard_cache import RemoteObject, ShardCache
from lorydata.verify import verify_folder
from tests.lorydata.shardkit import build_shards, make_documents

BATCH = 4


def upload_folder(s3, folder: Path, prefix: str) -> str:
    """Every file of a local shard folder under `prefix`; the folder's URL."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            s3.upload(path, f"{prefix}/{path.name}")
    return s3.url(prefix)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """14 shards of 5 rows (the last one shorter) of 32 tokens."""
    folder = tmp_path_factory.mktemp("corpus") / "train"
    build_shards(folder, make_documents(120), seq_len=32, rows_per_shard=5)
    return folder


@pytest.fixture(scope="module")
def url(s3, local) -> str:
    return upload_folder(s3, local, "corpus/train")


def stream(dataset, workers: int = 0, batches: int | None = None) -> list[tuple[int, int, tuple]]:
    """(position, seq_id, tokens) of every sample a DataLoader yields, in order."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=ShardDataset.collate)
    found = []
    for index, batch in enumerate(loader):
        if batches is not None and index == batches:
            break
        for position, seq_id, ids in zip(batch["position"], batch["seq_id"], batch["input_ids"], strict=True):
            found.append((int(position), int(seq_id), tuple(ids.tolist())))
    return found


def folder_listing(folder: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every file in the folder; a file renamed or evicted while it is listed is left out."""
    found = []
    for path in folder.iterdir() if folder.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            found.append((path.name, path.stat().st_size))
    return sorted(found)


def folder_bytes(folder: Path) -> int:
    return sum(size for _, size in folder_listing(folder))


class Flaky(pafs.FileSystemHandler):
    """The real S3 filesystem behind a handler that fails the first `fail` opens of a shard
    in each process (a connection error, or a connection that ends half-way through the
    object), and logs every open of a shard to `log` (one line each, shared by processes)."""

    def __init__(self, fail: int = 0, midway: bool = False, log: Path | None = None,
                 error: str = "AWS Error NETWORK_CONNECTION during GetObject operation: injected\nconnection reset"):
        self.fail, self.midway, self.log, self.error = fail, midway, log, error
        self._inner, self._pid = None, None

    def _fs(self) -> pafs.FileSystem:
        if self._pid != os.getpid():  # a fresh connection pool per process, as lory makes
            self._inner, self._pid = s3_filesystem(), os.getpid()
        return self._inner

    def open_input_file(self, path):
        if not path.endswith(".arrow"):
            return self._fs().open_input_file(path)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(path + "\n")
        if self.fail > 0:
            self.fail -= 1
            if not self.midway:
                raise OSError(self.error)
            data = self._fs().open_input_file(path).read()
            return pa.PythonFile(_Cut(data, len(data) // 2), mode="r")
        return self._fs().open_input_file(path)

    def get_type_name(self):
        return "flaky-s3"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self._fs().get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs().get_file_info(selector)

    def open_input_stream(self, path):
        return self._fs().open_input_stream(path)

    def _refuse(self, *args):
        raise OSError("read-only test filesystem")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _refuse
    move = copy_file = open_output_stream = open_append_stream = _refuse


class _Cut:
    """A readable file whose connection breaks after `cut` bytes."""

    def __init__(self, data: bytes, cut: int):
        self.data, self.cut, self.pos, self.closed = data, cut, 0, False

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.cut:
            raise OSError("AWS Error NETWORK_CONNECTION: connection reset by peer (injected)")
        n = len(self.data) - self.pos if n is None or n < 0 else n
        end = min(self.pos + n, self.cut)
        chunk, self.pos = self.data[self.pos : end], end
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: len(self.data) + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.closed = True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)


# ---- the stream ---------------------------------------------------------------------------
def test_two_workers_stream_the_local_samples_in_order(local, url, tmp_path):
    options = {"seed": 3, "batch_size": BATCH, "epochs": 2}
    want = stream(ShardDataset(local, **options), workers=2)
    got = stream(ShardDataset(url, cache_dir=tmp_path / "cache", **options), workers=2)
    assert got == want
    assert len(want) == 2 * Manifest.read(local).num_rows
    cached = {p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".arrow")}
    assert cached <= {f"{s.sha256}.arrow" for s in Manifest.read(local).shards}
    assert len(cached) == 6, "the default limit: 3 shards per worker (here all the same size but the last)"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]


def test_metadata_and_ranks_match_the_local_copy(local, url, tmp_path):
    for rank in range(2):
        options = {"seed": 1, "rank": rank, "world_size": 2, "epochs": 1, "with_metadata": True, "batch_size": BATCH}
        here, there = ShardDataset(local, **options), ShardDataset(url, cache_dir=tmp_path / "c", **options)
        assert np.array_equal(here._continued, there._continued)
        for a, b in zip(here, there, strict=True):
            assert {k: v for k, v in a.items() if k != "input_ids"} == {k: v for k, v in b.items() if k != "input_ids"}
            assert torch.equal(a["input_ids"], b["input_ids"])


def test_resume_from_a_position_gives_the_local_continuation(local, url, tmp_path):
    options = {"seed": 5, "batch_size": BATCH, "epochs": 2}
    want = stream(ShardDataset(local, **options), workers=2)
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", **options)
    first = stream(dataset, workers=2, batches=3)
    dataset.position = first[-1][0] + 1
    assert first + stream(dataset, workers=2) == want


def test_stateful_loader_resume_from_s3_equals_the_local_stream(local, url, tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    options = {"seed": 2, "batch_size": BATCH, "epochs": 2}
    want = [b["seq_id"].tolist() for b in DataLoader(ShardDataset(local, **options), batch_size=BATCH,
                                                      num_workers=2, collate_fn=ShardDataset.collate)]

    def loader():
        dataset = ShardDataset(url, cache_dir=tmp_path / "cache", **options)
        return StatefulDataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=ShardDataset.collate)

    first, got = loader(), []
    for batch in first:
        got.append(batch["seq_id"].tolist())
        if len(got) == 5:
            state = first.state_dict()
            break
    second = loader()
    second.load_state_dict(state)
    got += [b["seq_id"].tolist() for b in second]
    assert got == want


def test_the_next_shard_is_prefetched_in_the_background(local, url, tmp_path):
    cache = tmp_path / "cache"
    dataset = ShardDataset(url, cache_dir=cache, seed=8, epochs=1)
    shards = [dataset._shard_of(int(row)) for row in dataset.rank_order(0)]
    order = list(dict.fromkeys(shards))  # shards in the order the stream reads them
    stream_ = iter(dataset)
    next(stream_)
    names = [f"{dataset.manifest.shards[s].sha256}.arrow" for s in order]
    deadline = time.monotonic() + 30
    while not (cache / names[1]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (cache / names[0]).exists() and (cache / names[1]).exists(), "the next shard arrived before it was read"
    assert not any((cache / name).exists() for name in names[2:]), "only the next one"
    stream_.close()


@pytest.mark.parametrize(("workers", "batch_size", "world_size"), [(1, 1, 1), (2, 3, 1), (3, 2, 2), (2, 7, 1)])
def test_the_upcoming_shard_matches_a_naive_walk(local, workers, batch_size, world_size):
    dataset = ShardDataset(local, seed=9, batch_size=batch_size, world_size=world_size, epochs=2)
    end, spe = dataset.total_samples, dataset.samples_per_epoch

    def shard_at(position):
        return dataset._shard_of(int(dataset.rank_order(position // spe)[position % spe]))

    for worker in range(workers):
        mine = [p for p in range(end) if (p // batch_size) % workers == worker]
        for i, position in enumerate(mine):
            current = shard_at(position)
            naive = next((shard_at(p) for p in mine[i + 1 :] if shard_at(p) != current
                          and p < (position // spe + 2) * spe), None)
            got = dataset._upcoming_shard(position, current, 0, worker, workers, position // spe,
                                          dataset.rank_order(position // spe))
            assert got == naive, (worker, position)


# ---- the cache ----------------------------------------------------------------------------
def test_the_cache_folder_never_exceeds_its_limit(local, url, tmp_path):
    largest = max(s.bytes for s in Manifest.read(local).shards)
    limit = 3 * largest
    options = {"seed": 4, "batch_size": BATCH, "epochs": 2}
    want = stream(ShardDataset(local, **options))
    cache = tmp_path / "cache"
    dataset = ShardDataset(url, cache_dir=cache, cache_limit=limit, **options)
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=2, collate_fn=ShardDataset.collate)
    got, sizes, seen = [], [], set()
    for batch in loader:
        got += [int(s) for s in batch["seq_id"]]
        listing = folder_listing(cache)
        sizes.append((sum(size for _, size in listing), listing))
        seen |= {p.name for p in cache.iterdir() if p.name.endswith(".arrow")}
    assert got == [seq_id for _, seq_id, _ in want]
    most, listing = max(sizes)
    assert most <= limit, f"cache held {most} bytes, limit {limit}: {listing}"
    assert len(seen) > 3, "the stream went through more shards than the cache holds: it evicted"
    assert len([p for p in cache.iterdir() if p.name.endswith(".arrow")]) <= 3


def test_a_finished_download_is_published_under_the_folder_lock(tmp_path, monkeypatch):
    """A claim lists the folder under its lock; a part renamed meanwhile (outside the lock)
    was seen by name, gone at stat time and counted as neither part nor shard, letting the
    cache grow past its limit (a race seen with two workers)."""
    source = tmp_path / "shard.arrow"
    source.write_bytes(os.urandom(1000))
    obj = RemoteObject(url=str(source), path=str(source), sha256=file_sha256(source), size=1000)
    folder = tmp_path / "cache"
    cache = ShardCache(folder, limit=10_000, filesystem=pafs.LocalFileSystem())
    lock_states, real_replace = [], os.replace

    def replace_and_note_the_lock(src, dst):
        fd = os.open(folder / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_states.append("free")
        except BlockingIOError:
            lock_states.append("held")
        finally:
            os.close(fd)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_note_the_lock)
    assert cache.fetch(obj) == folder / obj.name
    assert lock_states == ["held"]
    assert (folder / obj.name).read_bytes() == source.read_bytes()


def test_workers_share_one_download_per_shard(local, s3, url, tmp_path):
    log = tmp_path / "opens.log"
    # A cache that holds every shard: with the default limit (3 shards per worker) a worker
    # that falls 6 shards behind the other finds a shard they share evicted, and fetching it
    # again is right; this test is about two workers never downloading one shard at once.
    everything = sum(s.bytes for s in Manifest.read(local).shards)
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", cache_limit=everything, seed=0, batch_size=BATCH,
                           epochs=1, filesystem=lambda: pafs.PyFileSystem(Flaky(log=log)))
    assert len(stream(dataset, workers=2)) == dataset.num_rows
    opened = log.read_text().split()
    shards = [f"{s3.bucket}/corpus/train/{s.file}" for s in dataset.manifest.shards]
    assert sorted(opened) == sorted(shards), "every shard was downloaded once, by one of the two workers"


def test_a_shard_with_a_flipped_byte_is_named_in_one_line(local, s3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(local, bad)
    entry = Manifest.read(bad).shards[2]
    data = bytearray((bad / entry.file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / entry.file).write_bytes(bytes(data))  # same size: only the sha256 tells
    url = upload_folder(s3, bad, "flipped/train")
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", shuffle=False, epochs=1)
    with pytest.raises(ShardError) as caught:
        list(dataset)
    message = str(caught.value)
    assert message == (f"{url}/{entry.file} does not match the manifest's sha256 (corrupted or replaced in the "
                       "bucket); refused")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(entry.sha256)], "nothing of it kept"
    loader = DataLoader(ShardDataset(url, cache_dir=tmp_path / "cache2", shuffle=False, epochs=1), num_workers=2,
                        batch_size=BATCH, collate_fn=ShardDataset.collate)
    with pytest.raises(ShardError, match=rf"{entry.file} does not match the manifest's sha256"):
        list(loader)


def test_verify_names_the_bad_shards_of_a_bucket_folder(local, s3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(local, bad)
    entries = Manifest.read(bad).shards
    (bad / entries[1].file).write_bytes((bad / entries[1].file).read_bytes()[:-7])  # truncated
    data = bytearray((bad / entries[4].file).read_bytes())
    data[-40] ^= 0x10
    (bad / entries[4].file).write_bytes(bytes(data))
    url = upload_folder(s3, bad, "verify/train")
    _, report = verify_folder(url, cache_dir=tmp_path / "cache")
    assert report.folder == url
    assert [c.file for c in report.failed] == [entries[1].file, entries[4].file]
    assert report.failed[0].error == (f"{url}/{entries[1].file} has {entries[1].bytes - 7} bytes, the manifest "
                                      f"says {entries[1].bytes} (corrupted or replaced in the bucket); refused")
    assert "does not match the manifest's sha256" in report.failed[1].error
    assert [c.rows for c in report.checks if c.ok] == [e.rows for i, e in enumerate(entries) if i not in (1, 4)]


def test_transient_failures_are_retried(local, url, tmp_path, fast_retries):
    want = stream(ShardDataset(local, seed=6, batch_size=BATCH, epochs=1))
    for midway in (False, True):
        handler = Flaky(fail=3, midway=midway)
        dataset = ShardDataset(url, cache_dir=tmp_path / f"cache-{midway}", seed=6, batch_size=BATCH, epochs=1,
                               filesystem=lambda handler=handler: pafs.PyFileSystem(handler))
        assert stream(dataset) == want
        assert handler.fail == 0, "the injected failures happened"
        cache = tmp_path / f"cache-{midway}"
        assert not [p for p in cache.iterdir() if p.name.endswith(".part")], "no partial download left behind"
        for path in cache.glob("*.arrow"):
            assert file_sha256(path) == path.name.removesuffix(".arrow")


def test_a_shard_that_keeps_failing_is_named_in_one_line(url, tmp_path, fast_retries):
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", shuffle=False, epochs=1,
                           filesystem=lambda: pafs.PyFileSystem(Flaky(fail=100)))
    with pytest.raises(ShardError) as caught:
        next(iter(dataset))
    first = dataset.manifest.shards[0].file
    assert str(caught.value) == (f"cannot fetch {url}/{first} after {remote.ATTEMPTS} attempt(s): AWS Error "
                                 "NETWORK_CONNECTION during GetObject operation: injected connection reset")


def test_access_denied_is_not_retried(url, tmp_path):
    handler = Flaky(fail=100, error="AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", shuffle=False, epochs=1,
                           filesystem=lambda: pafs.PyFileSystem(handler))
    with pytest.raises(ShardError, match=r"after 1 attempt\(s\): AWS Error ACCESS_DENIED during GetObject"):
        next(iter(dataset))
    assert handler.fail == 99


def test_missing_objects_and_bad_names_are_refused(local, s3, tmp_path):
    url = upload_folder(s3, local, "holey/train")
    gone = Manifest.read(local).shards[1].file
    s3.client.delete_object(Bucket=s3.bucket, Key=f"holey/train/{gone}")
    with pytest.raises(ShardError, match=rf"^shard missing: {url}/{gone}$"):
        ShardDataset(url, cache_dir=tmp_path / "cache")
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", check_files=False, shuffle=False, epochs=1)
    with pytest.raises(ShardError, match=rf"^shard missing: {url}/{gone}$"):
        list(dataset)
    with pytest.raises(ShardError, match=r"^no \.manifest\.json at s3://.*/nothing: not a finished lory shard folder$"):
        ShardDataset(s3.url("nothing"))
    manifest = Manifest.read(local)
    manifest.shards[0].file = "../outside.arrow"
    s3.client.put_object(Bucket=s3.bucket, Key=f"escape/train/{MANIFEST_NAME}", Body=manifest.to_bytes())
    with pytest.raises(OutsideFolderError, match=r"shard file '\.\./outside\.arrow' is not a plain relative name"):
        ShardDataset(s3.url("escape/train"))


def test_a_legacy_manifest_is_read_from_the_bucket(local, s3, tmp_path):
    for path in local.iterdir():
        key = "legacy/train/" + ("manifest.json" if path.name == MANIFEST_NAME else path.name)
        s3.upload(path, key)
    dataset = ShardDataset(s3.url("legacy/train"), cache_dir=tmp_path / "cache", shuffle=False, epochs=1)
    assert [s["seq_id"] for s in dataset] == [s["seq_id"] for s in ShardDataset(local, shuffle=False, epochs=1)]


def test_a_shard_larger_than_the_cache_limit_is_refused(url, tmp_path):
    dataset = ShardDataset(url, cache_dir=tmp_path / "cache", cache_limit=100, epochs=1)
    with pytest.raises(ShardError, match=r"has \d+ bytes, more than the cache limit of 100 bytes at .*; raise the "
                                         r"cache limit$"):
        next(iter(dataset))


def test_a_part_left_by_a_dead_downloader_is_replaced(local, url, tmp_path):
    entry = Manifest.read(local).shards[0]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{entry.sha256}.arrow.part").write_bytes(b"half a shard")  # nobody holds its lock
    dataset = ShardDataset(url, cache_dir=cache, shuffle=False, epochs=1)
    assert next(iter(dataset))["seq_id"] == next(iter(ShardDataset(local, shuffle=False, epochs=1)))["seq_id"]
    assert file_sha256(cache / f"{entry.sha256}.arrow") == entry.sha256
    assert not (cache / f"{entry.sha256}.arrow.part").exists()


def test_a_cached_shard_changed_on_disk_is_fetched_again(local, url, tmp_path):
    entry = Manifest.read(local).shards[0]
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / f"{entry.sha256}.arrow"
    data = bytearray((local / entry.file).read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))  # as if the disk rotted
    obj = RemoteObject(url=f"{url}/{entry.file}", path=f"{url.removeprefix('s3://')}/{entry.file}",
                       sha256=entry.sha256, size=entry.bytes)
    buffer = ShardCache(cache, 10 * entry.bytes, s3_filesystem()).open(obj)
    assert buffer.to_pybytes() == (local / entry.file).read_bytes()
    assert file_sha256(target) == entry.sha256


@pytest.mark.parametrize(("text", "size"), [("123", 123), ("2KB", 2000), ("1.5GiB", 3 * 2**29), ("10mb", 10**7),
                                            (4096, 4096)])
def test_cache_limits_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-5", "0", "12XB"])
def test_bad_cache_limits_are_refused(text):
    with pytest.raises(LoryDataError, match="cache limit"):
        parse_size(text)
