"""Rotary position embedding (Su et al. 2021), half-split ("rotate_half") layout.

Angles are computed from the absolute positions on every call, so there is no table and no
maximum length; with a KV cache every sequence of a batch carries its own positions.
"""

from __future__ import annotations

import torch

from lorytrain.model.numerics import wide


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim / 2), float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, n, H, Dh) by angles (B or 1, n, Dh/2); returns x's dtype."""
    x1, x2 = wide(x).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
