"""RMSNorm (Zhang & Sennrich 2019), computed in at least float32 whatever the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from lorytrain.model.numerics import wide


class RMSNorm(nn.Module):
    """x / rms(x) · weight.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = wide(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * wide(self.weight)).to(x.dtype)
