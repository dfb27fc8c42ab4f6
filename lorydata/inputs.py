"""Input selection: which files of the given paths, folders and globs a build reads, and
which it leaves out and why.

Data files are recognised by suffix (`FORMATS`, case-insensitive):

    .jsonl .json .jsonl.zst .jsonl.zstd .json.zst .jsonl.gz .json.gz   JSON lines
    .parquet                                                            Parquet
    .txt                                                                one document per file

Inside a folder (searched recursively) only data files are taken; these are skipped and
counted: hidden files and folders (a name starting with `.` or `_`: `.git/`, `_work/`,
`_SUCCESS`), files with another suffix (`README.md`, `LICENSE`), metadata JSON (a `.json`
named `dataset_info.json`, `dataset_dict.json` or `state.json`, or one whose first line is
not a whole JSON object, i.e. a pretty-printed or array document) and anything inside the
`exclude` folder (the build's own output). Globs skip hidden names below their fixed folder
the same way; a file named explicitly, or matched by a glob, that is not a data file is an
error, so a glob never silently reads a README or a metadata file as data.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorydata.compression import Opener, is_url, open_binary
from lorydata.errors import InputNotFoundError, LoryDataError

FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.zstd": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".parquet": "parquet",
    ".txt": "txt",
}
_SUFFIXES = sorted(FORMATS, key=len, reverse=True)
METADATA_NAMES = frozenset({"dataset_info.json", "dataset_dict.json", "state.json"})
_SNIFF_BYTES = 64 << 10

Lister = Callable[[str], list[str]]
"""glob pattern (`*`, `?`, `[…]`, and `**` across folders) → the files it matches, [] for
none; a pattern without wildcards matches itself when it is a file. The default serves local
paths and fsspec URLs; Beam pipelines pass one built on `FileSystems.match`."""

# Why a file was left out; the keys of `InputSelection.skipped`.
HIDDEN = "hidden"
NOT_DATA = "not_data"
METADATA = "metadata"
OUTPUT = "output"


def file_format(path: str) -> str | None:
    """The format of `path` by its name, or None when it is not a supported data file."""
    name = path.lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def accepted_suffixes() -> str:
    return " ".join(sorted(FORMATS, key=lambda s: (FORMATS[s], len(s))))


@dataclass
class InputSelection:
    """What `select_inputs` found.

    Args:
        files: the data files to read, sorted.
        skipped: reason (`hidden`, `not_data`, `metadata`, `output`) → the paths left out
            (a hidden folder counts once, as `folder/.name/`).
    """

    files: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """reason → how many paths were skipped (what a manifest records)."""
        return {reason: len(paths) for reason, paths in sorted(self.skipped.items())}

    def describe(self, examples: int = 2) -> str:
        """One line: `3 input files; skipped 4: 2 hidden (.git/, _work/), 1 not_data (README.md), …`."""
        line = f"{len(self.files)} input file{'s' * (len(self.files) != 1)}"
        if not self.skipped:
            return line
        parts = []
        for reason, paths in sorted(self.skipped.items()):
            names = ", ".join(_short(p) for p in sorted(paths)[:examples]) + (", …" if len(paths) > examples else "")
            parts.append(f"{len(paths)} {reason} ({names})")
        return f"{line}; skipped {sum(map(len, self.skipped.values()))}: " + ", ".join(parts)


def _short(path: str) -> str:
    trail = "/" if path.endswith("/") else ""
    return path.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1] + trail


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _has_magic(pattern: str) -> bool:
    return glob.has_magic(pattern.split("://", 1)[-1])


def default_lister(pattern: str) -> list[str]:
    """Files matching `pattern`: local paths with `glob` (hidden names included), URLs with
    fsspec."""
    if is_url(pattern):
        import fsspec  # only URL inputs need it

        fs, _, _ = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        paths = fs.glob(pattern) if _has_magic(pattern) else ([pattern] if fs.isfile(pattern) else [])
        return [p if "://" in p else f"{protocol}://{p}" for p in paths if fs.isfile(p)]
    pattern = pattern.removeprefix("file://")
    if not _has_magic(pattern):
        return [pattern] if os.path.isfile(pattern) else []
    return [p for p in glob.glob(pattern, recursive=True, include_hidden=True) if os.path.isfile(p)]


def _walk_local(folder: str, excluded: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(files, hidden entries) under a local folder; hidden and excluded folders are not
    entered (an excluded one is returned among the files, to be counted once)."""
    files, hidden = [], []
    for root, dirs, names in os.walk(folder):
        for d in list(dirs):
            path = os.path.join(root, d)
            if _is_hidden(d) or excluded(path):
                (hidden if _is_hidden(d) else files).append(path + "/")
                dirs.remove(d)
        dirs.sort()
        for name in names:
            (hidden if _is_hidden(name) else files).append(os.path.join(root, name))
    return files, hidden


