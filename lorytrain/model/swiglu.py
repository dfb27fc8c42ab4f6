"""SwiGLU FFNs as memory-lean autograd functions: grouped experts and per-segment merged experts.

Layout (ours): an FFN is one tensor `w` (f, 3, d), "neuron-major": inner unit j owns its gate
row W1[:, j], up row W3[:, j] and down row W2[j, :], so that
FFN(x) = (silu(x w[:, 0]ᵀ) ⊙ x w[:, 1]ᵀ) w[:, 2]. A block of inner units is then one contiguous
slice of every expert, which is what lets the Lory merge run tile by tile (and what
expert-wise model parallelism along f would shard). Both functions save only the FFN input
and the pre-activations h1, h3 for backward (plain autograd would also keep silu(h1) and the
gated product) and recompute the rest.

`merged_swiglu` is the core of the Lory layer. For every segment s it builds the merged FFN
θ̄_s = Σ_g c_s,g θ_g with a matmul (S, G) × (G, f·3·d) and runs the segment's tokens through it
with batched matmuls. It works on tiles of `tile` inner units (and chunks of `chunk`
segments): merge a tile of every segment's FFN, use it, drop it. Merged weights are never
stored for backward: the backward pass rebuilds each tile and turns the merged-weight
gradients into dθ_g = Σ_s c_s,g dθ̄_s and dc_s,g = ⟨θ_g, dθ̄_s⟩, again as matmuls. Activation
memory therefore matches a dense FFN, and the transient merged weights stay at one tile
(sized to stay in the CPU's cache, or to bound GPU memory).

Under autocast both functions compute in the autocast dtype (bf16 on GPU) and return weight
gradients in the parameters' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATE, UP, DOWN = 0, 1, 2
# elements of merged weights (one tile of every segment in a chunk) alive at once by default:
# 8 MiB of float32 stays in a CPU's last-level cache; on GPUs the limit only bounds memory
MERGE_BUDGET = {"cpu": 1 << 21}
MERGE_BUDGET_DEFAULT = 1 << 28
MIN_TILE = 64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b, straight into `out` (a strided view is fine) when the dtypes agree."""
    if out.dtype != a.dtype:
        product = a @ b
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        out.addmm_(a, b) if a.dim() == 2 else out.baddbmm_(a, b)
    else:
        (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)


def glu(h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    """silu(h1) ⊙ h3."""
    return F.silu(h1) * h3


def _glu_backward(h1: torch.Tensor, h3: torch.Tensor, dg: torch.Tensor):
    """Recompute g = silu(h1)·h3 and return (g, dh1, dh3) from dg."""
    sig = torch.sigmoid(h1)
    silu = h1 * sig
    return silu * h3, dg * h3 * sig * (1 + h1 * (1 - sig)), dg * silu


class GroupedSwiGLU(torch.autograd.Function):
    """Rows of x, sorted by group, each through its group's SwiGLU FFN (dense: one group)."""

    @staticmethod
    def forward(ctx, x, w, counts):
        dtype = _compute_dtype(x)
        n, f = x.shape[0], w.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), w.to(dtype)
            h1, h3 = x.new_empty(n, f, dtype=dtype), x.new_empty(n, f, dtype=dtype)
            y = x.new_empty(n, x.shape[1], dtype=dtype)
            start = 0
            for g, count in enumerate(counts):
                rows = slice(start, start + count)
                start += count
                if count:
                    torch.mm(xc[rows], wc[g, :, GATE].T, out=h1[rows])
                    torch.mm(xc[rows], wc[g, :, UP].T, out=h3[rows])
                    torch.mm(glu(h1[rows], h3[rows]), wc[g, :, DOWN], out=y[rows])
        ctx.save_for_backward(xc, w, h1, h3)
        ctx.counts, ctx.dtype, ctx.x_dtype = counts, dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, w, h1, h3 = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(dy.device.type, enabled=False):
            wc, dy = w.to(ctx.dtype), dy.to(ctx.dtype)
            dx = torch.empty_like(xc) if need_x else None
            dw = torch.zeros_like(w) if need_w else None
            start = 0
            for g, count in enumerate(ctx.counts):
                rows = slice(start, start + count)
                start += count
                if not count:
                    continue
                gated, dh1, dh3 = _glu_backward(h1[rows], h3[rows], dy[rows] @ wc[g, :, DOWN].T)
                if need_w:
                    _mm_into(dw[g, :, GATE], dh1.T, xc[rows])
                    _mm_into(dw[g, :, UP], dh3.T, xc[rows])
                    _mm_into(dw[g, :, DOWN], gated.T, dy[rows])
                if need_x:
                    torch.mm(dh1, wc[g, :, GATE], out=dx[rows])
                    dx[rows].addmm_(dh3, wc[g, :, UP])
        return dx.to(ctx.x_dtype) if need_x else None, dw, None


def swiglu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN: `x` (..., d), `w` (f, 3, d)."""
    flat = x.reshape(-1, x.shape[-1])
    return GroupedSwiGLU.apply(flat, w.unsqueeze(0), (flat.shape[0],)).view(*x.shape[:-1], -1)


def grouped_swiglu(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of `x` (n, d), sorted by expert, through experts `w` (G, f, 3, d); `counts[g]` rows
    belong to expert g."""
    return GroupedSwiGLU.apply(x, w, tuple(counts))


