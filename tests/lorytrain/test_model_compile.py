"""`torch.compile` sees the SwiGLU FFNs (dense and merged) as single ops: no graph breaks, and
compiled forward/backward equal eager."""

import pytest
import torch

from lorytrain.model import ModelConfig, build_model


def tiny_model(ffn: str, tile: int = 0):
    # f = 48 with tile 16: the merge runs tile by tile, the case that wrote into strided slices
    config = ModelConfig.from_preset("tiny", vocab_size=64, d_model=16, n_heads=2, ffn_dim=48, n_layers=2, ffn=ffn,
                                     n_experts=4, segment_len=8, merge_tile=tile)
    torch.manual_seed(0)
    return build_model(config)


@pytest.mark.parametrize("ffn,tile", [("dense", 0), ("lory", 0), ("lory", 16), ("prefix", 16)])
def test_model_compiles_as_one_graph(ffn, tile):
    model = tiny_model(ffn, tile)
    ids = torch.randint(0, 64, (2, 29))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def _loss_and_grads(model, ids):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("ffn,tile,autocast", [("dense", 0, False), ("lory", 16, False), ("lory", 16, True)])
def test_compiled_forward_and_backward_equal_eager(ffn, tile, autocast):
    model = tiny_model(ffn, tile)
    ids = torch.randint(0, 64, (2, 29))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, grads = _loss_and_grads(model, ids)
        logits_c, grads_c = _loss_and_grads(compiled, ids)
    assert logits_c.dtype == logits.dtype
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_c, grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_custom_ops_pass_opcheck():
    """Schema, fake (shape-only) implementations and autograd registration of the FFN ops,
    checked against their real implementations by `torch.library.opcheck`."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    coef = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 10, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lory.merged_swiglu.default, (x, coef, w, 2, 4))
    rows = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lory.grouped_swiglu.default, (rows, w, [3, 0, 4]))
