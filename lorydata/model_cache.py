"""A per-user cache of models lory derives once and reuses: distilled static embedders and
ONNX exports of transformer embedders.

Each entry is a folder `<cache>/<kind>/<key>`, keyed by what it is made from (the source
model's fingerprint, the dimensions, the recipe), so a changed source gets a new entry and
an unchanged one is never rebuilt. The cache folder is `$LORY_CACHE_DIR`, else
`$XDG_CACHE_HOME/lory`, else `~/.cache/lory`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorydata.errors import LoryDataError

CACHE_ENV = "LORY_CACHE_DIR"


def cache_dir() -> Path:
    """The folder that holds lory's cached models (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lory"


def cached_folder(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """The cache entry `<cache>/<kind>/<key>`, made by `build` the first time it is asked for.

    `build(folder)` fills an empty temporary folder next to the entry, which is then renamed
    into place, so an entry that exists is complete (a build killed half-way leaves only a
    temporary folder, removed by the next build). A file lock per entry makes concurrent
    processes on one machine wait for the first builder instead of building twice.

    Args:
        kind: the entry's family ("static", "static-bpe", "onnx").
        key: what identifies the entry within its family.
        build: writes the entry's files into the folder it is given.

    Returns:
        The entry's folder.
    """
    final = cache_dir() / kind / key
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoryDataError(f"cannot create the model cache {final.parent} ({exc.strerror}); "
                            f"set {CACHE_ENV} to a writable folder") from None
    with open(final.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{key}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp", dir=final.parent))
        try:
            build(work)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final


def folder_fingerprint(folder: Path) -> str:
    """Hash of a model folder: every file's name and size, and the contents of its JSON files.

    Cheap even for multi-GB weights, and it changes whenever a file is replaced by a
    different export (sizes differ) or a config changes.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = file.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        if file.suffix == ".json" and file.stat().st_size < 1 << 20:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
