"""Files of a run folder besides its checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_TOKENIZER = "tokenizer.json"


def keep_tokenizer(run_dir: str | Path, tokenizer: dict) -> Path | None:
    """Copy the shards' tokenizer into the run folder, so the run can be decoded on its own.

    Returns the copy, or None when the tokenizer file recorded in the manifest is gone.
    """
    target = Path(run_dir) / RUN_TOKENIZER
    if target.exists():
        return target
    source = Path(tokenizer.get("path", ""))
    if source.is_dir():
        source = source / RUN_TOKENIZER
    if not source.is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.rename(target)
    return target
