"""Files of a run folder besides its checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from lorydata.folder_tokenizer import known_tokenizer_bytes
from lorydata.hashing import file_sha256
from lorydata.manifest import Manifest

RUN_TOKENIZER = "tokenizer.json"


def keep_tokenizer(run_dir: str | Path, data: str | Path, manifest: Manifest) -> Path | None:
    """Copy the shards' tokenizer into the run folder, so the run can be decoded on its own.

    The copy comes only from the tokenizer the shard folder carries (on disk or in a bucket),
    verified against the manifest's sha256 (`lorydata.folder_tokenizer`), or from the bundled
    tokenizer when it is the one that made the shards: never from a path the manifest records.

    Args:
        run_dir: the run folder.
        data: the shard folder trained on, or its URL.
        manifest: its manifest.

    Returns:
        The copy, or None when the shard folder carries no tokenizer (built by an older lory).

    Raises:
        OutsideFolderError, ShardError: the tokenizer the manifest names is outside the shard
            folder, missing or not the one recorded.
    """
    content = known_tokenizer_bytes(data, manifest)
    if content is None:
        return None
    target = Path(run_dir) / RUN_TOKENIZER
    if target.is_file() and not target.is_symlink() and file_sha256(target) == manifest.tokenizer.get("sha256"):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{RUN_TOKENIZER}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, target)  # replaces a symlink itself, never what it points to
    return target
