"""Tensor helpers that work alike on plain tensors and on FSDP2's sharded DTensors, so that
code building a model or its optimizer state touches only this process's shards."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered when sharded (a collective), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def fill_shard_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's part of `full` into `target` (a DTensor's local shard, or all of
    a plain tensor). `full` may be a broadcast view (`expand`): the part is a view of it, so
    nothing but the target's own shard is written, and nothing is communicated."""
    if isinstance(target, DTensor):
        target.to_local().copy_(local_part(full, target))
    else:
        target.copy_(full)


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The view of `full` that this process holds of a tensor laid out as `like`: mesh
    dimension by mesh dimension, `Shard(d)` keeps this rank's `torch.chunk` of dim d (the
    split DTensor and FSDP2 use) and `Replicate` keeps everything."""
    part, mesh = full, like.device_mesh
    for mesh_dim, placement in enumerate(like.placements):
        if type(placement) is Shard:  # not a subclass such as _StridedShard, which splits otherwise
            chunks = torch.chunk(part, mesh.size(mesh_dim), dim=placement.dim)
            rank = mesh.get_local_rank(mesh_dim)
            part = chunks[rank] if rank < len(chunks) else part.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"filling a shard laid out as {placement}")
    return part


@torch.no_grad()
def copy_shard_(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target[:] = source` for tensors of one shape, shard by shard when both are laid
    out alike (no communication), else through the whole of `source`."""
    alike = (isinstance(target, DTensor) and isinstance(source, DTensor)
             and target.device_mesh == source.device_mesh and target.placements == source.placements)
    if alike:
        target.to_local().copy_(source.to_local())
    else:
        fill_shard_(target, full_tensor(source))
