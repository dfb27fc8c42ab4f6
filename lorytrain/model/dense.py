"""The dense SwiGLU FFN of the baseline and of the dense warm-up before upcycling."""

from __future__ import annotations

import torch
from torch import nn

from lorytrain.model.experts import init_ffn_
from lorytrain.model.routing import FFNContext
from lorytrain.model.swiglu import swiglu


class DenseFFN(nn.Module):
    """FFN(x) = (silu(x W1) ⊙ x W3) W2, stored neuron-major as `w` (f, 3, d) like the experts.

    Args:
        d_model: hidden size d.
        ffn_dim: inner size f.
    """

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(ffn_dim, 3, d_model))

    def init_weights(self, std: float, out_std: float) -> None:
        init_ffn_(self.w, std, out_std)

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None, state: dict | None = None) -> torch.Tensor:
        return swiglu(x, self.w)
