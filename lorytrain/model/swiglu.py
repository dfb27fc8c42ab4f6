"""SwiGLU FFNs as memory-lean custom ops: grouped experts and per-segment merged experts.

Layout (ours): an FFN is one tensor `w` (f, 3, d), "neuron-major": inner unit j owns its gate
row W1[:, j], up row W3[:, j] and down row W2[j, :], so that
FFN(x) = (silu(x w[:, 0]ᵀ) ⊙ x w[:, 1]ᵀ) w[:, 2]. A block of inner units is then one contiguous
slice of every expert, which is what lets the Lory merge run tile by tile (and what
expert-wise model parallelism along f would shard). Both FFNs save only the FFN input
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

The tile loops write each tile's results straight into slices of the outputs (`out=` on
strided views), which `torch.compile` cannot trace. Forward and backward are therefore
`torch.library` custom ops with fake (shape-only) implementations and registered autograd:
the compiler sees each FFN as one opaque op, so a compiled model has no graph breaks, and the
tile loops keep their memory bound inside it.

Under autocast both FFNs compute in the autocast dtype (bf16 on GPU) and return weight
gradients in the parameters' dtype; the dtype is chosen outside the ops (the input is cast
there), so eager, compiled and fake runs agree on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GATE, UP, DOWN = 0, 1, 2
# elements of merged weights (one tile of every segment in a chunk) alive at once by default:
# 8 MiB of float32 stays in a CPU's last-level cache; on GPUs the limit only bounds memory
MERGE_BUDGET = {"cpu": 1 << 21}
MERGE_BUDGET_DEFAULT = 1 << 28
MIN_TILE = 64


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b, straight into `out` (a strided view is fine) when the dtypes agree."""
    if out.dtype != a.dtype:
        product = a @ b
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        out.addmm_(a, b) if a.dim() == 2 else out.baddbmm_(a, b)
    else:
        (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)


def glu(h1: Tensor, h3: Tensor) -> Tensor:
    """silu(h1) ⊙ h3."""
    return F.silu(h1) * h3


def _glu_backward(h1: Tensor, h3: Tensor, dg: Tensor):
    """Recompute g = silu(h1)·h3 and return (g, dh1, dh3) from dg."""
    sig = torch.sigmoid(h1)
    silu = h1 * sig
    return silu * h3, dg * h3 * sig * (1 + h1 * (1 - sig)), dg * silu


def _unused(x: Tensor) -> Tensor:
    """Placeholder output for a gradient nobody asked for (custom ops return tensors only)."""
    return x.new_empty(0)


def _only_y_differentiable(ctx, h1: Tensor, h3: Tensor) -> None:
    """The pre-activations are outputs only to be saved for backward: no gradient flows into
    them, and none is materialised (zeros of their size would double their memory in backward)."""
    ctx.mark_non_differentiable(h1, h3)
    ctx.set_materialize_grads(False)


# ---- grouped experts (dense FFN = one group) ----

@torch.library.custom_op("lory::grouped_swiglu", mutates_args=())
def _grouped_forward(x: Tensor, w: Tensor, counts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h1, h3) of rows of x (n, d), in x's dtype, sorted by group, through experts w (G, f, 3, d)."""
    n, f = x.shape[0], w.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        wc = w.to(x.dtype)
        h1, h3 = x.new_empty(n, f), x.new_empty(n, f)
        y = x.new_empty(n, x.shape[1])
        start = 0
        for g, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            if count:
                torch.mm(x[rows], wc[g, :, GATE].T, out=h1[rows])
                torch.mm(x[rows], wc[g, :, UP].T, out=h3[rows])
                torch.mm(glu(h1[rows], h3[rows]), wc[g, :, DOWN], out=y[rows])
    return y, h1, h3


@_grouped_forward.register_fake
def _(x, w, counts):
    n, f = x.shape[0], w.shape[1]
    return x.new_empty(n, x.shape[1]), x.new_empty(n, f), x.new_empty(n, f)


