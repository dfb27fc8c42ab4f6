"""Causal segment routing (Lory), shared by the Lory, prefix and segment-level EC layers.

Training and evaluation ("segment" routing): the sequence is cut into segments of T tokens
(the last one may be shorter); segment k > 0 is routed by softmax(R(mean of segment k-1's FFN
inputs)), segment 0 by its own mean with a stop-gradient (`first_segment="self"`, the paper's
rule) or by uniform weights (`"uniform"`). The prefix rule routes every segment k > 0 by
segment 0. "prompt" routing routes the whole sequence once on the mean of its first
`prompt_lens` tokens.

"causal" routing (ours; inference and scoring only) is "segment" routing with a strictly
causal first segment: under `first_segment="self"` token t < T of segment 0 is routed by the
running mean of tokens 0..t (so the last token of a full segment 0 gets exactly the paper's
weights, and no token's output depends on a later token); under `"uniform"` it equals
"segment". It needs no prompt boundary, so a plain forward pass over any text (lm-eval's
`--model hf`, a KV-cached decoder, an uncached `generate`) computes the same logits.

`prompt_lens` (B,) also bounds segment 0's own mean under "segment" routing, because a
decoder can only route on the prompt it has seen: with it, a full forward pass over prompt +
generated tokens routes exactly as KV-cached decoding does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorytrain.model.numerics import wide


@dataclass
class FFNContext:
    """What an FFN layer needs to know about the current forward call.

    Args:
        routing: "segment", "causal" or "prompt".
        prompt_lens: (B,) prompt lengths, or None (the whole input).
        positions: absolute positions (B or 1, n) of the input tokens.
    """

    routing: str
    prompt_lens: torch.Tensor | None
    positions: torch.Tensor


@dataclass
class RoutingStats:
    """How one MoE layer routed in the last forward pass (detached).

    Args:
        segment_weights: (B, N, E) weights per routing segment: the merge weights of
            lory/prefix (N = 1 under prompt routing; the current segment while decoding), the
            dispatch gates of segment-level EC, the per-segment mean of per-token gates of
            token-level layers (segments of `segment_len` tokens).
        tokens_per_expert: (E,) token-to-expert assignments of sparse layers; None where
            every token goes through a merge of all experts.
    """

    segment_weights: torch.Tensor
    tokens_per_expert: torch.Tensor | None = None

    def expert_use(self) -> torch.Tensor:
        """(E,) share of segments in which each expert's weight exceeds 2/E (the paper's
        "used") for soft merging; share of assignments per expert for sparse layers."""
        if self.tokens_per_expert is not None:
            return self.tokens_per_expert.float() / self.tokens_per_expert.sum().clamp(min=1)
        n_experts = self.segment_weights.shape[-1]
        return (self.segment_weights > 2 / n_experts).float().flatten(0, -2).mean(0)


def segment_sums(x: torch.Tensor, segment_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums (B, N, d) of every segment and their token counts (N,); last may be partial."""
    batch, length, d = x.shape
    full = length // segment_len
    x = wide(x)
    sums = x[:, : full * segment_len].reshape(batch, full, segment_len, d).sum(2)
    counts = [segment_len] * full
    if length > full * segment_len:
        sums = torch.cat([sums, x[:, full * segment_len :].sum(1, keepdim=True)], dim=1)
        counts.append(length - full * segment_len)
    return sums, torch.tensor(counts, device=x.device, dtype=torch.float32)


def segment_mean(values: torch.Tensor, segment_len: int) -> torch.Tensor:
    """Per-segment mean (B, N, E) of per-token values (B, L, E)."""
    sums, counts = segment_sums(values, segment_len)
    return sums / counts[:, None]


