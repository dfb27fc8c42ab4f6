"""One writer per build folder: `lory build-corpus` holds `<out>/_lock.json` while it runs.

The lock is created atomically through the file layer (O_EXCL on local disk, a conditional
put on S3), names its owner (host, pid, start time) and is removed when the build ends. A
second build on the same `--out` stops at once with one line naming the owner. A lock left
by a process that died on this host is taken over; one held on another host is reported
with the command that removes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lorydata.errors import LoryDataError
from pipelines import fileio, layout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(path: str) -> dict:
    try:
        return json.loads(fileio.read_bytes(path))
    except (OSError, ValueError):
        return {}


def _stale(owner: dict) -> bool:
    """A lock of a dead process of this host (a lock of another host cannot be judged here)."""
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"])


@contextmanager
def build_lock(out: str) -> Iterator[None]:
    """Hold the lock on the build folder `out` for the duration of the block.

    Raises:
        LoryDataError: another live process holds it, or `out` cannot be written (the lock
            is the first thing a build writes, so an unwritable `--out` fails here in one line).
    """
    path = layout.lock_file(out)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    payload = json.dumps(me).encode()
    try:
        taken = fileio.create_exclusive(path, payload)
        if not taken and _stale(_owner(path)):
            fileio.delete_tree(path)
            taken = fileio.create_exclusive(path, payload)
    except OSError as exc:
        raise LoryDataError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    if not taken:
        owner = _owner(path)
        raise LoryDataError(f"--out {out} is being built by another lory process (pid {owner.get('pid', '?')} on "
                            f"{owner.get('host', '?')}, since {owner.get('since', '?')}); wait for it to finish, or "
                            f"remove {path} if that process is gone")
    try:
        yield
    finally:
        if _owner(path).get("pid") == me["pid"] and _owner(path).get("host") == me["host"]:
            fileio.delete_tree(path)
