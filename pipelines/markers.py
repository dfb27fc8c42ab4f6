"""Stage markers: what makes `lory build-corpus` resumable, with no folder renames.

A stage writes straight into its folder. `_STARTED.json` records the fingerprint of the
options it runs with; every partition it finishes is committed (`pipelines.commits`), so a
killed stage resumes where it stopped; when the stage has finished, `_DONE.json` is written
last, holding the fingerprint, the stage's result and the size of every file it kept. Then
its scratch (partition records, intermediate files) is removed.

A rerun skips a stage whose `_DONE.json` matches, refuses one finished with other options
(unless overwriting, which removes it), and starts over a stage left unfinished with other
options. The markers store which options and inputs the fingerprint covers, so a refusal
says what changed.
"""

from __future__ import annotations

import json

from lorydata.errors import LoryDataError
from pipelines import fileio
from pipelines.commits import COMMITS

MARKER = "_DONE.json"
STARTED = "_STARTED.json"


class Stage:
    """One resumable stage with its output folder.

    Args:
        folder: the stage's output folder.
        fingerprint: hash of everything the stage's output depends on.
        overwrite: replace a finished stage that has another fingerprint instead of refusing.
        depends_on: the option values and input identities the fingerprint covers (named in
            the refusal when they differ).
        scratch: the stage's intermediate files and folders (relative names), removed once
            it is done.
    """

    def __init__(self, folder: str, fingerprint: str, overwrite: bool = False, depends_on: dict | None = None,
                 scratch: tuple[str, ...] = ()):
        self.folder = str(folder)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.depends_on = depends_on or {}
        self.scratch = (*scratch, COMMITS, STARTED)

    def _read(self, name: str) -> dict | None:
        path = fileio.join(self.folder, name)
        if not fileio.exists(path):
            return None
        try:
            return json.loads(fileio.read_bytes(path))
        except (ValueError, OSError):
            return {}  # a damaged marker counts as one of other options

    def result(self) -> dict | None:
        """The recorded result when this stage already finished with these options, else None.

        Raises:
            LoryDataError: the stage finished with other options and overwriting is off.
        """
        done = self._read(MARKER)
        if done is None:
            return None
        if done.get("fingerprint") == self.fingerprint:
            self.clean()  # a run killed after the marker may have left scratch behind
            return done.get("result", {})
        if not self.overwrite:
            raise LoryDataError(f"{self.folder} was built with {self._difference(done)}; rerun with --overwrite to "
                                "replace it (or choose another --out)")
        return None

    def _difference(self, marker: dict) -> str:
        before = marker.get("depends_on")
        if not before:
            return "other options or inputs"
        changed = sorted(k for k in {*before, *self.depends_on} if before.get(k) != self.depends_on.get(k))
        shown = [f"{name} {before.get(name)!r} → {self.depends_on.get(name)!r}" if name != "inputs"
                 else "other inputs (files added, removed or changed)" for name in changed]
        return "other options: " + "; ".join(shown) if shown else "other options or inputs"

    def start(self) -> str:
        """Make the folder ready and return it: a finished stage of other options (when
        overwriting) or an unfinished one of other options is removed; an unfinished one of
        these options is kept, its committed partitions reused."""
        started, done = self._read(STARTED), self._read(MARKER)
        stale = done is not None or (started is not None and started.get("fingerprint") != self.fingerprint)
        if stale or (started is None and not fileio.is_empty_folder(self.folder)):
            fileio.delete_tree(self.folder)
        fileio.write_bytes(fileio.join(self.folder, STARTED),
                           json.dumps({"fingerprint": self.fingerprint, "depends_on": self.depends_on}).encode())
        return self.folder

    def finish(self, result: dict) -> dict:
        """Mark the stage done with `result` (the marker lists the files it keeps), then
        remove its scratch."""
        scratch = [fileio.join(self.folder, name) for name in self.scratch]
        kept = {fileio.relative(path, self.folder): size for path, size in sorted(fileio.sizes(self.folder).items())
                if not any(path == s or path.startswith(s + "/") for s in scratch)}
        payload = {"fingerprint": self.fingerprint, "result": result, "depends_on": self.depends_on, "files": kept}
        fileio.write_bytes(fileio.join(self.folder, MARKER), json.dumps(payload, indent=2, sort_keys=True).encode())
        self.clean()
        return result

    def clean(self) -> None:
        for name in self.scratch:
            fileio.delete_tree(fileio.join(self.folder, name))