def masked_mean(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Float32 mean (B, d) of x (B, L, d) over positions lo[b] <= t < hi[b]; also the sum."""
    positions = torch.arange(x.shape[1], device=x.device)
    mask = (positions >= lo.unsqueeze(1)) & (positions < hi.unsqueeze(1))
    x = wide(x)
    total = torch.einsum("bl,bld->bd", mask.to(x.dtype), x)
    return total / mask.sum(1, keepdim=True).clamp(min=1), total


class SegmentRouting(nn.Module):
    """Router R: d → E on segment means, with Lory's causal shift or the prefix rule.

    Args:
        d_model: hidden size d.
        n_experts: E.
        segment_len: T.
        rule: "shift" (segment k routed by segment k-1) or "prefix" (by segment 0).
        first_segment: "self" or "uniform".
    """

    def __init__(self, d_model: int, n_experts: int, segment_len: int, rule: str = "shift",
                 first_segment: str = "self"):
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.n_experts, self.segment_len, self.rule, self.first_segment = n_experts, segment_len, rule, first_segment

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)

    def probs(self, means: torch.Tensor) -> torch.Tensor:
        """softmax(R(means)) in float32: routing is cheap and should not be rounded to bf16."""
        return F.linear(wide(means), wide(self.router.weight)).softmax(-1)

    def forward(self, x: torch.Tensor, ctx: FFNContext) -> tuple[torch.Tensor, int]:
        """Routing weights (B, N, E) for every segment and the segment length.

        Args:
            x: FFN inputs (B, L, d).
            ctx: routing mode and prompt lengths.
        """
        batch, length, _ = x.shape
        lens = ctx.prompt_lens
        if ctx.routing == "prompt":
            hi = lens if lens is not None else torch.full((batch,), length, device=x.device)
            mean, _ = masked_mean(x, torch.zeros_like(hi), hi)
            return self.probs(mean).unsqueeze(1), length
        sums, counts = segment_sums(x, self.segment_len)
        probs = self.probs(sums / counts[:, None])
        if self.first_segment == "uniform":
            first = torch.full_like(probs[:, :1], 1 / self.n_experts)
        elif lens is None or ctx.routing == "causal":
            # causal: the weights of segment 0's last token; its tokens use `running_first`
            first = probs[:, :1].detach()
        else:
            hi = lens.clamp(max=min(self.segment_len, length))
            first = self.probs(masked_mean(x, torch.zeros_like(hi), hi)[0]).unsqueeze(1).detach()
        rest = probs[:, :-1] if self.rule == "shift" else probs[:, :1].expand(-1, probs.shape[1] - 1, -1)
        return torch.cat([first, rest], dim=1), self.segment_len

    def running_first(self, x: torch.Tensor, ctx: FFNContext) -> torch.Tensor | None:
        """Per-token weights (B, min(T, L), E) of segment 0 under "causal" routing with
        `first_segment="self"`: token t routed by the mean of tokens 0..t (stop-gradient, as
        the paper's rule). None where segment 0 has one set of weights."""
        if ctx.routing != "causal" or self.first_segment != "self":
            return None
        head = wide(x[:, : self.segment_len])
        seen = torch.arange(1, head.shape[1] + 1, device=x.device, dtype=head.dtype)
        return self.probs(head.cumsum(1) / seen[:, None]).detach()

    @torch.no_grad()
    def start_decoding(self, x: torch.Tensor, weights: torch.Tensor, ctx: FFNContext) -> dict:
        """Decoding state after the prefill: the weights of the segment holding each prompt's last
        token ("current") and the running sum of FFN inputs the next switch will route on."""
        batch, length, _ = x.shape
        lens = ctx.prompt_lens if ctx.prompt_lens is not None else torch.full((batch,), length, device=x.device)
        if ctx.routing == "prompt":
            return {"current": weights[:, 0].clone(), "sum": None}
        last = (lens - 1) // self.segment_len
        current = weights[torch.arange(batch, device=x.device), last].clone()
        if self.rule == "shift":
            lo, hi = last * self.segment_len, lens
        else:
            lo, hi = torch.zeros_like(lens), lens.clamp(max=self.segment_len)
        mean, total = masked_mean(x, lo, hi)
        if ctx.routing == "causal" and self.first_segment == "self":
            # a prompt that ends inside segment 0 continues from the running mean of its tokens
            inside = last == 0
            current[inside] = self.probs(mean[inside])
        return {"current": current, "sum": total}

    @torch.no_grad()
    def step(self, state: dict, x: torch.Tensor, positions: torch.Tensor, routing: str) -> torch.Tensor | None:
        """Advance the decoding state by one token per sequence.

        Args:
            state: from `start_decoding`; updated in place.
            x: the new tokens' FFN inputs (B, d).
            positions: their absolute positions (B,), all ≥ 1.
            routing: "segment", "causal" or "prompt".

        Returns:
            Indices of the sequences whose routing weights changed (None: none can change).
        """
        if routing == "prompt":
            return None
        T = self.segment_len
        if self.rule == "shift":
            switch = (positions % T == 0).nonzero().squeeze(1)
        else:
            switch = (positions == T).nonzero().squeeze(1)
        if switch.numel():
            state["current"][switch] = self.probs(state["sum"][switch] / T)
            state["sum"][switch] = 0
        keep = torch.ones_like(positions, dtype=torch.bool) if self.rule == "shift" else positions < T
        state["sum"] += wide(x) * keep.unsqueeze(1)
        if routing == "causal" and self.first_segment == "self":
            # inside segment 0 every token re-routes on the running mean, itself included
            inside = (positions < T).nonzero().squeeze(1)
            if inside.numel():
                seen = (positions[inside] + 1).to(state["sum"].dtype)
                state["current"][inside] = self.probs(state["sum"][inside] / seen[:, None])
                switch = torch.cat([switch, inside])
        return switch


def capacity(n: int, n_experts: int, factor: float) -> int:
    """Items each expert takes under expert choice: c·n/E, at least 1, at most n."""
    return min(n, max(1, math.ceil(factor * n / n_experts)))
