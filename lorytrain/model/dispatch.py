"""Sparse dispatch: token-expert assignments through their experts, weighted by gates."""

from __future__ import annotations

import torch

from lorytrain.model.experts import ExpertBank
from lorytrain.model.swiglu import grouped_swiglu


def dispatch(x: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor, experts: ExpertBank) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = Σ_{i: mask[t, i]} gates[t, i] · FFN_i(x_t).

    Tokens are gathered per expert (sorted by expert), run through one grouped SwiGLU and
    scattered back; nothing is dropped.

    Args:
        x: tokens (n, d).
        mask: (n, E) bool, which experts process which tokens.
        gates: (n, E) weights of the assignments (differentiable).
        experts: the layer's experts.

    Returns:
        Outputs (n, d) and assignments per expert (E,).
    """
    expert, token = mask.t().nonzero().unbind(1)  # sorted by expert, then token
    counts = torch.bincount(expert, minlength=mask.shape[1])
    y = grouped_swiglu(x[token], experts.weights(), counts.tolist())
    y = y * gates[token, expert].unsqueeze(1).to(y.dtype)
    return torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype, device=x.device).index_add(0, token, y), counts
