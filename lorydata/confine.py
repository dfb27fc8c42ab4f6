"""Names a folder gives for its own files: plain relative names that stay inside it.

Manifests, checkpoint `state.json`s and DONE markers list the files of their folder. Folders
travel (copied between clusters, shared, downloaded), so a name read from one is used only
when it is a plain relative name (not absolute, no `..`, `.` or empty part, no backslash or
NUL) that, with symlinks resolved, still lies inside the folder. Anything else is refused in
one line naming the file that gave the name and the entry.
"""

from __future__ import annotations

from pathlib import Path

from lorydata.errors import LoryDataError


class OutsideFolderError(LoryDataError):
    """A name read from a folder's own records points outside that folder."""


def name_problem(name) -> str | None:
    """Why `name` is not a plain relative file name, or None when it is one.

    Args:
        name: the entry as read (any JSON value).
    """
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name or "\\" in name:
        return "holds a NUL or backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "is not a plain relative name (it has an empty, '.' or '..' part)"
    return None


def inside(folder: str | Path, name, *, source: str | Path, entry: str) -> Path:
    """`folder / name`, after checking that it is a plain relative name inside `folder`.

    The path does not have to exist; when it (or a folder on the way) is a symlink, its
    target must lie inside `folder` too.

    Args:
        folder: the folder whose records gave `name`.
        name: the name as read from the record.
        source: the record that gave it (e.g. the manifest), for the message.
        entry: what the name is (e.g. "shard file"), for the message.

    Raises:
        OutsideFolderError: naming `source`, `entry` and `name`.
    """
    problem = name_problem(name)
    if problem is None:
        root = Path(folder).resolve()
        if not (root / name).resolve().is_relative_to(root):
            problem = "leads outside the folder (through a symlink)"
    if problem is not None:
        raise OutsideFolderError(f"{source}: {entry} {name!r} {problem}; refused (only names inside "
                                 f"{Path(folder)} are read)")
    return Path(folder) / name
