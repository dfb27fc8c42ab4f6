"""Decisions every rank must share: "did any rank see X?" and "what did rank 0 decide?".

Identities without a process group, so single-process runs take the same code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks (all_reduce MAX, collective; itself without a process group).

    Args:
        value: this rank's number.
    """
    if not _active():
        return value
    tensor = torch.tensor([value], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (collective)."""
    return bool(max_over_ranks(int(flag)))


def from_main(value):
    """Rank 0's `value` on every rank (a picklable object; collective)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]

