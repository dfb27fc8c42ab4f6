"""Upcycling: turn a trained dense model into an MoE model (Lory's 5% dense warm-up)."""

from __future__ import annotations

import torch

from lorytrain.errors import LoryTrainError
from lorytrain.model.config import ModelConfig
from lorytrain.model.decoder import LoryLM

# fields that must agree between the dense model and its MoE successor
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings")


def upcycle(dense: LoryLM, config: ModelConfig) -> LoryLM:
    """A new MoE model whose experts are copies of `dense`'s FFNs and whose other weights are
    `dense`'s; routers (and EC thresholds) start fresh from the current RNG state.

    Right after upcycling the output equals the dense model's for soft merging (lory, prefix:
    merged weights Σ e_i θ = θ) and for renormalised top-k with k > 1. Switch top-1 and expert
    choice scale each expert output by its gate, so their outputs change by construction.

    Args:
        dense: a model with `ffn="dense"`.
        config: the MoE config; its shape fields must match the dense model's.

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
    with torch.device(weight.device):
        moe = LoryLM(config).to(weight.dtype)
    shared = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    missing, unexpected = moe.load_state_dict(shared, strict=False)
    if unexpected or any(".ffn." not in k for k in missing):
        raise LoryTrainError(f"upcycle: state dicts do not line up (missing {missing}, unexpected {unexpected})")
    for dense_block, moe_block in zip(dense.layers, moe.layers, strict=True):
        moe_block.ffn.experts.load_dense(dense_block.ffn.w.detach())
    moe.set_activation_checkpointing(dense.activation_checkpointing or config.activation_checkpointing)
    return moe.train(dense.training)
