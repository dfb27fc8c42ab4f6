"""Per-rank random number generator states for checkpoints.

Each rank saves the torch CPU, numpy and Python states and the state of *its own* device
generator (not every visible device's), to `rng/rank-<r>.pt` in the checkpoint. On resume a
rank restores its own file; a rank the saving run did not have (more processes now) restores
rank 0's. A saved device state is only applied to a device this process owns, so a run saved
on 8 GPUs resumes on 1 (or on CPU) without touching generators that are not there.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (tensors and plain types only, loadable with weights_only).

    Args:
        device: the process's training device; a CUDA device's generator state is included.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def _plain(value):
    """Tuples of tuples to lists, numpy scalars to Python: what weights_only loading accepts."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state` output on this process.

    The device generator is restored only on a CUDA `device`. Older checkpoints hold a list
    of every visible device's state under "cuda"; the entry of this process's device index is
    used when there is one, and none otherwise (the generator keeps its seed).

    Args:
        state: a saved `rng_state`.
        device: this process's training device.
    """
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type != "cuda":
        return
    if "device" in state:
        torch.cuda.set_rng_state(state["device"], device)
    elif "cuda" in state and (device.index or 0) < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][device.index or 0], device)