@torch.library.custom_op("lory::grouped_swiglu_backward", mutates_args=())
def _grouped_backward(dy: Tensor, x: Tensor, w: Tensor, h1: Tensor, h3: Tensor, counts: list[int], need_x: bool,
                      need_w: bool) -> tuple[Tensor, Tensor]:
    """(dx in x's dtype, dw in w's dtype); an empty tensor for a gradient not needed."""
    with torch.autocast(dy.device.type, enabled=False):
        wc, dy = w.to(x.dtype), dy.to(x.dtype)
        dx = x.new_empty(x.shape) if need_x else _unused(x)
        dw = w.new_zeros(w.shape) if need_w else _unused(w)
        start = 0
        for g, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            if not count:
                continue
            gated, dh1, dh3 = _glu_backward(h1[rows], h3[rows], dy[rows] @ wc[g, :, DOWN].T)
            if need_w:
                _mm_into(dw[g, :, GATE], dh1.T, x[rows])
                _mm_into(dw[g, :, UP], dh3.T, x[rows])
                _mm_into(dw[g, :, DOWN], gated.T, dy[rows])
            if need_x:
                torch.mm(dh1, wc[g, :, GATE], out=dx[rows])
                dx[rows].addmm_(dh3, wc[g, :, UP])
    return dx, dw


@_grouped_backward.register_fake
def _(dy, x, w, h1, h3, counts, need_x, need_w):
    return x.new_empty(x.shape) if need_x else _unused(x), w.new_empty(w.shape) if need_w else _unused(w)


def _grouped_setup(ctx, inputs, output):
    x, w, counts = inputs
    _, h1, h3 = output
    _only_y_differentiable(ctx, h1, h3)
    ctx.save_for_backward(x, w, h1, h3)
    ctx.counts = counts


def _grouped_grads(ctx, dy, _dh1, _dh3):
    x, w, h1, h3 = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if dy is None:  # no gradient reached y (grads are not materialised)
        return None, None, None
    dx, dw = _grouped_backward(dy, x, w, h1, h3, ctx.counts, need_x, need_w)
    return dx if need_x else None, dw if need_w else None, None


_grouped_forward.register_autograd(_grouped_grads, setup_context=_grouped_setup)


