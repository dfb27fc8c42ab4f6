"""The Lory layer against a naive reference: segment loop, explicit merge, plain autograd."""

import pytest
import torch
import torch.nn.functional as F

from lorytrain.model import ModelConfig, build_model
from lorytrain.model.experts import ExpertPool
from lorytrain.model.lory import LoryMoE
from lorytrain.model.routing import FFNContext
from lorytrain.model.swiglu import grouped_swiglu, merged_swiglu


def naive_ffn(x, w):
    """SwiGLU with an (f, 3, d) weight: rows of W1ᵀ, W3ᵀ and W2."""
    return (F.silu(x @ w[:, 0].T) * (x @ w[:, 1].T)) @ w[:, 2]


def naive_lory(x, router_w, experts, T, first="self", rule="shift"):
    """Algorithm 1 written out: every segment merges every expert explicitly."""
    n_experts = experts.shape[0]
    rows = []
    for b in range(x.shape[0]):
        segments = list(x[b].split(T))
        probs = [torch.softmax(router_w @ seg.mean(0), -1) for seg in segments]
        outs = []
        for k, seg in enumerate(segments):
            if k == 0:
                e = probs[0].detach() if first == "self" else torch.full((n_experts,), 1 / n_experts)
            else:
                e = probs[k - 1] if rule == "shift" else probs[0]
            merged = sum(e[i] * experts[i] for i in range(n_experts))
            outs.append(naive_ffn(seg, merged))
        rows.append(torch.cat(outs))
    return torch.stack(rows)


def make_layer(ffn="lory", first="self", E=4, T=8, chunk=0, tile=0, pool=None, d=16, f=24):
    config = ModelConfig.from_preset("tiny", d_model=d, n_heads=2, ffn_dim=f, ffn=ffn, n_experts=E, segment_len=T,
                                     first_segment=first, merge_chunk=chunk, merge_tile=tile)
    layer = LoryMoE(config, pool)
    layer.init_weights(0.3, 0.3)  # large weights: routing far from uniform, so mistakes show
    return layer


def ctx_for(length, routing="segment"):
    return FFNContext(routing, None, torch.arange(length).unsqueeze(0))


@pytest.mark.parametrize("ffn,first,length,chunk,tile", [
    ("lory", "self", 32, 0, 0), ("lory", "self", 29, 0, 5), ("lory", "uniform", 29, 3, 0),
    ("lory", "self", 5, 0, 0), ("prefix", "self", 27, 2, 7), ("prefix", "uniform", 32, 0, 0),
])
def test_lory_matches_naive_reference_forward_and_backward(ffn, first, length, chunk, tile):
    torch.manual_seed(0)
    layer = make_layer(ffn, first, chunk=chunk, tile=tile)
    x = torch.randn(3, length, 16, requires_grad=True)
    y = layer(x, ctx_for(length))
    upstream = torch.randn_like(y)
    params = [layer.routing.router.weight, layer.experts.w]
    grads = torch.autograd.grad(y, [x, *params], upstream)

    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    rule = "prefix" if ffn == "prefix" else "shift"
    y_ref = naive_lory(x_ref, *ref_params, T=8, first=first, rule=rule)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref_params], upstream, allow_unused=True)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_prompt_routing_merges_once_on_the_prompt_mean():
    torch.manual_seed(1)
    layer = make_layer()
    x = torch.randn(2, 20, 16)
    lens = torch.tensor([7, 20])
    y = layer(x, FFNContext("prompt", lens, torch.arange(20).unsqueeze(0)))
    for b in range(2):
        e = torch.softmax(layer.routing.router.weight @ x[b, : lens[b]].mean(0), -1)
        merged = torch.einsum("e,efkd->fkd", e, layer.experts.w)
        torch.testing.assert_close(y[b], naive_ffn(x[b], merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk,tile", [(2, 2), (8, 5), (3, 1)])
def test_merged_swiglu_gradcheck_float64(chunk, tile):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    coef = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: merged_swiglu(*a, chunk, tile), (x, coef, w))


def test_grouped_swiglu_gradcheck_float64_with_an_empty_group():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: grouped_swiglu(*a, [2, 0, 4]), (x, w))
    expected = torch.cat([naive_ffn(x[:2], w[0]), naive_ffn(x[2:], w[2])])
    torch.testing.assert_close(grouped_swiglu(x, w, [2, 0, 4]), expected)


