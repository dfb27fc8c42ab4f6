"""`LoryMoE`: the fully differentiable MoE layer of Lory (and the prefix-routing ablation).

Every token of a segment goes through FFN(·; Σ_i e_i θ_i), the soft merge of all E experts
with the segment's routing weights e (see `routing.SegmentRouting`). The merge and the
segment's FFN are batched matmuls over all B·N segments, and merged weights are rebuilt in
the backward pass instead of being stored (`swiglu.merged_swiglu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorytrain.model.config import ModelConfig
from lorytrain.model.experts import ExpertBank, ExpertPool
from lorytrain.model.moe_layer import MoELayer
from lorytrain.model.routing import FFNContext, RoutingStats, SegmentRouting
from lorytrain.model.swiglu import DOWN, GATE, UP, glu, merged_swiglu


class LoryMoE(MoELayer):
    """Causal segment routing + soft merging of E SwiGLU experts.

    Args:
        config: model config; `ffn="prefix"` routes every segment by the first one (SMEAR-style
            prefix routing), anything else by the previous segment (Lory).
        pool: SaMoE expert pool, or None.
    """

    def __init__(self, config: ModelConfig, pool: ExpertPool | None = None):
        super().__init__()
        rule = "prefix" if config.ffn == "prefix" else "shift"
        self.routing = SegmentRouting(config.d_model, config.n_experts, config.segment_len, rule, config.first_segment)
        self.experts = ExpertBank(config.n_experts, config.d_model, config.ffn_dim, pool)
        self.merge_chunk, self.merge_tile = config.merge_chunk, config.merge_tile

    def init_routing(self, std: float) -> None:
        self.routing.init_weights(std)

    def forward(self, x: torch.Tensor, ctx: FFNContext, state: dict | None = None) -> torch.Tensor:
        """Args:
            x: FFN inputs (B, L, d).
            ctx: routing mode, prompt lengths and positions.
            state: this layer's decoding state (None without a cache; empty on the prefill).
        """
        if state:
            return self._decode(x, ctx, state)
        batch, length, d = x.shape
        weights, seg_len = self.routing(x, ctx)
        n_seg = weights.shape[1]
        xs = F.pad(x, (0, 0, 0, n_seg * seg_len - length)) if n_seg * seg_len != length else x
        first = self.routing.running_first(x, ctx)
        if first is None:
            y = self._merged(xs.reshape(batch * n_seg, seg_len, d), weights.reshape(batch * n_seg, -1))
            y = y.view(batch, n_seg * seg_len, d)
        else:  # "causal": segment 0 token by token (one merge per token), the rest per segment
            head = first.shape[1]
            parts = [self._merged(x[:, :head].reshape(batch * head, 1, d), first.reshape(batch * head, -1))]
            if n_seg > 1:
                rest = n_seg - 1
                parts.append(self._merged(xs[:, seg_len:].reshape(batch * rest, seg_len, d),
                                          weights[:, 1:].reshape(batch * rest, -1)))
            y = torch.cat([part.view(batch, -1, d) for part in parts], dim=1)
        self.last_stats = RoutingStats(weights.detach())
        if state is not None:
            state.update(self.routing.start_decoding(x, weights, ctx))
            with torch.no_grad():
                state["w"] = self.experts.merged(state["current"])
        return y[:, :length]

    def _merged(self, segments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """FFN(·; Σ_i w_s,i θ_i) of every segment's tokens: segments (S, T, d), weights (S, E)."""
        coef, sources = self.experts.merge_sources(weights)
        return merged_swiglu(segments, coef, sources, self.merge_chunk, self.merge_tile)

    @torch.no_grad()
    def _decode(self, x: torch.Tensor, ctx: FFNContext, state: dict) -> torch.Tensor:
        """Token by token with one cached merged FFN per sequence, re-merged when its segment changes."""
        outputs = []
        for i in range(x.shape[1]):
            changed = self.routing.step(state, x[:, i], ctx.positions[:, i], ctx.routing)
            if changed is not None and changed.numel():
                state["w"][changed] = self.experts.merged(state["current"][changed]).to(state["w"].dtype)
            xi, w = x[:, i : i + 1], state["w"].to(x.dtype)
            gated = glu(torch.bmm(xi, w[:, :, GATE].transpose(1, 2)), torch.bmm(xi, w[:, :, UP].transpose(1, 2)))
            outputs.append(torch.bmm(gated, w[:, :, DOWN]))
        self.last_stats = RoutingStats(state["current"].unsqueeze(1).clone())
        return torch.cat(outputs, dim=1)
