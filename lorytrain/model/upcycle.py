"""Upcycling: turn a trained dense model into an MoE model (Lory's 5% dense warm-up)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorytrain.errors import LoryTrainError
from lorytrain.model.config import ModelConfig
from lorytrain.model.decoder import LoryLM
from lorytrain.model.shards import copy_shard_, fill_shard_, full_tensor

# fields that must agree between the dense model and its MoE successor
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings")


def upcycle(dense: LoryLM, config: ModelConfig, shard: Callable[[LoryLM], object] | None = None) -> LoryLM:
    """A new MoE model whose experts are copies of `dense`'s FFNs and whose other weights are
    `dense`'s; routers (and EC thresholds) start fresh from the current RNG state.

    With `config.upcycle_noise` the copies get small centred noise (`expert_noise`); their mean,
    and so the merged FFN under uniform routing, is still the dense FFN.

    Right after upcycling the output equals the dense model's for soft merging (lory, prefix:
    merged weights Σ e_i θ = θ) and for renormalised top-k with k > 1. Switch top-1 and expert
    choice scale each expert output by its gate, so their outputs change by construction.

    The MoE model is laid out on the meta device first, so that with `shard` (FSDP2's
    `fully_shard`) each process allocates and fills only its own shards: no process ever
    holds all the experts. Dense FFNs are gathered one at a time to fill the expert shards.

    Args:
        dense: a model with `ffn="dense"` (its parameters may be FSDP-sharded).
        config: the MoE config; its shape fields must match the dense model's.
        shard: applied to the MoE model while it is still on the meta device (in place);
            collective when it is, so every process must call `upcycle` alike.

    Returns:
        The MoE model, on the dense model's device and dtype, in the same train/eval mode.

    Raises:
        LoryTrainError: not a dense model, not an MoE config, mismatched shapes, or SaMoE
            (a pool shared by all layers cannot copy each layer's own FFN).
    """
    config = config.validate()
    if dense.config.ffn != "dense":
        raise LoryTrainError(f"upcycle needs a dense model, got ffn={dense.config.ffn!r}")
    if not config.is_moe:
        raise LoryTrainError("upcycle needs an MoE config (ffn other than 'dense')")
    if config.samoe_pool:
        raise LoryTrainError("SaMoE models cannot be upcycled: their expert pool is shared by all layers; "
                             "train them without a dense warm-up")
    mismatched = [f for f in SHAPE_FIELDS if getattr(config, f) != getattr(dense.config, f)]
    if mismatched:
        raise LoryTrainError("the MoE config differs from the dense model in " + ", ".join(
            f"{f} ({getattr(config, f)} vs {getattr(dense.config, f)})" for f in mismatched))
    weight = dense.embed.weight
    device, dtype = weight.device, weight.dtype
    fresh = fresh_routing(config, device, dtype)
    with torch.device("meta"):
        moe = LoryLM(config).to(dtype)
    if shard is not None:
        shard(moe)
    moe.to_empty(device=device)
    if config.tie_embeddings and shard is None:
        moe.lm_head.weight = moe.embed.weight
    source = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    for name, target in [*moe.named_parameters(), *moe.named_buffers()]:
        if name in fresh:
            fill_shard_(target, fresh[name])
        elif name in source:
            copy_shard_(target, source[name])
        elif name.endswith(".ffn.experts.w"):
            ffn = full_tensor(source[name.replace(".ffn.experts.w", ".ffn.w")].detach())
            copies = ffn.unsqueeze(0).expand(target.shape)
            if config.upcycle_noise:
                copies = copies + expert_noise(ffn, target.shape[0], config.upcycle_noise)
            fill_shard_(target, copies)
        else:
            raise LoryTrainError(f"upcycle: no source for the MoE's {name}")
    moe.set_activation_checkpointing(dense.activation_checkpointing or config.activation_checkpointing)
    return moe.train(dense.training)


def expert_noise(ffn: torch.Tensor, n_experts: int, scale: float) -> torch.Tensor:
    """Noise (E, f, 3, d) for E copies of one dense FFN (f, 3, d), from the current RNG state.

    Each of the gate/up/down parts gets Gaussian noise of `scale` times that part's root mean
    square, and the noise is centred over the experts, so the experts differ but average to
    the dense FFN. Every process draws the same full noise (same RNG state), so the shards
    of a sharded model fit together.
    """
    rms = ffn.float().pow(2).mean(dim=(0, 2), keepdim=True).sqrt()  # (1, 3, 1)
    noise = torch.randn((n_experts, *ffn.shape), device=ffn.device, dtype=torch.float32) * (scale * rms)
    return (noise - noise.mean(0, keepdim=True)).to(ffn.dtype)


def fresh_routing(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every MoE layer's routing parameters and buffers (not its experts), initialised in full
    from the current RNG state, by name in the model."""
    with torch.device("meta"):
        scratch = LoryLM(config)
    values = {}
    for index, block in enumerate(scratch.layers):
        ffn: nn.Module = block.ffn
        ffn.to_empty(device=device, recurse=False)
        for child in ffn.children():
            if child is not ffn.experts:
                child.to_empty(device=device)
        with torch.no_grad():
            ffn.init_routing(config.router_init_std or config.init_std)
        for name, value in [*ffn.named_parameters(), *ffn.named_buffers()]:
            if not name.startswith("experts."):
                values[f"layers.{index}.ffn.{name}"] = value.detach().to(dtype)
    return values
