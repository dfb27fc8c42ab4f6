"""One writer per build folder: `lory build-corpus` holds a lock on `--out` while it runs.

On local disk (and shared mounts) this is `lorydata.lock.FolderLock`, the lock `lory train`
takes too. On an object store the same owner record is created with a conditional put
(`If-None-Match: *` on S3) through the build's file layer. Either way a second build on the
same `--out` stops at once with one line naming the owner, and a lock left by a process that
died on this host is taken over. Taking the lock is also the build's first write, so an
`--out` that cannot be written fails here, in one line, before any stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

from lorydata.errors import LoryDataError
from lorydata.lock import FolderLock, FolderLockedError, LockOwner, owner_is_gone
from pipelines import fileio, layout

COMMAND = "lory build-corpus"


@contextmanager
def build_lock(out: str) -> Iterator[None]:
    """Hold the lock on the build folder `out` for the duration of the block.

    Raises:
        FolderLockedError: another live process holds it.
        LoryDataError: `out` cannot be written.
    """
    if fileio.is_local(out):
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise LoryDataError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
        with FolderLock(out, command=COMMAND):
            yield
        return
    path, me = layout.lock_file(out), LockOwner.me(COMMAND)
    _take(path, me)
    try:
        yield
    finally:
        if _owner(path) == me:
            fileio.delete_tree(path)


def _owner(path: str) -> LockOwner | None:
    try:
        return LockOwner.parse(fileio.read_bytes(path).decode("utf-8", errors="replace"))
    except OSError:
        return None


def _take(path: str, me: LockOwner) -> None:
    payload = (json.dumps(asdict(me), indent=1) + "\n").encode()
    try:
        if fileio.create_exclusive(path, payload):
            return
        owner = _owner(path)
        if owner is not None and owner_is_gone(owner):
            fileio.delete_tree(path)
            if fileio.create_exclusive(path, payload):
                return
            owner = _owner(path)
    except OSError as exc:
        raise LoryDataError(f"cannot write to --out {fileio.dirname(path)}: {exc.strerror or exc}") from None
    who = owner.describe() if owner is not None else "a process whose lock file is unreadable"
    raise FolderLockedError(f"{fileio.dirname(path)} is being written by {who}; one writer at a time: wait for it, "
                            f"or delete {path} if that process is gone")
