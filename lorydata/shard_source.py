"""Where a shard folder's bytes come from: a local folder, or a URL through the local cache.

`open_shards(folder)` reads the manifest and gives one object that every reader of shards
(`ShardDataset`, `verify_folder`, `continued_sequences`) asks for a shard's table, so the
same code reads a local folder and `s3://bucket/prefix/train`:

- `LocalShards` reads the files in place (as lory always has);
- `RemoteShards` fetches each shard into a `lorydata.shard_cache.ShardCache` (bounded,
  shared, verified against the manifest's sha256) and reads it from there; `prefetch`
  starts fetching the shard a reader will need next.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lorydata.errors import ShardError
from lorydata.manifest import Manifest, ShardInfo
from lorydata.remote import default_cache_dir, filesystem_for, is_url, join, one_line, parse_size
from lorydata.shard_cache import RemoteObject, ShardCache
from lorydata.shards import read_shard

SHARDS_PER_READER = 3  # default cache limit: the shard being read, the next one and one spare, per reader


class LocalShards:
    """A shard folder on local disk (or a mount).

    Args:
        folder: the folder.
        manifest: its manifest (read when not given).
    """

    remote = False

    def __init__(self, folder: str | Path, manifest: Manifest | None = None):
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.read(self.folder)

    def where(self, entry: ShardInfo) -> str:
        """The shard's location, for messages."""
        return str(self.folder / entry.file)

    def table(self, entry: ShardInfo) -> pa.Table:
        """The whole shard, schema checked (`lorydata.shards.read_shard`)."""
        return read_shard(self.folder / entry.file, self.manifest.seq_len)

    def prefetch(self, entry: ShardInfo) -> None:
        """Nothing to fetch: the file is here."""

    def check_files(self) -> None:
        """Raise `ShardError` unless every shard exists with the manifest's size."""
        for entry in self.manifest.shards:
            path = self.folder / entry.file
            if not path.is_file():
                raise ShardError(f"shard missing: {path}")
            if path.stat().st_size != entry.bytes:
                raise ShardError(f"shard {path} has {path.stat().st_size} bytes, manifest says {entry.bytes}")


class RemoteShards:
    """A shard folder behind a URL, read through a local cache.

    Args:
        url: `s3://bucket/prefix/train`, `gs://…` (`lorydata.remote`).
        cache_dir: the cache folder (default `lorydata.remote.default_cache_dir()`), shared
            by every process and every corpus that uses it.
        cache_limit: most bytes the cache folder holds (an int or "20GB"); default
            `SHARDS_PER_READER` times the largest shard per reading process (`readers`).
        filesystem: a function returning the pyarrow filesystem that serves the URL, called
            once in each process that reads (connections do not survive `fork`); default the
            filesystem of the URL's scheme, from the standard environment.
        manifest: the manifest, when already read.
    """

    remote = True

    def __init__(self, url: str, *, cache_dir: str | Path | None = None, cache_limit: int | str | None = None,
                 filesystem: Callable[[], pafs.FileSystem] | None = None, manifest: Manifest | None = None):
        self.folder = url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_limit = parse_size(cache_limit)
        self.readers = 1  # processes reading at once through this folder; sets the default limit
        self._factory = filesystem
        self._cache: ShardCache | None = None
        self._pid: int | None = None
        filesystem, self._root = self._filesystem()
        self.manifest = manifest or Manifest.read(self.folder, filesystem=filesystem)

    @property
    def limit(self) -> int:
        """The cache limit in bytes (given, or the default for `readers` processes)."""
        if self.cache_limit is not None:
            return self.cache_limit
        largest = max((s.bytes for s in self.manifest.shards), default=1)
        return SHARDS_PER_READER * max(1, self.readers) * largest

    def where(self, entry: ShardInfo) -> str:
        return join(self.folder, entry.file)

    def table(self, entry: ShardInfo) -> pa.Table:
        """The whole shard, fetched into the cache and verified first when it is not there."""
        obj = self._object(entry)
        return read_shard(self.cache().open(obj), self.manifest.seq_len, name=obj.url)

    def prefetch(self, entry: ShardInfo) -> None:
        """Start fetching `entry` into the cache in the background."""
        self.cache().prefetch(self._object(entry))

    def check_files(self) -> None:
        """Raise `ShardError` unless every shard exists with the manifest's size (one listing)."""
        filesystem, root = self.cache().filesystem, self._root
        nested = any("/" in entry.file for entry in self.manifest.shards)
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=nested, allow_not_found=True))
        except OSError as exc:
            raise ShardError(f"cannot list {self.folder}: {one_line(exc)}") from None
        sizes = {info.path[len(root) + 1 :]: info.size for info in infos if info.type == pafs.FileType.File}
        for entry in self.manifest.shards:
            size = sizes.get(entry.file)
            if size is None:
                raise ShardError(f"shard missing: {self.where(entry)}")
            if size != entry.bytes:
                raise ShardError(f"shard {self.where(entry)} has {size} bytes, manifest says {entry.bytes}")

    def cache(self) -> ShardCache:
        """This process's cache (made on first use in each process)."""
        if self._cache is None or self._pid != os.getpid():
            self._cache, self._pid = ShardCache(self.cache_dir, self.limit, self._filesystem()[0]), os.getpid()
        self._cache.limit = self.limit  # `readers` may have been set since
        return self._cache

    def close(self) -> None:
        """Stop this process's prefetching."""
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        return filesystem_for(self.folder, self._factory() if self._factory is not None else None)

    def _object(self, entry: ShardInfo) -> RemoteObject:
        return RemoteObject(url=self.where(entry), path=f"{self._root}/{entry.file}", sha256=entry.sha256, size=entry.bytes)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = state["_pid"] = None  # a process builds its own (threads and connections stay)
        return state


def open_shards(folder: str | Path, *, cache_dir: str | Path | None = None, cache_limit: int | str | None = None,
                filesystem: Callable[[], pafs.FileSystem] | None = None,
                manifest: Manifest | None = None) -> LocalShards | RemoteShards:
    """The shards of a local folder or of a folder's URL (see `RemoteShards` for the rest).

    Raises:
        ShardError: the manifest is missing or unreadable.
        LoryDataError: the URL's scheme has no filesystem, or `cache_limit` is not a size.
    """
    parse_size(cache_limit)  # a bad limit is refused for a local folder too
    if is_url(folder):
        return RemoteShards(str(folder), cache_dir=cache_dir, cache_limit=cache_limit, filesystem=filesystem,
                            manifest=manifest)
    return LocalShards(folder, manifest)
