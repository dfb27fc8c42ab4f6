"""Parameter counts and training FLOPs per token of a config (for presets and MFU)."""

from __future__ import annotations

from dataclasses import dataclass

from lorytrain.model.config import SEGMENT_ROUTED, ModelConfig


@dataclass
class ParamCount:
    """Parameters of a config.

    Args:
        total: every parameter.
        active: parameters one token uses (one merged expert for lory/prefix, k experts for
            top-k, c experts on average for expert choice), embeddings included.
        embedding: input embedding plus (untied) output projection.
    """

    total: int
    active: int
    embedding: int


def _experts_per_token(config: ModelConfig) -> float:
    if config.ffn == "topk":
        return config.top_k
    if config.ffn == "expert-choice":
        return config.capacity_factor
    return 1.0


def count_parameters(config: ModelConfig) -> ParamCount:
    """Parameters of `build_model(config)`, counted without building it."""
    d, f, n_exp = config.d_model, config.ffn_dim, config.n_experts
    expert = 3 * d * f
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    shared = config.n_layers * (4 * d * d + 2 * d) + d  # attention, two norms per block, final norm
    if not config.is_moe:
        total = embedding + shared + config.n_layers * expert
        return ParamCount(total, total, embedding)
    router = d * n_exp
    if config.samoe_pool:
        layer_ffn = router + n_exp * config.samoe_pool
        pool = config.samoe_pool * expert
    else:
        layer_ffn, pool = router + n_exp * expert, 0
    total = embedding + shared + config.n_layers * layer_ffn + pool
    active = embedding + shared + config.n_layers * (router + round(_experts_per_token(config) * expert))
    return ParamCount(total, active, embedding)


def flops_per_token(config: ModelConfig, seq_len: int, batch_tokens: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token, for MFU.

    6 FLOPs per active matmul parameter (embedding lookups excluded) plus 12·layers·d·seq_len
    for attention scores (PaLM's convention, as nanoGPT and torchtitan report it), plus the
    routing work: the token routers, and for lory/prefix the merge, 2·E·3df FLOPs per segment
    forward and twice that backward (dθ_i and de), i.e. 18·E·d·f/T per token and layer (E/T
    of the FFN). Recomputing merged weights in backward (6·E·d·f per segment) is not counted,
    as MFU excludes recomputation.

    Args:
        config: model config.
        seq_len: tokens per sequence.
        batch_tokens: tokens per forward pass; only SaMoE top-k, which builds its layer
            experts from the pool once per pass, needs it (default seq_len).
    """
    d, f, layers, n_exp = config.d_model, config.ffn_dim, config.n_layers, config.n_experts
    head = config.vocab_size * d
    per_layer = 4 * d * d + _experts_per_token(config) * 3 * d * f
    flops = 6 * (head + layers * per_layer) + 12 * layers * d * seq_len
    if not config.is_moe:
        return float(flops)
    sources = config.samoe_pool or n_exp
    if config.ffn in SEGMENT_ROUTED or (config.ffn == "expert-choice" and config.ec_level == "segment"):
        routing = 6 * d * n_exp / config.segment_len
    else:
        routing = 6 * d * n_exp
    if config.ffn in SEGMENT_ROUTED:
        routing += 18 * sources * d * f / config.segment_len
    elif config.samoe_pool:
        routing += 18 * n_exp * sources * d * f / (batch_tokens or seq_len)
    return float(flops + layers * routing)
