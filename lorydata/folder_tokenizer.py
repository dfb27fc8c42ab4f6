"""The tokenizer a shard folder carries: `tokenizer.json` beside its manifest.

A corpus folder is self-contained: its manifest's `tokenizer` record names the file by a
relative name (`"file": "tokenizer.json"`) with its sha256, so the folder can be moved to
another machine and still decoded and trained on. The absolute `path` older manifests record
(the build machine's) is never read. A folder behind a URL (`s3://…`, `lorydata.remote`)
carries it the same way: `known_tokenizer_bytes` reads and verifies it from there.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from lorydata.confine import OutsideFolderError, inside, name_problem
from lorydata.errors import ShardError
from lorydata.hashing import bytes_sha256, file_sha256
from lorydata.manifest import MANIFEST_NAME
from lorydata.remote import filesystem_for, is_url, join, read_bytes
from lorydata.tokenizer import DEFAULT_TOKENIZER


def shard_tokenizer_file(folder: str | Path, manifest) -> Path | None:
    """The verified tokenizer file of a shard folder.

    Args:
        folder: the shard folder.
        manifest: its `lorydata.manifest.Manifest`.

    Returns:
        The file named by the manifest's `tokenizer.file`, or None when the manifest has no
        such entry (folders built before corpora carried their tokenizer).

    Raises:
        OutsideFolderError: the name is not a plain relative name inside the folder.
        ShardError: the file is missing or its sha256 is not the manifest's.
    """
    name = manifest.tokenizer.get("file")
    if name is None:
        return None
    path = inside(folder, name, source=Path(folder) / MANIFEST_NAME, entry="tokenizer file")
    if not path.is_file():
        raise ShardError(f"{folder}: tokenizer file {name} named by the manifest is missing")
    if file_sha256(path) != manifest.tokenizer.get("sha256"):
        raise ShardError(f"{path} is not the tokenizer that made {folder} (sha256 differs from the manifest's)")
    return path


def known_tokenizer_file(folder: str | Path, manifest) -> Path | None:
    """`shard_tokenizer_file`, else the bundled tokenizer when it is the one that made the
    shards (same sha256), else None: the tokenizer can be found without trusting any path."""
    path = shard_tokenizer_file(folder, manifest)
    if path is None and DEFAULT_TOKENIZER.is_file() and file_sha256(DEFAULT_TOKENIZER) == manifest.tokenizer.get("sha256"):
        return DEFAULT_TOKENIZER
    return path


def known_tokenizer_bytes(folder: str | Path, manifest, *, filesystem: pafs.FileSystem | None = None) -> bytes | None:
    """What `known_tokenizer_file` finds, as bytes, for a local folder or a folder's URL.

    Args:
        folder: the shard folder or its URL.
        manifest: its `lorydata.manifest.Manifest`.
        filesystem: for a URL, the pyarrow filesystem to read with (default: the URL's own).

    Raises:
        OutsideFolderError: the name is not a plain relative name inside the folder.
        ShardError: the file is missing or its sha256 is not the manifest's.
    """
    if not is_url(folder):
        path = known_tokenizer_file(folder, manifest)
        return None if path is None else path.read_bytes()
    name, want = manifest.tokenizer.get("file"), manifest.tokenizer.get("sha256")
    if name is None:
        bundled = DEFAULT_TOKENIZER.read_bytes() if DEFAULT_TOKENIZER.is_file() else b""
        return bundled if bundled and bytes_sha256(bundled) == want else None
    source = join(folder, MANIFEST_NAME)
    problem = name_problem(name)
    if problem is not None:
        raise OutsideFolderError(f"{source}: tokenizer file {name!r} {problem}; refused (only names inside {folder} "
                                 "are read)")
    filesystem, root = filesystem_for(folder, filesystem)
    data = read_bytes(filesystem, f"{root}/{name}", join(folder, name))
    if data is None:
        raise ShardError(f"{folder}: tokenizer file {name} named by the manifest is missing")
    if bytes_sha256(data) != want:
        raise ShardError(f"{join(folder, name)} is not the tokenizer that made {folder} (sha256 differs from the "
                         "manifest's)")
    return data
