"""A bounded local cache of shards fetched from a bucket, shared by every process that uses it.

MosaicML streaming's split: the corpus lives at a remote URL, a local folder caches what is
being read, and a size limit bounds that folder (least recently used files are evicted).
Every dataloader worker of every rank on a machine may share one cache folder; they read the
same shards in nearly the same order (ranks and workers interleave one stream), so each
shard is downloaded once per machine while it stays cached.

The folder holds, by content (the manifest's sha256), never by a name from the bucket:

- `<sha256>.arrow`: a complete shard whose bytes matched the manifest's sha256 when it was
  downloaded (and are checked again the first time each process uses it);
- `<sha256>.arrow.part`: a download in progress, created at the shard's full size, so the
  space is reserved before a byte arrives. Its downloader holds an `flock` on it; a part
  nobody holds is left by a process that died and is removed. A part is renamed to its
  final name only once complete and verified, so a partial download is never read;
- `.lock`: an `flock` taken for the bookkeeping (what is there, what to evict, what to
  reserve, and the rename that publishes a finished download), never while downloading.

The limit counts every complete and reserved file, so the folder never holds more than
`limit` bytes of shards (an evicted shard that a reader still has memory-mapped frees its
disk blocks when the reader lets go of it, as on any POSIX filesystem). Retries: a transient error (network, throttling, a short read) is
retried with exponential backoff; a shard that keeps failing, is missing, or does not match
its sha256 raises `ShardError` naming it, in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import mmap
import os
import queue
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lorydata import remote
from lorydata.errors import ShardError
from lorydata.remote import one_line

CHUNK_BYTES = 32 << 20  # one ranged GET per chunk: a shard of up to 32 MiB is one request
POLL_S = 0.05  # how often a reader waiting for another process's download looks again
WAIT_LIMIT_S = 600.0  # longest wait for another process's download or for free space
_NAME = re.compile(r"^[0-9a-f]{64}\.(arrow|json)(\.part)?$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteObject:
    """One object to cache.

    Args:
        url: its URL, for messages.
        path: its path inside the filesystem.
        sha256: the sha256 its bytes must have (from the manifest).
        size: its size in bytes (from the manifest).
        suffix: extension of the cached file.
    """

    url: str
    path: str
    sha256: str
    size: int
    suffix: str = ".arrow"

    @property
    def name(self) -> str:
        return f"{self.sha256}{self.suffix}"


class ShardCache:
    """The local cache of one process: fetches, verifies, evicts, prefetches.

    Make one per process (a filesystem's connections do not survive `fork`); processes share
    the folder safely through the locks described in the module docstring.

    Args:
        folder: the cache folder (created).
        limit: most bytes the folder holds.
        filesystem: serves the objects' paths.
    """

    def __init__(self, folder: str | Path, limit: int, filesystem: pafs.FileSystem):
        self.folder, self.limit, self.filesystem = Path(folder), int(limit), filesystem
        self.folder.mkdir(parents=True, exist_ok=True)
        self._verified: set[tuple[str, int]] = set()  # (name, inode) whose bytes this process checked
        self._queue: queue.Queue[RemoteObject | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- reading ------------------------------------------------------------------------
    def open(self, obj: RemoteObject) -> pa.Buffer:
        """The object's verified bytes, memory-mapped from the cache (downloaded first when
        absent). The buffer stays valid when the file is evicted afterwards."""
        if not _HEX.match(obj.sha256):
            raise ShardError(f"{obj.url}: the manifest's sha256 {obj.sha256!r} is not a sha256")
        for _ in range(remote.ATTEMPTS):
            path = self.fetch(obj)
            try:
                with open(path, "rb") as f:
                    inode, size = os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_size
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except FileNotFoundError:  # evicted by another process between fetch and open
                continue
            if size == obj.size and ((obj.name, inode) in self._verified or _sha256(data) == obj.sha256):
                self._verified.add((obj.name, inode))
                return pa.py_buffer(data)
            self._drop(path)  # changed on disk since it was verified: fetch it again
        raise ShardError(f"cannot keep {obj.url} in the cache at {self.folder}: it was evicted or changed "
                         f"{remote.ATTEMPTS} times before it could be read; raise the cache limit ({self.limit} bytes)")

    def fetch(self, obj: RemoteObject) -> Path:
        """The cached file of `obj`, downloaded (or waited for, when another process is
        downloading it) when absent. Marks it most recently used."""
        target = self.folder / obj.name
        waited = time.monotonic()
        while True:
            with self._locked():
                if _touch(target):
                    return target
                claim = self._claim(obj)
            if claim is not None:
                self._download(obj, *claim)
                return target
            if self._stopping.is_set() and threading.current_thread() is self._thread:
                raise _Stopped
            if time.monotonic() - waited > WAIT_LIMIT_S:
                raise ShardError(f"gave up waiting {WAIT_LIMIT_S:.0f}s for {obj.url}: the cache at {self.folder} "
                                 f"is full of downloads in progress (limit {self.limit} bytes)")
            time.sleep(POLL_S)

    def prefetch(self, obj: RemoteObject) -> None:
        """Fetch `obj` in a background thread (errors are left for the reader's own `open`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._prefetch_loop, name="lory-prefetch", daemon=True)
            self._thread.start()
            _running.add(self)
        self._queue.put(obj)

    def close(self) -> None:
        """Stop the prefetch thread once its current download ends."""
        if self._thread is not None:
            self._stopping.set()
            self._queue.put(None)
            self._thread.join(timeout=WAIT_LIMIT_S)
            self._thread = None
            self._stopping.clear()

    def _prefetch_loop(self) -> None:
        while (obj := self._queue.get()) is not None and not self._stopping.is_set():
            with contextlib.suppress(Exception):
                self.fetch(obj)

    # ---- bookkeeping (under the folder lock) --------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.folder / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _claim(self, obj: RemoteObject) -> tuple[int, Path] | None:
        """Reserve `obj`'s space and create its part file (locked by us), evicting the least
        recently used complete files as needed; None while another process downloads it or
        while downloads in progress hold the space it needs."""
        part = self.folder / f"{obj.name}.part"
        if part.exists():
            if _held(part):
                return None
            part.unlink(missing_ok=True)  # its downloader died
        if obj.size > self.limit:
            raise ShardError(f"{obj.url} has {obj.size} bytes, more than the cache limit of {self.limit} bytes "
                             f"at {self.folder}; raise the cache limit")
        files = self._files()
        used = sum(size for _, size, _ in files)
        complete = sorted((mtime, path, size) for path, size, mtime in files if not path.name.endswith(".part"))
        for _, path, size in complete:  # least recently used first
            if used + obj.size <= self.limit:
                break
            path.unlink(missing_ok=True)
            used -= size
        if used + obj.size > self.limit:
            return None
        fd = os.open(part, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, obj.size)  # the reservation: the file counts at its full size at once
        return fd, part

    def _files(self) -> list[tuple[Path, int, int]]:
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if _NAME.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        found.append((Path(entry.path), stat.st_size, stat.st_mtime_ns))
        return found

    def _drop(self, path: Path) -> None:
        with self._locked():
            path.unlink(missing_ok=True)

    # ---- downloading (outside the lock) -------------------------------------------------
    def _download(self, obj: RemoteObject, fd: int, part: Path) -> None:
        done = False
        try:
            for attempt in range(1, remote.ATTEMPTS + 1):
                try:
                    digest = self._copy(obj, fd)
                except FileNotFoundError:
                    raise ShardError(f"shard missing: {obj.url}") from None
                except OSError as exc:  # network, throttling, a short read: try again
                    if attempt == remote.ATTEMPTS or remote.permanent(exc):
                        raise ShardError(f"cannot fetch {obj.url} after {attempt} attempt(s): {one_line(exc)}") from None
                    remote.pause(attempt)
                    continue
                if digest != obj.sha256:
                    raise ShardError(f"{obj.url} does not match the manifest's sha256 (corrupted or replaced in the "
                                     "bucket); refused")
                # renamed under the folder lock: a claim listing the folder meanwhile would see
                # the part's name, fail to stat it and count the shard as neither part nor file
                with self._locked():
                    os.replace(part, self.folder / obj.name)
                self._verified.add((obj.name, os.fstat(fd).st_ino))
                done = True
                return
        finally:
            if not done:
                part.unlink(missing_ok=True)  # still ours: we hold its lock
            os.close(fd)

    def _copy(self, obj: RemoteObject, fd: int) -> str:
        """Write the object into `fd` from its start; its sha256."""
        digest, written = hashlib.sha256(), 0
        os.lseek(fd, 0, os.SEEK_SET)
        with self.filesystem.open_input_file(obj.path) as source:
            size = source.size()
            if size != obj.size:
                raise ShardError(f"{obj.url} has {size} bytes, the manifest says {obj.size} (corrupted or replaced in "
                                 "the bucket); refused")
            while written < obj.size:
                chunk = source.read(min(CHUNK_BYTES, obj.size - written))
                if not chunk:
                    raise OSError(f"connection ended after {written} of {obj.size} bytes")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                written += len(chunk)
        return digest.hexdigest()


class _Stopped(Exception):
    """The prefetch thread was told to stop while it waited."""


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _touch(path: Path) -> bool:
    """Mark `path` most recently used; False when it is not there."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _held(part: Path) -> bool:
    """Whether a live process holds the lock of a part file."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# Prefetch threads end before the interpreter does: pyarrow finalises its S3 client at exit
# (an atexit hook registered when pyarrow.fs was imported, so it runs after this one), and a
# download still running then would crash the process.
_running: weakref.WeakSet[ShardCache] = weakref.WeakSet()


@atexit.register
def _stop_prefetching() -> None:
    for cache in list(_running):
        cache.close()
