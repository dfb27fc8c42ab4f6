"""`.manifest.json`: what a shard folder holds and how it was made.

Written last and atomically, so a folder with a manifest is a finished folder. Readers
trust nothing else: the shard list, row counts and sha256 come from here.

The name starts with a dot so that folder-level readers skip it and see only the shards:
pyarrow.dataset ignores names starting with "." or "_", Hugging Face `datasets` (both
`load_dataset(folder)` and `load_dataset("arrow", data_dir=folder)`) only hidden ones.
Folders written before the rename hold `manifest.json`; `Manifest.read` still reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from lorydata.confine import OutsideFolderError, inside, name_problem
from lorydata.errors import ShardError
from lorydata.hashing import bytes_sha256
from lorydata.remote import filesystem_for, is_url, join, read_bytes

FORMAT_NAME = "lory-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = ".manifest.json"
LEGACY_MANIFEST_NAME = "manifest.json"  # what earlier lory versions wrote; still read


@dataclass
class ShardInfo:
    """One shard file: its name inside the folder, rows, bytes and sha256."""

    file: str
    rows: int
    bytes: int
    sha256: str

    @classmethod
    def of(cls, name: str, data: bytes, rows: int) -> ShardInfo:
        """The entry of a shard whose file `name` holds `data` (`rows` sequences)."""
        return cls(file=name, rows=rows, bytes=len(data), sha256=bytes_sha256(data))


@dataclass
class Manifest:
    """The manifest of a shard folder (format version 1).

    Args:
        seq_len: tokens per sequence.
        tokenizer: the tokenizer identity (path, sha256, vocab_size, eos_id, pad_id).
        shards: the shard files in order.
        counts: documents in/out, drops per reason, duplicates, sequences, tokens, padding.
        order: ordering method, its seed and quality metrics.
        split: "train" or "heldout".
        embedder: embedding model identity (similarity order only).
        index: FAISS index description and kNN recall (similarity order only).
        options: every option the folder was built with.
        created_by: the lory version that wrote it.
    """

    seq_len: int
    tokenizer: dict
    shards: list[ShardInfo] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    order: dict = field(default_factory=dict)
    split: str = "train"
    embedder: dict | None = None
    index: dict | None = None
    options: dict = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_bytes(self) -> bytes:
        """The manifest file's content."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def write(self, folder: str | Path) -> Path:
        """Write `folder/.manifest.json` atomically (temp file, fsync, rename).

        A legacy `manifest.json` beside it is removed afterwards, so a folder never holds two.
        """
        path = Path(folder) / MANIFEST_NAME
        atomic_write_bytes(path, self.to_bytes())
        (Path(folder) / LEGACY_MANIFEST_NAME).unlink(missing_ok=True)
        return path

    @classmethod
    def read(cls, folder: str | Path, *, filesystem: pafs.FileSystem | None = None) -> Manifest:
        """Read and check `folder/.manifest.json` (or a legacy `folder/manifest.json`).

        Args:
            folder: a local shard folder, or its URL (`s3://bucket/prefix/train`, `lorydata.remote`).
            filesystem: for a URL, the pyarrow filesystem to read it with (default: the one
                of the URL's scheme, configured from the standard environment).

        Raises:
            ShardError: the folder or manifest is missing, unparsable, or of another format.
            OutsideFolderError: a shard `file` is not a plain relative name inside the folder.
        """
        if is_url(folder):
            return cls._read_url(str(folder), filesystem)
        folder = Path(folder)
        if not folder.is_dir():
            raise ShardError(f"shard folder not found: {folder}")
        path = manifest_path(folder)
        if path is None:
            raise ShardError(f"no {MANIFEST_NAME} in {folder}: not a finished lory shard folder")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ShardError(f"unreadable manifest {path}: {exc}") from None
        manifest = cls.parse(text, path)
        for shard in manifest.shards:  # the folder may come from anywhere: read nothing outside it
            inside(folder, shard.file, source=path, entry="shard file")
        return manifest

    @classmethod
    def _read_url(cls, url: str, filesystem: pafs.FileSystem | None) -> Manifest:
        filesystem, root = filesystem_for(url, filesystem)
        for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
            data = read_bytes(filesystem, f"{root}/{name}", join(url, name))
            if data is not None:
                break
        else:
            raise ShardError(f"no {MANIFEST_NAME} at {url}: not a finished lory shard folder")
        source = join(url, name)
        try:
            manifest = cls.parse(data.decode("utf-8"), source)
        except UnicodeDecodeError as exc:
            raise ShardError(f"unreadable manifest {source}: {exc}") from None
        for shard in manifest.shards:  # an object store has no symlinks: the name alone decides
            problem = name_problem(shard.file)
            if problem is not None:
                raise OutsideFolderError(f"{source}: shard file {shard.file!r} {problem}; refused (only names "
                                         f"inside {url} are read)")
        return manifest

    @classmethod
    def parse(cls, text: str, source: str | Path) -> Manifest:
        """A manifest from its JSON text (`source` names it in messages); shard names are
        not checked here (`read` does, against the folder).

        Raises:
            ShardError: unparsable, of another format or version, or malformed.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardError(f"unreadable manifest {source}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ShardError(f"{source} is not a lory shard manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"{source} has format version {data.get('format_version')}; this lory reads version {FORMAT_VERSION}"
            )
        try:
            shards = [ShardInfo(**s) for s in data.pop("shards")]
            known = cls.__dataclass_fields__
            manifest = cls(shards=shards, **{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise ShardError(f"malformed manifest {source}: {exc}") from None
        if not isinstance(manifest.tokenizer, dict) or not _positive_int(manifest.seq_len):
            raise ShardError(f"malformed manifest {source}: tokenizer must be an object and seq_len a positive integer")
        return manifest


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def manifest_path(folder: str | Path) -> Path | None:
    """The manifest file of a shard folder (the current name first, then the legacy one), or None."""
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    The bytes go to a hidden temp file in the same folder, are fsynced, and the temp file is
    renamed over `path`; the folder is fsynced so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
