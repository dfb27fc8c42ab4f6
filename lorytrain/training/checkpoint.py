"""Verified, atomic, resumable checkpoints: safetensors weights, sharded optimizer state,
per-rank RNG and trainer state.

Layout of `RUN_DIR/checkpoints/step-00000100/`:

- `model.safetensors`: weights (full, unsharded; readable by any safetensors tool)
- `optimizer/`: optimizer state in `torch.distributed.checkpoint` format, written and read
  shard by shard (each rank handles only its part; no rank holds the whole state)
- `rng/rank-<r>.pt`: each rank's RNG states (`lorytrain.training.rng`)
- `state.json`: step, tokens, data position, model phase, full config, tokenizer identity, and
  under "files" the size and sha256 of every other file of the checkpoint

A checkpoint is written into a hidden temp folder and renamed into place, and `latest` is
replaced atomically afterwards, so a crash, a full disk or a second signal leaves the earlier
checkpoints intact. Readers verify sizes and hashes first and fall back to the newest valid
checkpoint when the newest is damaged.

Nothing a checkpoint holds is unpickled: the optimizer's DCP metadata is read by a restricted
unpickler (`lorytrain.training.dcp_safe`), every other `.pt` with `weights_only=True`, and the
file names `state.json` lists must be plain names inside the checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lorydata.confine import OutsideFolderError, inside
from lorydata.hashing import file_sha256
from lorydata.manifest import atomic_write_bytes, fsync_dir
from lorytrain.agreement import any_rank, from_main
from lorytrain.errors import LoryTrainError
from lorytrain.training.dcp_safe import SafeFileSystemReader, SafeLoadPlanner, unpickling_reason
from lorytrain.training.distributed import load_full_optimizer_state, unwrap
from lorytrain.training.rng import rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's `step-NNNNNNNN` folders, newest first (temp and set-aside folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), reverse=True)


def _sha256_all(paths: list[Path]) -> list[str]:
    # one thread per file: hashlib releases the GIL, so the weights and every rank's
    # optimizer shard hash in parallel
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def _file_records(folder: Path) -> dict[str, dict]:
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE]
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(paths, _sha256_all(paths), strict=True)}


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(sub)


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict | None, state: dict, keep_last: int = 2,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    device: torch.device | None = None, rank: int = 0) -> Path | None:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    Collective under torchrun: every rank calls it and writes its shard of the optimizer state
    and its RNG state; rank 0 writes the weights, hashes every file into `state.json` and
    renames the folder into place.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model_state: full state dict of the unwrapped model (rank 0; None on the others).
        state: JSON-serialisable trainer state (step, tokens, data position, config, ...).
        keep_last: checkpoints to keep (≥ 1).
        model: the model the optimizer updates (with `optimizer`; sharded under FSDP).
        optimizer: its optimizer; None writes no optimizer state.
        device: this rank's device (its device RNG state is saved).
        rank: this process's rank.

    Returns:
        The checkpoint folder on rank 0, None on the other ranks.

    Raises:
        LoryTrainError: writing failed on some rank (e.g. a full disk); nothing was renamed
            into place, the temp folder is removed and earlier checkpoints are untouched.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    try:
        return _save(root, name, tmp, step, model_state, state, keep_last, model, optimizer, device, rank)
    except BaseException:  # Ctrl-C or a failure on the way: leave no temp folder behind
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save(root: Path, name: str, tmp: Path, step: int, model_state: dict | None, state: dict, keep_last: int,
          model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None, device: torch.device | None,
          rank: int) -> Path | None:
    final = root / name
    main = rank == 0
    problem = None
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    except OSError as exc:
        problem = exc
    if any_rank(problem is not None):
        _fail(name, root, tmp, problem, main)
    try:
        if optimizer is not None:
            _save_optimizer(model, optimizer, tmp / OPTIMIZER_DIR)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        # through a Python file: a full disk then raises an OSError that keeps its errno
        with open(tmp / RNG_DIR / f"rank-{rank:05d}.pt", "wb") as f:
            torch.save(rng_state(device or torch.device("cpu")), f)
        if main:
            # clone: tied weights share storage, which safetensors refuses to save twice
            tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in (model_state or {}).items()}
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    except (OSError, RuntimeError, SafetensorError, dcp.CheckpointException) as exc:
        problem = exc  # torch's writers and dcp wrap the OSError (e.g. ENOSPC) of whichever rank failed
    if any_rank(problem is not None):
        _fail(name, root, tmp, problem, main)
    try:
        if main:
            _fsync_tree(tmp)
            record = {**state, "files": _file_records(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(root)
            atomic_write_bytes(root / LATEST, name.encode())
    except OSError as exc:
        problem = exc
    if any_rank(problem is not None):
        _fail(name, root, tmp, problem, main)
    if not main:
        return None
    older = [p for p in checkpoint_dirs(root.parent) if p.name <= name]
    for old in older[max(1, keep_last):]:
        shutil.rmtree(old)
    return final


def _fail(name: str, root: Path, tmp: Path, problem: BaseException | None, main: bool) -> None:
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if problem is None:
        raise LoryTrainError(f"writing checkpoint {name} failed on another rank; earlier checkpoints in {root} "
                             "are intact")
    if isinstance(problem, dcp.CheckpointException) and problem.failures:
        problem = next(iter(problem.failures.values()))[0]  # (exception, traceback) of the first failed rank
    code = _errno_of(problem)
    reason = os.strerror(code) if code else (str(problem).strip().splitlines() or [type(problem).__name__])[0]
    raise LoryTrainError(f"cannot write checkpoint {name} in {root}: {reason}{_HINTS.get(code, '')}; earlier "
                         "checkpoints are intact") from None


def _errno_of(problem: BaseException) -> int | None:
    """The errno behind a write failure: torch's zip writer raises a RuntimeError whose context
    is the OSError, safetensors only names it in its message (`... (os error 28)`)."""
    seen = set()
    while problem is not None and id(problem) not in seen:
        seen.add(id(problem))
        if isinstance(problem, OSError) and problem.errno:
            return problem.errno
        found = re.search(r"\(os error (\d+)\)", str(problem))
        if found:
            return int(found.group(1))
        problem = problem.__cause__ or problem.__context__
    return None


_HINTS = {errno.ENOSPC: " (disk full: free space or point --out elsewhere)",
          errno.EDQUOT: " (disk quota exceeded: free space or point --out elsewhere)",
          errno.EFBIG: " (over the file size limit, see `ulimit -f`)"}


@contextmanager
def _quiet_dcp():
    """dcp warns that it assumes one process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:


    # Sharded state dict: each FSDP rank writes its own shards; replicated (DDP) state once.
    state = get_optimizer_state_dict(unwrap(model), optimizer)
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(folder))