def _tiles(f: int, tile: int) -> list[tuple[int, int]]:
    return [(j, min(tile, f - j)) for j in range(0, f, tile)]


class MergedSwiGLU(torch.autograd.Function):
    """Segments x (S, T, d) through their merged FFNs θ̄_s = Σ_g coef[s, g] θ_g, tile by tile."""

    @staticmethod
    def forward(ctx, x, coef, w, chunk, tile):
        dtype = _compute_dtype(x)
        n_src, f, _, d = w.shape
        with torch.autocast(x.device.type, enabled=False):
            xc, cc = x.to(dtype), coef.to(dtype)
            flat = w.view(n_src, -1)
            h1 = x.new_empty(x.shape[0], x.shape[1], f, dtype=dtype)
            h3 = torch.empty_like(h1)
            y = torch.empty_like(xc)
            for s in range(0, x.shape[0], chunk):
                seg = slice(s, s + chunk)
                for j, n in _tiles(f, tile):
                    merged = (cc[seg] @ flat[:, 3 * d * j : 3 * d * (j + n)].to(dtype)).view(-1, n, 3, d)
                    torch.bmm(xc[seg], merged[:, :, GATE].transpose(1, 2), out=h1[seg, :, j : j + n])
                    torch.bmm(xc[seg], merged[:, :, UP].transpose(1, 2), out=h3[seg, :, j : j + n])
                    gated = glu(h1[seg, :, j : j + n], h3[seg, :, j : j + n])
                    _mm_into(y[seg], gated, merged[:, :, DOWN], accumulate=j > 0)
        ctx.save_for_backward(xc, cc, w, h1, h3)
        ctx.chunk, ctx.tile, ctx.dtype, ctx.x_dtype, ctx.coef_dtype = chunk, tile, dtype, x.dtype, coef.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, cc, w, h1, h3 = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        n_src, f, _, d = w.shape
        need_x, need_coef, need_w = ctx.needs_input_grad[:3]
        with torch.autocast(dy.device.type, enabled=False):
            flat = w.view(n_src, -1)
            dy = dy.to(dtype)
            dx = torch.empty_like(xc) if need_x else None
            dcoef = torch.zeros_like(cc, dtype=torch.promote_types(cc.dtype, torch.float32)) if need_coef else None
            dw = torch.empty_like(flat) if need_w else None  # in the parameters' dtype
            for s in range(0, xc.shape[0], chunk):
                seg = slice(s, s + chunk)
                c = cc[seg]
                for j, n in _tiles(f, ctx.tile):
                    cols = slice(3 * d * j, 3 * d * (j + n))
                    source = flat[:, cols].to(dtype)
                    merged = (c @ source).view(-1, n, 3, d)
                    gated, dh1, dh3 = _glu_backward(h1[seg, :, j : j + n], h3[seg, :, j : j + n],
                                                    torch.bmm(dy[seg], merged[:, :, DOWN].transpose(1, 2)))
                    if need_x:
                        _mm_into(dx[seg], dh1, merged[:, :, GATE], accumulate=j > 0)
                        dx[seg].baddbmm_(dh3, merged[:, :, UP])
                    dmerged = torch.empty_like(merged)  # gradient of this tile of every merged FFN
                    torch.bmm(dh1.transpose(1, 2), xc[seg], out=dmerged[:, :, GATE])
                    torch.bmm(dh3.transpose(1, 2), xc[seg], out=dmerged[:, :, UP])
                    torch.bmm(gated.transpose(1, 2), dy[seg], out=dmerged[:, :, DOWN])
                    dmerged = dmerged.view(c.shape[0], -1)
                    if need_w:  # the first chunk writes, later chunks accumulate
                        _mm_into(dw[:, cols], c.T, dmerged, accumulate=s > 0)
                    if need_coef:
                        dcoef[seg] += dmerged @ source.T
        return (
            dx.to(ctx.x_dtype) if need_x else None,
            dcoef.to(ctx.coef_dtype) if need_coef else None,
            dw.view_as(w) if need_w else None,
            None,
            None,
        )


def merge_steps(segments: int, ffn_dim: int, d_model: int, device_type: str, chunk: int = 0,
                tile: int = 0) -> tuple[int, int]:
    """(segments, inner units) merged per step: given values, or sized to the merge budget."""
    chunk = min(chunk, segments) if chunk > 0 else segments
    if tile <= 0:
        budget = MERGE_BUDGET.get(device_type, MERGE_BUDGET_DEFAULT)
        tile = budget // max(1, chunk * 3 * d_model) // MIN_TILE * MIN_TILE
        tile = max(tile, MIN_TILE)
    return chunk, min(tile, ffn_dim)


def merged_swiglu(x: torch.Tensor, coef: torch.Tensor, w: torch.Tensor, chunk: int = 0,
                  tile: int = 0) -> torch.Tensor:
    """Soft-merged SwiGLU per segment.

    Args:
        x: segments (S, T, d).
        coef: merge coefficients (S, G), e.g. routing weights.
        w: the G source FFNs (G, f, 3, d).
        chunk: segments merged per step (0: all).
        tile: inner units merged per step (0: as many as `MERGE_BUDGET` allows, at least 64).

    Returns:
        (S, T, d) outputs, in the autocast dtype when autocast is on.
    """
    chunk, tile = merge_steps(x.shape[0], w.shape[1], w.shape[3], x.device.type, chunk, tile)
    return MergedSwiGLU.apply(x, coef, w, chunk, tile)