def grouped_swiglu(x: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """Rows of `x` (n, d), sorted by expert, through experts `w` (G, f, 3, d); `counts[g]` rows
    belong to expert g. Returns (n, d) in the autocast dtype when autocast is on."""
    return _grouped_forward(x.to(_compute_dtype(x)), w, list(counts))[0]


def swiglu(x: Tensor, w: Tensor) -> Tensor:
    """One SwiGLU FFN: `x` (..., d), `w` (f, 3, d)."""
    flat = x.reshape(-1, x.shape[-1])
    return grouped_swiglu(flat, w.unsqueeze(0), [flat.shape[0]]).view(*x.shape[:-1], -1)


# ---- per-segment merged experts (Lory) ----

def _tiles(f: int, tile: int) -> list[tuple[int, int]]:
    return [(j, min(tile, f - j)) for j in range(0, f, tile)]


@torch.library.custom_op("lory::merged_swiglu", mutates_args=())
def _merged_forward(x: Tensor, coef: Tensor, w: Tensor, chunk: int, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h1, h3) of segments x (S, T, d), in x's dtype, through θ̄_s = Σ_g coef[s, g] w[g]."""
    dtype = x.dtype
    n_src, f, _, d = w.shape
    with torch.autocast(x.device.type, enabled=False):
        cc = coef.to(dtype)
        flat = w.reshape(n_src, -1)
        h1 = x.new_empty(x.shape[0], x.shape[1], f)
        h3 = x.new_empty(h1.shape)
        y = x.new_empty(x.shape)
        for s in range(0, x.shape[0], chunk):
            seg = slice(s, s + chunk)
            for j, n in _tiles(f, tile):
                merged = (cc[seg] @ flat[:, 3 * d * j : 3 * d * (j + n)].to(dtype)).view(-1, n, 3, d)
                torch.bmm(x[seg], merged[:, :, GATE].transpose(1, 2), out=h1[seg, :, j : j + n])
                torch.bmm(x[seg], merged[:, :, UP].transpose(1, 2), out=h3[seg, :, j : j + n])
                gated = glu(h1[seg, :, j : j + n], h3[seg, :, j : j + n])
                _mm_into(y[seg], gated, merged[:, :, DOWN], accumulate=j > 0)
    return y, h1, h3


@_merged_forward.register_fake
def _(x, coef, w, chunk, tile):
    h1_shape = (x.shape[0], x.shape[1], w.shape[1])
    return x.new_empty(x.shape), x.new_empty(h1_shape), x.new_empty(h1_shape)


@torch.library.custom_op("lory::merged_swiglu_backward", mutates_args=())
def _merged_backward(dy: Tensor, x: Tensor, coef: Tensor, w: Tensor, h1: Tensor, h3: Tensor, chunk: int, tile: int,
                     need_x: bool, need_coef: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dcoef, dw) in the dtypes of x, coef and w; an empty tensor for a gradient not needed."""
    dtype = x.dtype
    n_src, f, _, d = w.shape
    with torch.autocast(dy.device.type, enabled=False):
        flat = w.reshape(n_src, -1)
        cc, dy = coef.to(dtype), dy.to(dtype)
        dx = x.new_empty(x.shape) if need_x else _unused(x)
        dcoef = coef.new_zeros(coef.shape, dtype=torch.promote_types(dtype, torch.float32)) if need_coef else None
        dw = w.new_empty(w.shape) if need_w else _unused(w)
        dw_flat = dw.view(n_src, -1)
        for s in range(0, x.shape[0], chunk):
            seg = slice(s, s + chunk)
            c = cc[seg]
            for j, n in _tiles(f, tile):
                cols = slice(3 * d * j, 3 * d * (j + n))
                source = flat[:, cols].to(dtype)
                merged = (c @ source).view(-1, n, 3, d)
                gated, dh1, dh3 = _glu_backward(h1[seg, :, j : j + n], h3[seg, :, j : j + n],
                                                torch.bmm(dy[seg], merged[:, :, DOWN].transpose(1, 2)))
                if need_x:
                    _mm_into(dx[seg], dh1, merged[:, :, GATE], accumulate=j > 0)
                    dx[seg].baddbmm_(dh3, merged[:, :, UP])
                dmerged = torch.empty_like(merged)  # gradient of this tile of every merged FFN
                torch.bmm(dh1.transpose(1, 2), x[seg], out=dmerged[:, :, GATE])
                torch.bmm(dh3.transpose(1, 2), x[seg], out=dmerged[:, :, UP])
                torch.bmm(gated.transpose(1, 2), dy[seg], out=dmerged[:, :, DOWN])
                dmerged = dmerged.view(c.shape[0], -1)
                if need_w:  # the first chunk writes, later chunks accumulate
                    _mm_into(dw_flat[:, cols], c.T, dmerged, accumulate=s > 0)
                if need_coef:
                    dcoef[seg] += dmerged @ source.T
    return dx, dcoef.to(coef.dtype) if need_coef else _unused(coef), dw


@_merged_backward.register_fake
def _(dy, x, coef, w, h1, h3, chunk, tile, need_x, need_coef, need_w):
    return (x.new_empty(x.shape) if need_x else _unused(x), coef.new_empty(coef.shape) if need_coef else _unused(coef),
            w.new_empty(w.shape) if need_w else _unused(w))


def _merged_setup(ctx, inputs, output):
    x, coef, w, chunk, tile = inputs
    _, h1, h3 = output
    _only_y_differentiable(ctx, h1, h3)
    ctx.save_for_backward(x, coef, w, h1, h3)
    ctx.chunk, ctx.tile = chunk, tile


def _merged_grads(ctx, dy, _dh1, _dh3):
    x, coef, w, h1, h3 = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if dy is None:  # no gradient reached y (grads are not materialised)
        return None, None, None, None, None
    grads = _merged_backward(dy, x, coef, w, h1, h3, ctx.chunk, ctx.tile, *need)
    return *(g if needed else None for g, needed in zip(grads, need, strict=True)), None, None


_merged_forward.register_autograd(_merged_grads, setup_context=_merged_setup)


def merge_steps(segments: int, ffn_dim: int, d_model: int, device_type: str, chunk: int = 0,
                tile: int = 0) -> tuple[int, int]:
    """(segments, inner units) merged per step: given values, or sized to the merge budget."""
    chunk = min(chunk, segments) if chunk > 0 else segments
    if tile <= 0:
        budget = MERGE_BUDGET.get(device_type, MERGE_BUDGET_DEFAULT)
        tile = budget // max(1, chunk * 3 * d_model) // MIN_TILE * MIN_TILE
        tile = max(tile, MIN_TILE)
    return chunk, min(tile, ffn_dim)


def merged_swiglu(x: Tensor, coef: Tensor, w: Tensor, chunk: int = 0, tile: int = 0) -> Tensor:
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
    return _merged_forward(x.to(_compute_dtype(x)), coef, w, chunk, tile)[0]
