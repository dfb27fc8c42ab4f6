"""`LoryLM`: the LLaMA-style decoder with a pluggable FFN, and `build_model`."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorytrain.errors import LoryTrainError
from lorytrain.model.attention import Attention
from lorytrain.model.cache import ROUTING_MODES, DecodeCache, LayerCache
from lorytrain.model.config import SEGMENT_ROUTED, ModelConfig
from lorytrain.model.dense import DenseFFN
from lorytrain.model.expert_choice import ExpertChoiceMoE
from lorytrain.model.experts import ExpertPool
from lorytrain.model.lory import LoryMoE
from lorytrain.model.norm import RMSNorm
from lorytrain.model.rope import rope_angles
from lorytrain.model.routing import FFNContext, RoutingStats
from lorytrain.model.token_choice import TopKMoE


def make_ffn(config: ModelConfig, pool: ExpertPool | None) -> nn.Module:
    """The FFN layer that `config.ffn` names."""
    if config.ffn == "dense":
        return DenseFFN(config.d_model, config.ffn_dim)
    if config.ffn in SEGMENT_ROUTED:
        return LoryMoE(config, pool)
    if config.ffn == "topk":
        return TopKMoE(config, pool)
    return ExpertChoiceMoE(config)


class Block(nn.Module):
    """Pre-norm decoder block: h + Attn(norm(h)), then h + FFN(norm(h))."""

    def __init__(self, config: ModelConfig, pool: ExpertPool | None):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config.d_model, config.n_heads)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = make_ffn(config, pool)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: FFNContext,
                cache: LayerCache | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, ctx.positions, cache)
        return h + self.ffn(self.ffn_norm(h), ctx, None if cache is None else cache.ffn)


class LoryLM(nn.Module):
    """Decoder-only LM: embedding, `n_layers` blocks, final RMSNorm, output projection.

    Forward contract: `model(input_ids)` (B, L) returns logits (B, L, vocab) with causal
    segment routing exactly as in training. Beside the logits, after every forward pass:

    - `model.aux_losses()`: {"balance_loss", "z_loss"} of top-k layers, already multiplied by
      their weights and averaged over layers (empty for other FFNs); add them to the loss.
    - `model.routing_stats()`: one `RoutingStats` per layer (None for dense layers), with the
      routing weights per segment (B, N, E) and, for sparse layers, assignments per expert.

    Generation: `cache = model.new_cache(B, max_len, routing)`, then one prefill call with
    right-padded prompts and their lengths, then calls that append tokens; see `forward`.

    Args:
        config: validated model config.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.expert_pool = ExpertPool(config.samoe_pool, config.d_model, config.ffn_dim) if config.samoe_pool else None
        self.layers = nn.ModuleList(Block(config, self.expert_pool) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = config.activation_checkpointing
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere, init_std / sqrt(2 n_layers) for the projections that
        write into the residual stream (GPT-2), norms at 1."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        if self.expert_pool is not None:
            self.expert_pool.reset_parameters(std, out_std)
        for block in self.layers:
            nn.init.normal_(block.attn.wqkv.weight, std=std)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            block.ffn.init_weights(std, out_std)
            if self.config.is_moe and self.config.router_init_std:
                block.ffn.init_routing(self.config.router_init_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (training forward passes only)."""
        self.activation_checkpointing = enabled

    def forward(self, input_ids: torch.Tensor, *, routing: str | None = None,
                prompt_lens: torch.Tensor | None = None, cache: DecodeCache | None = None) -> torch.Tensor:
        """Logits (B, n, vocab) of `input_ids` (B, n).

        Args:
            input_ids: token ids.
            routing: "segment" (default: causal segment routing as in training), "causal"
                (the same with the first segment routed token by token on its running mean:
                no logit depends on a later token; inference only) or "prompt" (each MoE
                layer routes once on the mean FFN input of the first prompt_lens tokens and
                uses that merged FFN everywhere). Token-level layers ignore it. With a cache
                the cache's mode applies.
            prompt_lens: (B,) lengths of the prompts. Without a cache they bound what the
                "self" routing of segment 0 and prompt routing average over (None: the whole
                input), so that a full pass over prompt + generated tokens routes exactly as
                cached decoding did. On the prefill they are the unpadded prompt lengths.
            cache: a `DecodeCache`; the first call is the prefill (positions 0..n-1, prompts
                right-padded), later calls append n tokens to every sequence at its own
                position. Logits equal those of one full forward pass over the unpadded
                sequences with the same routing and prompt_lens.
        """
        batch, n = input_ids.shape
        if cache is not None:
            if routing is not None and routing != cache.routing:
                raise LoryTrainError(f"routing {routing!r} differs from the cache's {cache.routing!r}")
            if cache.batch_size != batch:
                raise LoryTrainError(f"the cache holds {cache.batch_size} sequences, got a batch of {batch}")
            if cache.started and prompt_lens is not None:
                raise LoryTrainError("prompt_lens belongs to the first (prefill) call with a cache")
            routing, positions = cache.routing, cache.positions(n)
        else:
            routing = routing or "segment"
            if routing not in ROUTING_MODES:
                raise LoryTrainError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
            positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
        if prompt_lens is not None:
            prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=input_ids.device)
            if prompt_lens.shape != (batch,) or int(prompt_lens.min()) < 1 or int(prompt_lens.max()) > n:
                raise LoryTrainError(f"prompt_lens must hold {batch} lengths between 1 and {n}")
        ctx = FFNContext(routing, prompt_lens, positions)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        h = self.embed(input_ids)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for index, block in enumerate(self.layers):
            if recompute:
                h = checkpoint(block, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = block(h, cos, sin, ctx, None if cache is None else cache.layers[index])
        if cache is not None:
            cache.advance(n, prompt_lens)
        return self.lm_head(self.norm(h))

    def new_cache(self, batch_size: int, max_len: int, routing: str = "segment",
                  dtype: torch.dtype | None = None) -> DecodeCache:
        """An empty `DecodeCache` on the model's device (keys/values in `dtype`, default the
        parameters' dtype). Each MoE layer of the lory family keeps one merged FFN per sequence in it."""
        weight = self.embed.weight
        return DecodeCache(self.config.n_layers, batch_size, max_len, self.config.n_heads, self.config.head_dim,
                           routing, weight.device, dtype or weight.dtype)

    def moe_layers(self) -> list[nn.Module]:
        return [block.ffn for block in self.layers if not isinstance(block.ffn, DenseFFN)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Weighted auxiliary losses of the last forward pass, averaged over MoE layers."""
        collected = defaultdict(list)
        for layer in self.moe_layers():
            for name, value in layer.last_aux.items():
                collected[name].append(value)
        return {name: torch.stack(values).mean() for name, values in collected.items()}

    def routing_stats(self) -> list[RoutingStats | None]:
        """Per layer, the routing of the last forward pass (None for dense layers)."""
        return [getattr(block.ffn, "last_stats", None) for block in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig) -> LoryLM:
    """A freshly initialised `LoryLM` (on the default device; use `with torch.device("meta")`
    to lay out a model without memory)."""
    return LoryLM(config)
