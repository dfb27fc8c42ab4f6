"""The tokenizer a shard folder carries: `tokenizer.json` beside its manifest.

A corpus folder is self-contained: its manifest's `tokenizer` record names the file by a
relative name (`"file": "tokenizer.json"`) with its sha256, so the folder can be moved to
another machine and still decoded and trained on. The absolute `path` older manifests record
(the build machine's) is never read.
"""

from __future__ import annotations

from pathlib import Path

from lorydata.confine import inside
from lorydata.errors import ShardError
from lorydata.hashing import file_sha256
from lorydata.manifest import MANIFEST_NAME
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
