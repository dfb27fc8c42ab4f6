"""SwiGLU FFNs as memory-lean autograd functions: grouped experts and per-segment merged experts.

Weights are stored "x @ W" style: `w13` (G, d, 2f) holds gate W1 and up W3 side by side, `w2`
(G, f, d) is the down projection. Both functions save only the FFN input and the 2f
pre-activations for backward (plain autograd would also keep silu(h1) and the gated product),
and recompute the rest.

`merged_swiglu` is the core of the Lory layer. For every segment s it builds the merged FFN
θ̄_s = Σ_i c_s,i θ_i with one matmul (S, G) × (G, d·2f) and runs the segment's tokens through
it with batched matmuls. Merged weights are never saved: the backward pass rebuilds them
chunk by chunk and turns the merged-weight gradients into dθ_i = Σ_s c_s,i dθ̄_s and
dc_s,i = ⟨θ_i, dθ̄_s⟩, again as matmuls. Activation memory therefore matches a dense FFN, and
at most `chunk` merged FFNs exist at any moment.

Under autocast both functions compute in the autocast dtype (bf16 on GPU) and return weight
gradients in the parameters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MERGE_BUDGET = 1 << 25  # merged weights (elements) alive at once when merge_chunk is 0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def glu(h13: torch.Tensor, f: int) -> torch.Tensor:
    """silu(h1) ⊙ h3 from the pre-activations [h1 | h3]."""
    h1, h3 = h13.split(f, dim=-1)
    return F.silu(h1) * h3


def _glu_backward(h13: torch.Tensor, dg: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute g = silu(h1)·h3 and return (g, d h13) from d g."""
    h1, h3 = h13.split(f, dim=-1)
    sig = torch.sigmoid(h1)
    silu = h1 * sig
    dh1 = dg * h3 * sig * (1 + h1 * (1 - sig))
    return silu * h3, torch.cat([dh1, dg * silu], dim=-1)


class GroupedSwiGLU(torch.autograd.Function):
    """Rows of x, sorted by group, each through its group's SwiGLU FFN (dense: one group)."""

    @staticmethod
    def forward(ctx, x, w13, w2, counts):
        dtype = _compute_dtype(x)
        f = w2.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            xc, w13c, w2c = x.to(dtype), w13.to(dtype), w2.to(dtype)
            h13_parts, y_parts = [], []
            for g, xg in enumerate(xc.split(counts)):
                h13 = xg @ w13c[g]
                h13_parts.append(h13)
                y_parts.append(glu(h13, f) @ w2c[g])
            h13 = h13_parts[0] if len(counts) == 1 else torch.cat(h13_parts)
            y = y_parts[0] if len(counts) == 1 else torch.cat(y_parts)
        ctx.save_for_backward(xc, w13, w2, h13)
        ctx.counts, ctx.dtype, ctx.x_dtype = counts, dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, w13, w2, h13 = ctx.saved_tensors
        dtype, f, counts = ctx.dtype, w2.shape[1], ctx.counts
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        with torch.autocast(dy.device.type, enabled=False):
            w13c, w2c, dy = w13.to(dtype), w2.to(dtype), dy.to(dtype)
            dx_parts = []
            dw13 = torch.zeros_like(w13) if need_w13 else None
            dw2 = torch.zeros_like(w2) if need_w2 else None
            pieces = zip(xc.split(counts), h13.split(counts), dy.split(counts), strict=True)
            for g, (xg, hg, dyg) in enumerate(pieces):
                gg, dh13 = _glu_backward(hg, dyg @ w2c[g].T, f)
                if need_w2:
                    dw2[g] = gg.T @ dyg
                if need_w13:
                    dw13[g] = xg.T @ dh13
                if need_x:
                    dx_parts.append(dh13 @ w13c[g].T)
            dx = (dx_parts[0] if len(counts) == 1 else torch.cat(dx_parts)).to(ctx.x_dtype) if need_x else None
        return dx, dw13, dw2, None


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN: `x` (..., d), `w13` (d, 2f), `w2` (f, d)."""
    flat = x.reshape(-1, x.shape[-1])
    return GroupedSwiGLU.apply(flat, w13.unsqueeze(0), w2.unsqueeze(0), (flat.shape[0],)).view(*x.shape[:-1], -1)


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of `x` (n, d), sorted by expert, through experts `w13` (G, d, 2f), `w2` (G, f, d);
    `counts[g]` rows belong to expert g."""
    return GroupedSwiGLU.apply(x, w13, w2, tuple(counts))


