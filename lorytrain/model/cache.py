"""`DecodeCache`: keys, values and routing state for KV-cached incremental decoding.

Batched prompts of different lengths are right-padded and passed once with `prompt_lens`
(the prefill); afterwards every call appends tokens to each sequence at its own next position
(`lengths[b]`). Positions are absolute and per sequence, so RoPE angles and routing segments
are exactly those of a full forward pass over the unpadded sequence.
"""

from __future__ import annotations

import torch

from lorytrain.errors import LoryTrainError

ROUTING_MODES = ("segment", "prompt", "causal")


class LayerCache:
    """One decoder layer's keys and values (B, max_len, H, Dh) and its FFN's routing state.

    Args:
        batch_size: sequences.
        max_len: positions the cache holds per sequence.
        n_heads: attention heads.
        head_dim: size of a head.
        device: where the tensors live.
        dtype: dtype of keys and values.
    """

    def __init__(self, batch_size: int, max_len: int, n_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch_size, max_len, n_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.ffn: dict = {}  # owned by the layer's FFN; empty until the prefill

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n, H, Dh) at `positions` (B, n); return the keys and values (B, H, kv_len, Dh)
        of positions 0..max(positions)."""
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        self.k[rows, positions] = k.to(self.k.dtype)
        self.v[rows, positions] = v.to(self.v.dtype)
        kv_len = int(positions.max()) + 1
        return self.k[:, :kv_len].transpose(1, 2), self.v[:, :kv_len].transpose(1, 2)


class DecodeCache:
    """Per-layer KV caches plus the routing mode and the length of every sequence.

    Build it with `LoryLM.new_cache`. The first forward call with the cache is the prefill:
    right-padded prompts (B, P) with `prompt_lens`; logits at positions ≥ prompt_lens[b] are
    meaningless there and those positions are overwritten by the tokens that follow. Each
    later call appends (B, n) tokens, one row per sequence.

    Args:
        n_layers: decoder layers.
        batch_size: sequences.
        max_len: longest sequence (prompt plus generated tokens).
        n_heads: attention heads.
        head_dim: size of a head.
        routing: "segment" (re-route every segment_len tokens from the previous segment, as in
            training), "causal" (the same, with segment 0 re-routed at every token on the running
            mean: strictly causal, see `routing.py`) or "prompt" (route once on the prompt mean).
        device: where the cache lives.
        dtype: dtype of keys and values.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_heads: int, head_dim: int,
                 routing: str = "segment", device=None, dtype=torch.float32):
        if routing not in ROUTING_MODES:
            raise LoryTrainError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
        self.routing = routing
        self.max_len = max_len
        self.layers = [LayerCache(batch_size, max_len, n_heads, head_dim, device, dtype) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.started = False

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions (B, n) of the next n tokens of every sequence."""
        steps = torch.arange(n, device=self.lengths.device)
        positions = self.lengths.unsqueeze(1) + steps if self.started else steps.expand(self.batch_size, n)
        if int(positions.max()) >= self.max_len:
            raise LoryTrainError(f"the decode cache holds {self.max_len} positions per sequence; make max_len larger")
        return positions

    def advance(self, n: int, prompt_lens: torch.Tensor | None) -> None:
        """Record n tokens appended (or, on the prefill, `prompt_lens` valid prompt tokens)."""
        if self.started:
            self.lengths += n
        else:
            self.lengths = prompt_lens.clone() if prompt_lens is not None else torch.full_like(self.lengths, n)
            self.started = True
