"""`ExpertChoiceMoE`: expert-choice routing (Zhou et al. 2022) at token or segment level.

Training (capacity factor c): every expert takes its top ⌈c·n/E⌉ items by router score, where
the items are the L tokens of each sequence (token level) or all B·N segments of the batch
(segment level); an item's output is Σ over the experts that took it of score · FFN_i. This
selection looks at future tokens and at other items, so it is used only in training.

Causal inference rule (ours): during training each expert tracks an EMA of the score of the
last item it took (its capacity threshold); at inference and while decoding an item goes to
every expert whose score reaches that expert's threshold, a per-item decision that uses
nothing after the item and, on average, keeps the training load.

Segment level scores segment k > 0 with the mean FFN input of segment k-1 and segment 0 with
its own mean under a stop-gradient (Lory's causal segment routing), so at inference it is
causal outside the first segment, like Lory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorytrain.model.config import ModelConfig
from lorytrain.model.dispatch import dispatch
from lorytrain.model.experts import ExpertBank
from lorytrain.model.moe_layer import MoELayer
from lorytrain.model.numerics import wide
from lorytrain.model.routing import FFNContext, RoutingStats, SegmentRouting, capacity, segment_mean


class ExpertChoiceMoE(MoELayer):
    """Expert choice with capacity factor c and a threshold rule at inference.

    Args:
        config: model config (n_experts, ec_level, capacity_factor, ec_threshold_momentum,
            segment_len).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.level, self.factor = config.ec_level, config.capacity_factor
        self.momentum, self.segment_len = config.ec_threshold_momentum, config.segment_len
        if self.level == "segment":
            self.routing = SegmentRouting(config.d_model, config.n_experts, config.segment_len)
        else:
            self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = ExpertBank(config.n_experts, config.d_model, config.ffn_dim)
        # uniform scores sit at 1/E; training moves each threshold to its capacity quantile
        self.register_buffer("threshold", torch.full((config.n_experts,), 1.0 / config.n_experts))

    def init_routing(self, std: float) -> None:
        if self.level == "segment":
            self.routing.init_weights(std)
        else:
            nn.init.normal_(self.router.weight, std=std)
        self.threshold.fill_(1.0 / self.experts.n_experts)

    def forward(self, x: torch.Tensor, ctx: FFNContext, state: dict | None = None) -> torch.Tensor:
        """Args:
            x: FFN inputs (B, L, d).
            ctx: routing mode, prompt lengths and positions.
            state: decoding state (None without a cache; empty on the prefill).
        """
        select = self.training and state is None
        if self.level == "token":
            scores = F.linear(wide(x), wide(self.router.weight)).softmax(-1)  # (B, L, E)
            mask = self._select(scores, dim=1) if select else scores >= self.threshold
            gates = scores * mask
            stats = segment_mean(gates.detach(), self.segment_len)
        elif state:
            gates, stats = self._decode_gates(x, ctx, state)
            mask = gates > 0
        else:
            weights, seg_len = self.routing(x, ctx)  # (B, N, E)
            if select:
                seg_mask = self._select(weights.flatten(0, 1), dim=0).view_as(weights)
            else:
                seg_mask = weights >= self.threshold
            seg_gates = weights * seg_mask
            stats = seg_gates.detach()
            gates = seg_gates.repeat_interleave(seg_len, dim=1)[:, : x.shape[1]]
            mask = seg_mask.repeat_interleave(seg_len, dim=1)[:, : x.shape[1]]
            first = self.routing.running_first(x, ctx)
            if first is not None:  # "causal": segment 0 token by token
                head = first.shape[1]
                first_mask = first >= self.threshold
                gates = torch.cat([first * first_mask, gates[:, head:]], dim=1)
                mask = torch.cat([first_mask, mask[:, head:]], dim=1)
            if state is not None:
                state.update(self.routing.start_decoding(x, weights, ctx))
        d, n_experts = x.shape[-1], gates.shape[-1]
        y, counts = dispatch(x.reshape(-1, d), mask.reshape(-1, n_experts), gates.reshape(-1, n_experts), self.experts)
        self.last_stats = RoutingStats(stats, counts)
        return y.view_as(x)

    def _select(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        """Each expert's top-capacity items along `dim`; updates the thresholds."""
        k = capacity(scores.shape[dim], scores.shape[-1], self.factor)
        top, index = scores.topk(k, dim=dim)
        with torch.no_grad():
            kth = top.select(dim, k - 1).detach().reshape(-1, scores.shape[-1]).mean(0)
            self.threshold.mul_(self.momentum).add_((1 - self.momentum) * kth)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, index, True)

    def _decode_gates(self, x: torch.Tensor, ctx: FFNContext, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        gates = []
        for i in range(x.shape[1]):
            self.routing.step(state, x[:, i], ctx.positions[:, i], ctx.routing)
            current = state["current"]
            gates.append(current * (current >= self.threshold))
        gates = torch.stack(gates, dim=1)
        return gates, gates[:, -1:].clone()
