"""`TopKMoE`: token-choice top-k routing (Switch for k = 1, Mixtral-style for k > 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorytrain.model.config import ModelConfig
from lorytrain.model.dispatch import dispatch
from lorytrain.model.experts import ExpertBank, ExpertPool
from lorytrain.model.moe_layer import MoELayer
from lorytrain.model.numerics import wide
from lorytrain.model.routing import FFNContext, RoutingStats, segment_mean


class TopKMoE(MoELayer):
    """Each token picks its top-k experts by softmax router probability; no capacity limit.

    k = 1 weights the expert's output by its probability p (Switch), k > 1 by the top-k
    probabilities renormalised to sum to 1. After every forward pass `last_aux` holds the
    weighted Switch load-balancing loss E · Σ_i f_i P_i (f_i: share of assignments to
    expert i, P_i: mean router probability) and router z-loss mean(logsumexp(logits)²).
    Routing is per token, so it is causal and the routing mode does not apply.

    Args:
        config: model config (n_experts, top_k, loss weights, segment_len for statistics).
        pool: SaMoE expert pool, or None.
    """

    def __init__(self, config: ModelConfig, pool: ExpertPool | None = None):
        super().__init__()
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = ExpertBank(config.n_experts, config.d_model, config.ffn_dim, pool)
        self.top_k, self.segment_len = config.top_k, config.segment_len
        self.balance_weight, self.z_weight = config.balance_loss_weight, config.z_loss_weight

    def init_routing(self, std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None, state: dict | None = None) -> torch.Tensor:
        batch, length, d = x.shape
        flat = x.reshape(-1, d)
        logits = F.linear(wide(flat), wide(self.router.weight))
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_i, True)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)
        y, counts = dispatch(flat, mask, gates, self.experts)
        n_experts = probs.shape[1]
        share = counts.float() / (flat.shape[0] * self.top_k)
        balance = n_experts * (share * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.last_aux = {"balance_loss": self.balance_weight * balance, "z_loss": self.z_weight * z_loss}
        seg = segment_mean(gates.detach().view(batch, length, -1), self.segment_len)
        self.last_stats = RoutingStats(seg, counts)
        return y.view(batch, length, d)