# ---- reading -----------------------------------------------------------------------------
def read_state(path: str | Path) -> dict:
    """A checkpoint's `state.json`.

    Raises:
        LoryTrainError: it is missing, not JSON or not a JSON object.
    """
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LoryTrainError(f"cannot read {file}: {exc}") from None
    if not isinstance(state, dict):
        raise LoryTrainError(f"{file} is not a JSON object")
    return state


def verify_checkpoint(path: str | Path, only: tuple[str, ...] | None = None) -> str | None:
    """Check a checkpoint's files against the sizes and sha256 in its `state.json`.

    Args:
        path: the checkpoint folder.
        only: check just these files or folders (e.g. ("model.safetensors",) to evaluate).

    Returns:
        None when it is intact, else what is wrong (one line).
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing (incomplete checkpoint)"
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({exc})"
    files = state.get("files") if isinstance(state, dict) else {}
    if files is None:  # written before checkpoints were hashed: presence is all we can check
        return None if (path / MODEL_FILE).is_file() else f"{MODEL_FILE} is missing"
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                              for e in files.values()):
        return f"{STATE_FILE} has no valid \"files\" record"
    for name in files:  # the folder may come from anywhere: read nothing outside it
        try:
            inside(path, name, source=path / STATE_FILE, entry="file")
        except OutsideFolderError as exc:
            return str(exc)
    wanted = {name: expected for name, expected in files.items()
              if only is None or any(name == o or name.startswith(o + "/") for o in only)}
    for name, expected in wanted.items():  # cheap checks first
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written (truncated?)"
    digests = _sha256_all([path / name for name in wanted])
    for (name, expected), digest in zip(wanted.items(), digests, strict=True):
        if digest != expected["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def find_valid_checkpoint(run_dir: str | Path, log: Callable[[str], None], only: tuple[str, ...] | None = None,
                          set_aside: bool = False) -> Path | None:
    """The newest checkpoint of a run that passes `verify_checkpoint`.

    Each damaged newer checkpoint is reported through `log` by name, and so is the fallback.

    Args:
        run_dir: the run folder.
        log: where the reports go.
        only: as in `verify_checkpoint`.
        set_aside: rename damaged checkpoints newer than the one returned to
            `step-NNNNNNNN.damaged` (`.damaged-2`, ... when that exists), so the resumed run's
            own checkpoints and pruning do not collide with them (nothing is deleted).

    Returns:
        The checkpoint folder, or None when the run has no checkpoint at all.

    Raises:
        LoryTrainError: there are checkpoints but none is valid (one line naming each problem).
    """
    candidates = checkpoint_dirs(run_dir)
    damaged = []
    for path in candidates:
        problem = verify_checkpoint(path, only)
        if problem is None:
            if damaged:
                log(f"falling back to checkpoint {path.name}, the newest valid one")
            for bad, _ in damaged if set_aside else []:
                aside = _set_aside_name(bad)
                bad.rename(aside)
                log(f"set the damaged {bad.name} aside as {aside.name}")
            return path
        log(f"checkpoint {path.name} is damaged: {problem}")
        damaged.append((path, problem))
    if damaged:
        details = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise LoryTrainError(f"no valid checkpoint in {Path(run_dir) / CHECKPOINTS} ({details})")
    return None


def _set_aside_name(path: Path) -> Path:
    """`step-N.damaged`, or `step-N.damaged-2`, -3, ... when earlier damage at the same step
    was set aside already (nothing is ever overwritten)."""
    candidate, n = path.with_name(path.name + ".damaged"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.damaged-{n}")
    return candidate


def find_checkpoint_on_all_ranks(run_dir: str | Path, log: Callable[[str], None], rank: int) -> Path | None:
    """`find_valid_checkpoint` done once by rank 0 (which reads and hashes the files) and
    shared with every rank; its error is raised on every rank."""
    found, error = None, None
    if rank == 0:
        try:
            found = find_valid_checkpoint(run_dir, log, set_aside=True)
        except LoryTrainError as exc:
            error = str(exc)
    found, error = from_main((found, error))
    if error:
        raise LoryTrainError(error)
    return found


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a checkpoint's weights into `model` in place.

    Under FSDP2 each rank reads only the rows of its own shards from `model.safetensors`
    (safetensors slices are read lazily from the file), so no rank holds the full weights.

    Args:
        model: the (possibly wrapped or sharded) model, with the checkpoint's architecture.
        path: the checkpoint folder.

    Raises:
        LoryTrainError: the weights do not fit the model, or the file is unreadable (only
            possible for a checkpoint written before files were hashed, or damaged since).
    """
    target = unwrap(model).state_dict()
    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = set(f.keys())
            if saved != set(target):
                raise LoryTrainError(f"checkpoint {path} does not fit the model (missing {sorted(set(target) - saved)[:3]}"
                                     f", unexpected {sorted(saved - set(target))[:3]})")
            for name, tensor in target.items():
                if tuple(f.get_slice(name).get_shape()) != tuple(tensor.shape):
                    raise LoryTrainError(f"checkpoint {path} does not fit the model ({name} is "
                                         f"{tuple(f.get_slice(name).get_shape())} there, {tuple(tensor.shape)} here)")
            with torch.no_grad():
                for name, tensor in target.items():
                    if isinstance(tensor, DTensor):
                        local = tensor.to_local()
                        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                                             tensor.placements)
                        if local.numel():
                            rows = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                            local.copy_(f.get_slice(name)[rows])
                    else:
                        tensor.copy_(f.get_tensor(name))
    except (OSError, SafetensorError) as exc:
        raise LoryTrainError(f"cannot read {file}: {exc}") from None


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint, on CPU (for evaluation and generation in one process).

    Raises:
        LoryTrainError: the file is unreadable.
    """
    file = Path(path) / MODEL_FILE
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise LoryTrainError(f"cannot read {file}: {exc}") from None


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load a checkpoint's optimizer state, each rank reading only its shards.

    Parameters without saved state (a top-k expert that never got a gradient) keep the
    freshly initialised state. Nothing is unpickled beyond DCP metadata and plain values
    (`lorytrain.training.dcp_safe`).

    Args:
        model: the model the optimizer updates (wrapped or not).
        optimizer: the optimizer to fill.
        path: the checkpoint folder.

    Raises:
        LoryTrainError: the optimizer state holds anything else, names files outside its
            folder or does not fit the model (one line).
    """
    path = Path(path)
    if (path / "optimizer.pt").is_file():  # a checkpoint written before sharded optimizer state
        load_full_optimizer_state(model, optimizer, _load_weights_only(path / "optimizer.pt"))
        return
    state = get_optimizer_state_dict(unwrap(model), optimizer)
    reader = SafeFileSystemReader(path / OPTIMIZER_DIR)
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True))
    except dcp.CheckpointException as exc:  # wraps what failed on whichever rank
        failure = next(iter(exc.failures.values()))[0] if exc.failures else exc
        if isinstance(failure, LoryTrainError):
            raise LoryTrainError(f"{failure} (in {path / OPTIMIZER_DIR})") from None
        first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise LoryTrainError(f"cannot load the optimizer state of {path}: {first}") from None
    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state)


def _load_weights_only(file: Path):
    """`torch.load(weights_only=True)` with a refusal as one `LoryTrainError`."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise LoryTrainError(f"refusing {file}: {unpickling_reason(exc)}") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise LoryTrainError(f"cannot read {file}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None


def load_rng_state(path: str | Path, rank: int, device: torch.device) -> None:
    """Restore this rank's RNG states from a checkpoint (rank 0's when the saving run had no
    rank `rank`; see `lorytrain.training.rng`)."""
    path = Path(path)
    own = path / RNG_DIR / f"rank-{rank:05d}.pt"
    source = own if own.is_file() else path / RNG_DIR / "rank-00000.pt"
    if not source.is_file():
        source = path / "rng.pt"  # a checkpoint written before per-rank RNG states
    try:
        set_rng_state(_load_weights_only(source), device)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise LoryTrainError(f"{source} is not an RNG state lory wrote ({type(exc).__name__}: {exc})") from None
