"""One writer per output folder: an exclusive lock file naming its owner.

`FolderLock(folder).acquire()` creates `folder/lory.lock` with `O_CREAT | O_EXCL` (atomic on a
local filesystem), holding the owner's host, pid, process start time and command. A second
writer finds the file and stops at once with one line naming the owner. A lock is stale, and
is taken over, when its owner

- ran on this host (same hostname and pid namespace) and is no longer running (the pid is
  gone, or now belongs to a process started later), or
- ran elsewhere and has not refreshed the lock for `stale_after` seconds: a holder touches
  its lock every `heartbeat` seconds from a daemon thread, so a job killed on one node can be
  requeued on another without deleting anything by hand.

Taking over happens under an `flock` of the folder, re-reading the lock first, so two
processes that both find the same stale lock cannot both win. The lock is released (removed)
by `release()` or leaving the `with` block; a process killed hard leaves a stale lock behind,
which the next writer takes over as above.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lorydata.errors import LoryDataError

LOCK_NAME = "lory.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class FolderLockedError(LoryDataError):
    """Another process writes the folder (or its lock file cannot be read)."""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5); the name may hold spaces


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _running(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_ticks(pid)
    return started is None or now is None or now == started  # a later start: the pid was reused


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock (the lock file's JSON).

    Args:
        host: hostname of the owner.
        pid: its process id.
        started: its start time in clock ticks since boot (tells a reused pid apart).
        pid_namespace: its pid namespace (containers on one host have their own).
        command: what it runs, for the message.
        since: when it took the lock (ISO 8601, UTC).
        token: unique per acquisition, so a holder only ever removes its own lock.
    """

    host: str
    pid: int
    started: int | None
    pid_namespace: str
    command: str
    since: str
    token: str

    @classmethod
    def me(cls, command: str) -> LockOwner:
        return cls(socket.gethostname(), os.getpid(), _start_ticks(os.getpid()), _pid_namespace(), command,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner a lock file names, or None when it is not a lock file's JSON."""
        try:
            data = json.loads(text)
            owner = cls(str(data["host"]), data["pid"], data.get("started"), str(data.get("pid_namespace", "")),
                        str(data.get("command", "?"))[:200], str(data.get("since", "?")), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return None
        ints = [owner.pid] + ([] if owner.started is None else [owner.started])
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in ints):
            return None  # os.kill(0 or -1, ...) would address whole process groups
        return owner

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.since})"

    def local(self) -> bool:
        """Whether this process can look the owner's pid up (same host and pid namespace)."""
        return self.host == socket.gethostname() and self.pid_namespace == _pid_namespace()


def owner_is_gone(owner: LockOwner) -> bool:
    """Whether the owner of a lock ran on this host and is no longer running (its lock is
    stale; another host's owner cannot be looked up from here)."""
    return owner.local() and not _running(owner.pid, owner.started)


class FolderLock:
    """An exclusive lock on an output folder; use as a context manager or acquire/release.

    Args:
        folder: the output folder (created when missing).
        command: what the holder runs, shown to whoever finds the folder locked.
        heartbeat: seconds between refreshes of the lock's mtime (0: no heartbeat thread).
        stale_after: seconds without a refresh after which another host's lock is stale.
    """

    def __init__(self, folder: str | Path, command: str = "lory", heartbeat: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command, self.heartbeat, self.stale_after = command, heartbeat, stale_after
        self.owner: LockOwner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- taking and giving back ---------------------------------------------------------
    def acquire(self, log: Callable[[str], None] | None = None) -> FolderLock:
        """Take the lock, taking over a stale one (reported through `log`).

        Raises:
            FolderLockedError: another live process holds it (one line naming it), or the
                lock file is unreadable.
            LoryDataError: the folder cannot be created or written.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoryDataError(f"cannot create {self.folder}: {exc.strerror or exc}") from None
        me = LockOwner.me(self.command)
        for _ in range(5):
            if self._create(me):
                self.owner = me
                self._start_heartbeat()
                return self
            current, age = self._read()
            if current is None:
                continue  # removed between our attempt and the read: try again
            reason = self._stale_reason(current, age)
            if reason is None:
                where = "" if current.local() else (
                    f"; its lock was refreshed {age:.0f} s ago, it counts as gone after {self.stale_after:.0f} s")
                raise FolderLockedError(f"{self.folder} is being written by {current.describe()}{where}; one writer "
                                        f"at a time: wait for it, or delete {self.path} if that process is gone")
            if self._remove_if_same(current) and log is not None:
                log(f"took over the stale lock of {current.describe()} on {self.folder}: {reason}")
        raise FolderLockedError(f"cannot take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        """Remove the lock if this object still holds it (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owner is None:
            return
        try:
            current = LockOwner.parse(self.path.read_text())
            if current is not None and current.token == self.owner.token:
                self.path.unlink()
        except OSError:
            pass
        self.owner = None

    @property
    def held(self) -> bool:
        return self.owner is not None

    # ---- internals ----------------------------------------------------------------------
    def _create(self, me: LockOwner) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise LoryDataError(f"cannot write in {self.folder}: {exc.strerror or exc}") from None
        try:
            os.write(fd, (json.dumps(asdict(me), indent=1) + "\n").encode())
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise LoryDataError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        os.close(fd)
        return True

    def _read(self) -> tuple[LockOwner | None, float]:
        """The current owner and the seconds since the lock was last refreshed; (None, 0) when
        the file is gone. A file still being written by its creator gets a moment to finish."""
        for _ in range(20):
            try:
                text, mtime = self.path.read_text(errors="replace"), self.path.stat().st_mtime
            except FileNotFoundError:
                return None, 0.0
            except OSError as exc:
                raise FolderLockedError(f"cannot read the lock {self.path}: {exc.strerror or exc}") from None
            owner = LockOwner.parse(text)
            if owner is not None:
                return owner, max(0.0, time.time() - mtime)
            time.sleep(0.05)
        raise FolderLockedError(f"{self.path} is not a lory lock file; delete it if no lory process writes "
                                f"{self.folder}")

    def _stale_reason(self, owner: LockOwner, age: float) -> str | None:
        if owner.local():
            return "that process is no longer running" if owner_is_gone(owner) else None
        if age > self.stale_after:
            return f"not refreshed for {age:.0f} s"
        return None

    def _remove_if_same(self, stale: LockOwner) -> bool:
        """Remove the lock if it still is `stale`'s: under an flock of the folder, so of two
        processes taking over one stale lock only one removes it (the other then finds the
        winner's fresh lock)."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current, _ = self._read()
            if current is None or current.token != stale.token:
                return False
            self.path.unlink()
            return True
        finally:
            os.close(fd)  # releases the flock

    def _start_heartbeat(self) -> None:
        if self.heartbeat <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock {self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):  # gone or unwritable for a moment: the next beat tries again
                os.utime(self.path)
