"""Reading `torch.distributed.checkpoint` folders without running code they hold.

DCP's `FileSystemReader.read_metadata` unpickles `.metadata` with `pickle.load`, and its
`DefaultLoadPlanner.load_bytes` unpickles every non-tensor item with `weights_only=False`:
a run folder from elsewhere could run anything on `lory train --resume`. Here `.metadata` is
read by an unpickler that admits only DCP's own metadata types (the way torch's
`weights_only` loading admits only tensor types), non-tensor items are read with
`weights_only=True`, and every file name the metadata gives must be a plain name inside the
folder. Tensors were already read with `weights_only=True` by DCP itself.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper, as its planner uses it
from torch.distributed.checkpoint.planner import ReadItem

from lorydata.confine import OutsideFolderError, inside
from lorytrain.errors import LoryTrainError

METADATA_FILE = ".metadata"


def _allowed_globals() -> dict[tuple[str, str], object]:
    classes = [getattr(dcp_metadata, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    allowed = {(c.__module__, c.__qualname__): c for c in classes}
    storage_info = dcp_filesystem._StorageInfo  # where each item lies: file, offset, length
    allowed[(storage_info.__module__, storage_info.__qualname__)] = storage_info
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # looks a layout up by name
    for name, value in vars(torch).items():  # dtypes pickle as references to torch.<name>
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for path_class in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", path_class.__name__)] = path_class  # StorageMeta.checkpoint_id may be a Path
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `_allowed_globals`: nothing else can be
    constructed or called, so no payload runs."""

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not DCP metadata") from None


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    """The `.metadata` of a DCP folder, read without unpickling anything but DCP metadata and
    checked to name only files inside the folder.

    Raises:
        LoryTrainError: the file is missing, refers to anything else, or names files outside
            the folder (one line naming the file).
    """
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RuntimeError) as exc:  # what a malformed pickle raises inside the allowed types
        raise LoryTrainError(f"refusing {path}: {exc}") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise LoryTrainError(f"refusing {path}: it is not DCP checkpoint metadata")
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise LoryTrainError(f"refusing {path}: it is not DCP checkpoint metadata")
        try:
            inside(folder, info.relative_path, source=path, entry="storage file")
        except OutsideFolderError as exc:
            raise LoryTrainError(str(exc)) from None
        if info.transform_descriptors:  # extension transforms (e.g. decompression) lory never writes
            raise LoryTrainError(f"refusing {path}: storage transforms {list(info.transform_descriptors)!r}")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise LoryTrainError(f"refusing {path}: bad offset or length for {info.relative_path!r}")
    if metadata.storage_meta is None:
        metadata.storage_meta = dcp_metadata.StorageMeta()
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A `FileSystemReader` whose metadata comes from `read_metadata` (read once, here,
    before DCP starts: a refusal is one `LoryTrainError`, not a logged traceback).

    Args:
        folder: the DCP folder (a checkpoint's `optimizer/`).
    """

    def __init__(self, folder: str | Path):
        super().__init__(str(folder))
        self._metadata = read_metadata(folder)

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor items (optimizer hyperparameters: numbers,
    tuples, strings) with `weights_only=True` instead of full unpickling."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise LoryTrainError(f"refusing optimizer item {read_item.dest_index.fqn}: {unpickling_reason(exc)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def unpickling_reason(exc: BaseException) -> str:
    """One line of why `torch.load(weights_only=True)` refused a file (its message is long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), None)
    return f"it holds objects weights-only loading refuses ({detail or (lines[0] if lines else type(exc).__name__)})"