def _hidden_entry(root: str, path: str) -> str | None:
    """The hidden file or folder (`root/.git/`) that holds `path` below `root`, or None."""
    root = root.rstrip("/")
    parts = path[len(root) + 1 :].replace(os.sep, "/").split("/") if path.startswith(root) else []
    at = next((i for i, part in enumerate(parts) if _is_hidden(part)), None)
    if at is None:
        return None
    return root + "/" + "/".join(parts[: at + 1]) + ("/" if at < len(parts) - 1 else "")


def _fixed_folder(pattern: str) -> str:
    """The folder part of a glob before its first wildcard (`a/b/**/*.jsonl` → `a/b`)."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return "/".join(parts[:fixed])


def _walk_listed(folder: str, lister: Lister, excluded: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(files, hidden entries) under `folder` from a listing of `folder/**`; excluded files
    are returned among the files (to be counted), never looked into."""
    root = folder.rstrip("/")
    files, hidden = [], set()
    for path in lister(root + "/**"):
        entry = None if excluded(path) else _hidden_entry(root, path)
        if entry is None:
            files.append(path)
        else:
            hidden.add(entry)
    return files, sorted(hidden)


def _is_local_folder(path: str, lister: Lister | None) -> bool:
    return not is_url(path) and os.path.isdir(path.removeprefix("file://"))


def json_kind(path: str, opener: Opener | None = None) -> str | None:
    """Why a `.json` file is metadata rather than JSON lines, or None when it is data."""
    name = path.replace(os.sep, "/").rsplit("/", 1)[-1]
    if name in METADATA_NAMES:
        return f"{name} is dataset metadata"
    try:
        with (opener or open_binary)(path) as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None  # unreadable: the reader reports it as a dead letter
    head = head.removeprefix(b"\xef\xbb\xbf")  # a BOM does not make JSON lines metadata
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if first and (not first.startswith(b"{") or first == b"{"):
        return "a JSON document, not JSON lines (one object per line)"
    return None