class MergedSwiGLU(torch.autograd.Function):
    """Segments x (S, T, d) through their merged FFNs θ̄_s = Σ_g coef[s, g] θ_g."""

    @staticmethod
    def forward(ctx, x, coef, w13, w2, chunk):
        dtype = _compute_dtype(x)
        n_src, d, f2 = w13.shape
        f = f2 // 2
        with torch.autocast(x.device.type, enabled=False):
            xc, cc = x.to(dtype), coef.to(dtype)
            w13f, w2f = w13.to(dtype).reshape(n_src, -1), w2.to(dtype).reshape(n_src, -1)
            h13_parts, y_parts = [], []
            for s in range(0, x.shape[0], chunk):
                c = cc[s : s + chunk]
                h13 = torch.bmm(xc[s : s + chunk], (c @ w13f).view(-1, d, f2))
                h13_parts.append(h13)
                y_parts.append(torch.bmm(glu(h13, f), (c @ w2f).view(-1, f, d)))
            h13 = h13_parts[0] if len(h13_parts) == 1 else torch.cat(h13_parts)
            y = y_parts[0] if len(y_parts) == 1 else torch.cat(y_parts)
        ctx.save_for_backward(xc, cc, w13, w2, h13)
        ctx.chunk, ctx.dtype, ctx.x_dtype, ctx.coef_dtype = chunk, dtype, x.dtype, coef.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, cc, w13, w2, h13 = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        n_src, d, f2 = w13.shape
        f = f2 // 2
        need_x, need_coef, need_w13, need_w2 = ctx.needs_input_grad[:4]
        with torch.autocast(dy.device.type, enabled=False):
            w13f, w2f = w13.to(dtype).reshape(n_src, -1), w2.to(dtype).reshape(n_src, -1)
            dy = dy.to(dtype)
            dx = torch.empty_like(xc) if need_x else None
            dcoef = torch.empty_like(cc) if need_coef else None
            # accumulate over chunks in the parameters' dtype, not in bf16
            dw13 = w13.new_zeros(w13f.shape) if need_w13 else None
            dw2 = w2.new_zeros(w2f.shape) if need_w2 else None
            for s in range(0, xc.shape[0], chunk):
                sl = slice(s, s + chunk)
                c = cc[sl]
                m2 = (c @ w2f).view(-1, f, d)
                g, dh13 = _glu_backward(h13[sl], torch.bmm(dy[sl], m2.transpose(1, 2)), f)
                dm2 = torch.bmm(g.transpose(1, 2), dy[sl]).view(c.shape[0], -1)
                if need_x:
                    dx[sl] = torch.bmm(dh13, (c @ w13f).view(-1, d, f2).transpose(1, 2))
                dm13 = torch.bmm(xc[sl].transpose(1, 2), dh13).view(c.shape[0], -1)
                if need_w13:
                    dw13.add_(c.T @ dm13)
                if need_w2:
                    dw2.add_(c.T @ dm2)
                if need_coef:
                    dcoef[sl] = dm13 @ w13f.T + dm2 @ w2f.T
        return (
            dx.to(ctx.x_dtype) if need_x else None,
            dcoef.to(ctx.coef_dtype) if need_coef else None,
            dw13.view_as(w13) if need_w13 else None,
            dw2.view_as(w2) if need_w2 else None,
            None,
        )


def merged_swiglu(x: torch.Tensor, coef: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  chunk: int = 0) -> torch.Tensor:
    """Soft-merged SwiGLU per segment.

    Args:
        x: segments (S, T, d).
        coef: merge coefficients (S, G), e.g. routing weights.
        w13: gate and up projections of the G source FFNs (G, d, 2f).
        w2: down projections (G, f, d).
        chunk: segments merged at once (0: as many as fit in `MERGE_BUDGET` elements).

    Returns:
        (S, T, d) outputs, in the autocast dtype when autocast is on.
    """
    if chunk <= 0:
        chunk = max(1, MERGE_BUDGET // (w13[0].numel() + w2[0].numel()))
    return MergedSwiGLU.apply(x, coef, w13, w2, chunk)
