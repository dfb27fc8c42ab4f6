"""Expert weights of an MoE layer: owned by the layer, or soft combinations of a SaMoE pool."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorytrain.model.numerics import wide


class ExpertPool(nn.Module):
    """SaMoE's global pool of G SwiGLU FFNs shared by every MoE layer.

    Args:
        size: G, experts in the pool.
        d_model: hidden size d.
        ffn_dim: inner size f.
    """

    def __init__(self, size: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(size, d_model, 2 * ffn_dim))
        self.w2 = nn.Parameter(torch.empty(size, ffn_dim, d_model))

    def reset_parameters(self, std: float, out_std: float) -> None:
        # a layer expert averages ~G pool entries; scale so that it starts with the usual std
        scale = math.sqrt(self.w13.shape[0])
        nn.init.normal_(self.w13, std=std * scale)
        nn.init.normal_(self.w2, std=out_std * scale)


class ExpertBank(nn.Module):
    """The E SwiGLU experts of one layer: `w13` (E, d, 2f) and `w2` (E, f, d).

    With a pool, expert e of this layer is θ_e = Σ_g α_e,g P_g with α = softmax(mix_logits[e])
    (SaMoE), and the layer owns only the (E, G) logits.

    Args:
        n_experts: E.
        d_model: hidden size d.
        ffn_dim: inner size f.
        pool: a shared `ExpertPool`, or None for experts of the layer's own.
    """

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int, pool: ExpertPool | None = None):
        super().__init__()
        self.n_experts = n_experts
        # a plain attribute, not a submodule: the pool is registered once, on the model
        object.__setattr__(self, "pool", pool)
        if pool is None:
            self.w13 = nn.Parameter(torch.empty(n_experts, d_model, 2 * ffn_dim))
            self.w2 = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        else:
            self.mix_logits = nn.Parameter(torch.empty(n_experts, pool.w13.shape[0]))

    def reset_parameters(self, std: float, out_std: float) -> None:
        if self.pool is None:
            nn.init.normal_(self.w13, std=std)
            nn.init.normal_(self.w2, std=out_std)
        else:
            nn.init.normal_(self.mix_logits, std=1.0)  # distinct mixtures, so experts start apart

    def merge_sources(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Coefficients over source FFNs and those FFNs' weights, for soft merging.

        Σ_e coef_e θ_e = Σ_g (coef · α)_g P_g, so a pooled layer merges straight from the pool
        without building its own experts.

        Args:
            coef: (..., E) weights over this layer's experts.

        Returns:
            (coef over sources (..., G or E), w13, w2).
        """
        if self.pool is None:
            return coef, self.w13, self.w2
        return coef @ wide(self.mix_logits).softmax(-1).to(coef.dtype), self.pool.w13, self.pool.w2

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's experts as (E, d, 2f) and (E, f, d) tensors."""
        if self.pool is None:
            return self.w13, self.w2
        mix = wide(self.mix_logits).softmax(-1).to(self.pool.w13.dtype)
        return torch.einsum("eg,gij->eij", mix, self.pool.w13), torch.einsum("eg,gij->eij", mix, self.pool.w2)

    def merged(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One merged FFN per row of `coef` (B, E): (B, d, 2f) and (B, f, d), for decoding."""
        coef, w13, w2 = self.merge_sources(coef)
        coef = coef.to(w13.dtype)
        n = coef.shape[0]
        return (coef @ w13.flatten(1)).view(n, *w13.shape[1:]), (coef @ w2.flatten(1)).view(n, *w2.shape[1:])

    @torch.no_grad()
    def load_dense(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy one dense FFN into every expert (upcycling)."""
        self.w13.copy_(w13.unsqueeze(0).expand_as(self.w13))
        self.w2.copy_(w2.unsqueeze(0).expand_as(self.w2))
