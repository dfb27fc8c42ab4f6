"""Causal multi-head self-attention with RoPE through `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorytrain.model.cache import LayerCache
from lorytrain.model.rope import apply_rope


class Attention(nn.Module):
    """Fused QKV projection, RoPE on queries and keys, SDPA, output projection.

    Args:
        d_model: hidden size.
        n_heads: heads; head size d_model / n_heads.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        """Args:
            x: (B, n, d) normed hidden states.
            cos, sin: RoPE angles (B or 1, n, head_dim / 2) of the n positions.
            positions: absolute positions (B or 1, n).
            cache: this layer's KV cache; None for a plain causal pass over positions 0..n-1.
        """
        batch, n, d = x.shape
        q, k, v = self.wqkv(x).view(batch, n, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            keys, values = cache.update(k, v, positions)
            # a query sees every cached key at or before its own position; keys past a
            # sequence's end (padding, unwritten slots) are never at or before it
            visible = torch.arange(keys.shape[2], device=x.device) <= positions.unsqueeze(-1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                                 attn_mask=visible.unsqueeze(1))
        return self.wo(out.transpose(1, 2).reshape(batch, n, d))
