"""Expert weights of an MoE layer: owned by the layer, or soft combinations of a SaMoE pool.

Every FFN is stored neuron-major as (f, 3, d) (see `swiglu`); a bank of E experts is (E, f, 3, d).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorytrain.model.numerics import wide
from lorytrain.model.swiglu import DOWN


def init_ffn_(w: torch.Tensor, std: float, out_std: float) -> None:
    """Gate and up rows ~ N(0, std), down rows ~ N(0, out_std), for any (..., f, 3, d) tensor."""
    with torch.no_grad():
        nn.init.normal_(w, std=std)
        w[..., DOWN, :].mul_(out_std / std)


class ExpertPool(nn.Module):
    """SaMoE's global pool of G SwiGLU FFNs shared by every MoE layer.

    Args:
        size: G, experts in the pool.
        d_model: hidden size d.
        ffn_dim: inner size f.
    """

    def __init__(self, size: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(size, ffn_dim, 3, d_model))

    def reset_parameters(self, std: float, out_std: float) -> None:
        # a layer expert averages ~G pool entries; scale so that it starts with the usual std
        scale = math.sqrt(self.w.shape[0])
        init_ffn_(self.w, std * scale, out_std * scale)


class ExpertBank(nn.Module):
    """The E SwiGLU experts of one layer, `w` (E, f, 3, d).

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
            self.w = nn.Parameter(torch.empty(n_experts, ffn_dim, 3, d_model))
        else:
            self.mix_logits = nn.Parameter(torch.empty(n_experts, pool.w.shape[0]))

    def reset_parameters(self, std: float, out_std: float) -> None:
        if self.pool is None:
            init_ffn_(self.w, std, out_std)
        else:
            nn.init.normal_(self.mix_logits, std=1.0)  # distinct mixtures, so experts start apart

    def merge_sources(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients over source FFNs and those FFNs, for soft merging.

        Σ_e coef_e θ_e = Σ_g (coef · α)_g P_g, so a pooled layer merges straight from the pool
        without building its own experts.

        Args:
            coef: (..., E) weights over this layer's experts.

        Returns:
            (coef over sources (..., G or E), sources (G or E, f, 3, d)).
        """
        if self.pool is None:
            return coef, self.w
        return coef @ wide(self.mix_logits).softmax(-1).to(coef.dtype), self.pool.w

    def weights(self) -> torch.Tensor:
        """This layer's experts (E, f, 3, d)."""
        if self.pool is None:
            return self.w
        mix = wide(self.mix_logits).softmax(-1).to(self.pool.w.dtype)
        return (mix @ self.pool.w.flatten(1)).view(-1, *self.pool.w.shape[1:])

    def merged(self, coef: torch.Tensor) -> torch.Tensor:
        """One merged FFN (B, f, 3, d) per row of `coef` (B, E), for decoding."""
        coef, sources = self.merge_sources(coef)
        return (coef.to(sources.dtype) @ sources.flatten(1)).view(-1, *sources.shape[1:])