class _Selector:
    def __init__(self, exclude: str | None, lister: Lister | None, opener: Opener | None):
        self.exclude = self._normal(exclude) + "/" if exclude else None
        self.exclude_given = str(exclude).rstrip("/") + "/" if exclude else ""
        self.lister, self.opener = lister, opener
        self.skipped: dict[str, list[str]] = {}

    @staticmethod
    def _normal(path: str) -> str:
        path = str(path)
        if is_url(path):
            return path.rstrip("/")
        return os.path.realpath(path.removeprefix("file://"))

    def excluded(self, path: str) -> bool:
        return self.exclude is not None and (self._normal(path) + "/").startswith(self.exclude)

    def skip(self, reason: str, path: str) -> None:
        paths = self.skipped.setdefault(reason, [])
        if reason == OUTPUT:  # the output folder counts once, however much it holds
            path = self.exclude_given
        if path not in paths:
            paths.append(path)

    def folder(self, folder: str) -> list[str]:
        if self.excluded(folder):
            raise LoryDataError(f"input {folder} is inside the output folder {self.exclude_given}")
        if _is_local_folder(folder, self.lister):
            files, hidden = _walk_local(folder.removeprefix("file://"), self.excluded)
        else:
            files, hidden = _walk_listed(folder, self.lister or default_lister, self.excluded)
        for h in hidden:
            self.skip(HIDDEN, h)
        taken = []
        for path in files:
            fmt = file_format(path)
            if self.excluded(path):
                self.skip(OUTPUT, path)
            elif fmt is None:
                self.skip(NOT_DATA, path)
            elif path.lower().endswith(".json") and json_kind(path, self.opener):
                self.skip(METADATA, path)
            else:
                taken.append(path)
        return taken

    def named(self, pattern: str, matched: list[str]) -> list[str]:
        """Files matched by a glob or named explicitly: every one must be a data file.
        Below a glob's fixed folder, hidden names are skipped as they are in folders."""
        taken, bad = [], []
        root = _fixed_folder(pattern) if _has_magic(pattern) else None
        for path in matched:
            hidden = _hidden_entry(root, path) if root is not None else None
            if hidden:
                self.skip(HIDDEN, hidden)
            elif self.excluded(path):
                self.skip(OUTPUT, path)
            elif file_format(path) is None:
                bad.append(f"{path} (not a data file)")
            elif path.lower().endswith(".json") and (why := json_kind(path, self.opener)):
                bad.append(f"{path} ({why})")
            else:
                taken.append(path)
        if bad:
            what = f"glob {pattern!r} matches" if _has_magic(pattern) else "input"
            raise LoryDataError(
                f"{what} {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}; data files end in "
                f"{accepted_suffixes()} (a folder input skips other files)"
            )
        return taken


def select_inputs(
    inputs: Sequence[str],
    exclude: str | None = None,
    lister: Lister | None = None,
    opener: Opener | None = None,
) -> InputSelection:
    """Resolve files, folders, globs and URLs into the data files to read, and what was left out.

    Args:
        inputs: files, folders (searched recursively), glob patterns (`**` crosses folders)
            or fsspec URLs.
        exclude: a folder never read from, whatever the inputs say: the build's `--out`, so
            that an output inside an input folder is not read back as input.
        lister: glob pattern → matching files; `default_lister` (local and fsspec) when None.
        opener: path → binary file, to look at the first line of `.json` files.

    Raises:
        InputNotFoundError: naming every input that matched no data file, before any reading.
        LoryDataError: when a file named explicitly or matched by a glob is not a data file.
    """
    if not inputs:
        raise InputNotFoundError("no input given")
    selector = _Selector(exclude, lister, opener)
    files: set[str] = set()
    missing = []
    for pattern in map(str, inputs):
        before = {reason: len(paths) for reason, paths in selector.skipped.items()}
        if _has_magic(pattern):
            found = selector.named(pattern, (lister or default_lister)(pattern))
        elif _is_local_folder(pattern, lister):
            found = selector.folder(pattern)
        elif matched := (lister or default_lister)(pattern):
            found = selector.named(pattern, matched)
        elif lister is not None or is_url(pattern):  # an object-store prefix is a folder
            found = selector.folder(pattern) if (lister or default_lister)(pattern.rstrip("/") + "/**") else []
        else:
            found = []
        if not found:
            skipped = {r: len(p) - before.get(r, 0) for r, p in selector.skipped.items() if len(p) > before.get(r, 0)}
            why = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))
            missing.append(f"{pattern} (no data files; skipped {why})" if why else pattern)
        files.update(found)
    if missing:
        raise InputNotFoundError(f"input not found: {', '.join(missing)}")
    return InputSelection(sorted(files), {r: sorted(p) for r, p in selector.skipped.items()})


def expand_inputs(
    inputs: Sequence[str],
    exclude: str | None = None,
    lister: Lister | None = None,
    opener: Opener | None = None,
) -> list[str]:
    """The sorted data files of `inputs`; `select_inputs(...).files` (see there)."""
    return select_inputs(inputs, exclude, lister, opener).files