@pytest.mark.parametrize("ffn", ["lory", "prefix"])
def test_lory_layer_gradcheck_float64_including_router_and_experts(ffn):
    # first_segment="self" puts a stop-gradient on segment 0's weights, so its analytic
    # gradient is deliberately not the numerical derivative; "uniform" is a true derivative
    torch.manual_seed(0)
    layer = make_layer(ffn, "uniform", E=3, T=3, d=4, f=3).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    names = ["routing.router.weight", "experts.w"]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def run(x, *weights):
        return torch.func.functional_call(layer, dict(zip(names, weights, strict=True)), (x, ctx_for(7)))

    assert torch.autograd.gradcheck(run, (x, *params))


def test_merged_weights_are_not_saved_for_backward():
    """Saved tensors are the FFN input, pre-activations and small routing tensors: nothing of
    size S·d·f (one merged FFN per segment)."""
    torch.manual_seed(0)
    layer = make_layer(E=8, T=4, d=16, f=64)
    x = torch.randn(2, 64, 16, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, ctx_for(64)).sum().backward()
    tokens, d, f, segments = 2 * 64, 16, 64, 2 * 16
    merged = segments * 3 * d * f
    assert max(saved) < merged / 4
    assert sum(saved) < tokens * (3 * d + 2 * f) + merged / 10


def test_samoe_lory_equals_lory_with_the_combined_experts():
    torch.manual_seed(0)
    pool = ExpertPool(5, 16, 24)
    pool.reset_parameters(0.3, 0.3)
    pooled = make_layer(pool=pool)
    plain = make_layer()
    with torch.no_grad():
        plain.routing.router.weight.copy_(pooled.routing.router.weight)
        plain.experts.w.copy_(pooled.experts.weights())
    x = torch.randn(2, 30, 16)
    y = pooled(x, ctx_for(30))
    torch.testing.assert_close(y, plain(x, ctx_for(30)), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert pool.w.grad.abs().sum() > 0 and pooled.experts.mix_logits.grad.abs().sum() > 0


def test_router_gets_no_gradient_from_the_first_segment():
    torch.manual_seed(0)
    for first in ("self", "uniform"):
        config = ModelConfig.from_preset("tiny", vocab_size=64, ffn="lory", n_experts=4, segment_len=8,
                                         first_segment=first)
        model = build_model(config)
        ids = torch.randint(0, 64, (2, 32))
        routers = [block.ffn.routing.router.weight for block in model.layers]
        first_loss = model(ids)[:, :8].logsumexp(-1).sum()
        for grad in torch.autograd.grad(first_loss, routers):
            assert torch.count_nonzero(grad) == 0
        later_loss = model(ids)[:, 8:16].logsumexp(-1).sum()
        for grad in torch.autograd.grad(later_loss, routers):
            assert torch.count_nonzero(grad) > 0


def test_bf16_autocast_path_matches_float32_loosely():
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(2, 24, 16, requires_grad=True)
    y32 = layer(x, ctx_for(24))
    g32 = torch.autograd.grad(y32.sum(), [x, layer.experts.w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x, ctx_for(24))
    assert y16.dtype == torch.bfloat16
    g16 = torch.autograd.grad(y16.float().sum(), [x, layer.experts.w])
    assert g16[0].dtype == torch.float32 and g16[1].dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.1)
    for a, b in zip(g16, g32, strict=True):
        assert (a - b).norm() / b.norm() < 0.05


def test_merge_chunks_and_tiles_do_not_change_results():
    torch.manual_seed(0)
    x = torch.randn(7, 5, 6, requires_grad=True)
    coef = torch.rand(7, 3, requires_grad=True)
    w = (0.3 * torch.randn(3, 10, 3, 6)).requires_grad_()
    results = []
    for chunk, tile in ((7, 10), (1, 3), (3, 4), (7, 1)):
        y = merged_swiglu(x, coef, w, chunk, tile)
        results.append([y, *torch.autograd.grad(y.square().sum(), [x, coef, w])])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merge_steps_follow_the_budget():
    from lorytrain.model.swiglu import MERGE_BUDGET, MIN_TILE, merge_steps

    chunk, tile = merge_steps(segments=16, ffn_dim=1376, d_model=512, device_type="cpu")
    assert chunk == 16 and tile % MIN_TILE == 0 and tile >= MIN_TILE
    assert chunk * 3 * 512 * tile <= MERGE_BUDGET["cpu"]
    assert merge_steps(16, 1376, 512, "cuda") == (16, 1376)  # a GPU budget holds whole FFNs here
    assert merge_steps(16, 40, 512, "cpu") == (16, 40)  # never more than f
    assert merge_steps(16, 1376, 512, "cpu", chunk=4, tile=100) == (4, 100)
