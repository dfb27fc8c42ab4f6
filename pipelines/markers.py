"""Stage completion markers: what makes `lory build-corpus` resumable.

A stage writes into `<name>.tmp/`, and only when it has finished is that folder renamed to
`<name>/` with `_DONE.json` inside, holding the fingerprint of the options the stage
depends on and its results. A rerun skips a stage whose marker matches, refuses one whose
marker was written with other options (unless overwriting), and removes stale `.tmp`
folders left by a killed run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorydata.errors import LoryDataError
from lorydata.manifest import atomic_write_bytes

MARKER = "_DONE.json"


class Stage:
    """One resumable stage with its output folder.

    Args:
        folder: the stage's final output folder.
        fingerprint: hash of everything the stage's output depends on.
        overwrite: replace a finished stage that has another fingerprint instead of refusing.
    """

    def __init__(self, folder: str | Path, fingerprint: str, overwrite: bool = False):
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(self.folder.name + ".tmp")
        self.fingerprint = fingerprint
        self.overwrite = overwrite

    def result(self) -> dict | None:
        """The recorded result when this stage already finished with these options, else None.

        Raises:
            LoryDataError: the stage finished with other options and overwriting is off.
        """
        marker = self.folder / MARKER
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == self.fingerprint:
            return info.get("result", {})
        if not self.overwrite:
            raise LoryDataError(
                f"{self.folder} was built with other options; rerun with --overwrite to replace it "
                "(or choose another --out)"
            )
        return None

    def start(self) -> Path:
        """A fresh, empty temp folder to write the stage's output into."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def finish(self, result: dict) -> dict:
        """Mark the temp output complete and move it into place (replacing an old one)."""
        payload = json.dumps({"fingerprint": self.fingerprint, "result": result}, indent=2, sort_keys=True)
        atomic_write_bytes(self.tmp / MARKER, payload.encode())
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.tmp.rename(self.folder)
        return result
