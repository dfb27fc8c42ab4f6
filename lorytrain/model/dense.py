"""The dense SwiGLU FFN of the baseline and of the dense warm-up before upcycling."""

from __future__ import annotations

import torch
from torch import nn

from lorytrain.model.routing import FFNContext
from lorytrain.model.swiglu import swiglu


class DenseFFN(nn.Module):
    """FFN(x) = (silu(x W1) ⊙ x W3) W2 with `w13` = [W1 | W3] (d, 2f) and `w2` (f, d).

    Args:
        d_model: hidden size d.
        ffn_dim: inner size f.
    """

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(d_model, 2 * ffn_dim))
        self.w2 = nn.Parameter(torch.empty(ffn_dim, d_model))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward(self, x: torch.Tensor, ctx: FFNContext | None = None, state: dict | None = None) -> torch.Tensor:
        return swiglu(x, self.w13, self.w2)
