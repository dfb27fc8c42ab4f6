"""Process groups and model wrapping: one process on CPU, DDP or FSDP2 under torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorytrain.errors import LoryTrainError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when there is one (NCCL on CUDA, gloo on CPU).

    Args:
        device: "auto" (CUDA when torch sees a GPU), "cuda" or "cpu".

    Raises:
        LoryTrainError: "cuda" asked for where torch sees no GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise LoryTrainError("--device cuda: torch sees no CUDA GPU here")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def shutdown_distributed(wait_for_all: bool = True) -> None:
    """Leave the process group (after every rank got here, unless this rank failed). Without
    it, gloo's threads are torn down at interpreter exit while still live, aborting the process."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, parallel: str, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap for data parallelism: DDP (default) or FSDP2 (`fully_shard` per block).

    Args:
        model: the model, already on `env.device` (or, for FSDP, already sharded by
            `shard_model`, which is then kept as it is).
        env: the process environment.
        parallel: "auto" (DDP), "ddp" or "fsdp".
        param_dtype: FSDP's compute dtype of the gathered weights (bf16 halves the
            all-gather traffic); None keeps the weights' own.
    """
    if not env.distributed:
        return model
    if parallel == "fsdp":
        if not is_fsdp_module(model):
            shard_model(model, param_dtype)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    # MoE layers can leave parameters without gradient in a step (a router whose only
    # segment routes on itself with a stop-gradient, a top-k expert that got no token).
    unused = bool(getattr(getattr(model, "config", None), "is_moe", False))
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def shards_in_place(env: DistEnv, parallel: str) -> bool:
    """Whether this run shards its model with FSDP2 (in place, possibly still on meta)."""
    return env.distributed and parallel == "fsdp"


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 in place: `fully_shard` each block, then the root. Works on a model on the meta
    device too, which then allocates only its shards (`to_empty`).

    Args:
        model: a `LoryLM`.
        param_dtype: compute dtype of the gathered weights, e.g. bf16 under bf16 precision;
            gradients are still reduced in fp32 and the sharded weights and Adam state stay
            fp32 (as torchtitan does).
    """
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise LoryTrainError("--parallel fsdp needs torch with FSDP2 (torch.distributed.fsdp.fully_shard)") from None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in getattr(model, "layers", []):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_sharded(model: nn.Module) -> bool:
    return dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module, all_ranks: bool = False) -> dict:
    """A full, unsharded state dict (collective under FSDP2).

    Args:
        model: the (possibly wrapped) model.
        all_ranks: every rank gets the full weights (on its device); otherwise, under FSDP,
            only rank 0 gets them (on CPU), which is all a checkpoint needs.
    """
    bare = unwrap(model)
    if _is_sharded(bare):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))
    return {k: v.detach().cpu() for k, v in bare.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, all_ranks: bool = False) -> dict:
    """The optimizer state keyed by parameter names, unsharded (collective under FSDP).

    Names instead of positions make it loadable into another wrapping (DDP, FSDP, none) and
    let upcycling map dense FFN moments onto experts by name.

    Args:
        model: the model the optimizer updates.
        optimizer: its optimizer.
        all_ranks: as in `full_state_dict`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=_is_sharded(unwrap(model)) and not all_ranks)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_optimizer_state` (every rank passes the same full state). Parameters
    without saved state (routers right after upcycling) start fresh."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that a clock read afterwards includes it
    (CUDA kernels run asynchronously; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; from pinned memory (a dataloader with `pin_memory`) the
    CUDA copy does not block the host, which goes on to queue the step's kernels."""
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value
