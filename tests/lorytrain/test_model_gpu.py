"""CUDA checks of the model (skipped without CUDA; `-m gpu` runs them on a GPU machine): the
merged SwiGLU against the naive segment loop, and the compiled Lory model as one graph."""

import pytest
import torch

from lorytrain.model.swiglu import merged_swiglu
from tests.lorytrain.test_model_compile import _loss_and_grads, tiny_model
from tests.lorytrain.test_model_lory import naive_ffn

pytestmark = pytest.mark.gpu


def _naive_merged(x, coef, w):
    return torch.stack([naive_ffn(x[s], torch.einsum("g,gfkd->fkd", coef[s], w)) for s in range(x.shape[0])])


@pytest.mark.parametrize("tile", [0, 64])
def test_merged_swiglu_on_cuda_matches_the_segment_loop(tile):
    torch.manual_seed(0)
    device = torch.device("cuda")
    x = torch.randn(6, 32, 48, device=device, requires_grad=True)
    coef = torch.softmax(torch.randn(6, 4, device=device), -1).requires_grad_()
    w = (0.2 * torch.randn(4, 192, 3, 48, device=device)).requires_grad_()
    inputs = [x, coef, w]
    upstream = torch.randn(6, 32, 48, device=device)
    y = merged_swiglu(x, coef, w, tile=tile)  # float32 (TF32 matmuls are off by default)
    grads = torch.autograd.grad(y, inputs, upstream)
    y_ref = _naive_merged(x, coef, w)
    ref_grads = torch.autograd.grad(y_ref, inputs, upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = merged_swiglu(x, coef, w, tile=tile)
        grads16 = torch.autograd.grad(y16.float(), inputs, upstream)
    assert y16.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads16)
    assert (y16.float() - y_ref).norm() / y_ref.norm() < 0.02
    for got, want in zip(grads16, ref_grads, strict=True):
        assert (got - want).norm() / want.norm() < 0.05


def test_compiled_lory_on_cuda_is_one_graph_and_matches_eager():
    model = tiny_model("lory", tile=16).cuda()
    ids = torch.randint(0, 64, (2, 29), device="cuda")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)  # inductor
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, grads = _loss_and_grads(model, ids)
        logits_c, grads_c = _loss_and_grads(compiled, ids)
    torch.testing.assert_close(logits_c.float(), logits.float(), rtol=0.02, atol=0.02)
    for got, want in zip(grads_c, grads, strict=True):
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-6
