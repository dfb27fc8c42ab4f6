"""Atomic, resumable checkpoints: safetensors weights + optimizer + RNG + trainer state.

Layout of `RUN_DIR/checkpoints/step-00000100/`:

- `model.safetensors`: weights (full, unsharded, on CPU)
- `optimizer.pt`: optimizer state, loaded with `torch.load(weights_only=True)`
- `rng.pt`: torch / CUDA / numpy / python RNG states (tensors and plain types only)
- `state.json`: step, tokens, data position, model phase, full config, tokenizer identity

A checkpoint is written into a hidden temp folder and renamed into place, and `latest`
is replaced atomically afterwards, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorydata.manifest import atomic_write_bytes, fsync_dir
from lorytrain.errors import LoryTrainError

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(value):
    """Tuples of tuples to lists, numpy scalars to Python: what weights_only loading accepts."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, optimizer_state: dict, state: dict,
                    keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model_state: full state dict of the (unwrapped) model.
        optimizer_state: the optimizer's state dict.
        state: JSON-serialisable trainer state (step, tokens, data position, config, ...).
        keep_last: checkpoints to keep (≥ 1).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone: tied weights share storage, which safetensors refuses to save twice
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    for path in tmp.iterdir():
        _fsync_file(path)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    atomic_write_bytes(root / LATEST, name.encode())
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -max(1, keep_last)]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint: {"model", "optimizer", "rng", "state"}.

    Raises:
        LoryTrainError: the checkpoint is incomplete or unreadable.
    """
    path = Path(path)
    try:
        return {
            "model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            "rng": torch.load(path / "rng.pt", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
        }
    except (OSError, RuntimeError, ValueError) as exc:
        raise LoryTrainError(f"cannot read checkpoint {path}: {exc}") from None
