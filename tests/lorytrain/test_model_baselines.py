"""Token-choice top-k and expert choice against per-token references; SaMoE pooling."""

import pytest
import torch
import torch.nn.functional as F

from lorytrain.model import ModelConfig, build_model
from lorytrain.model.expert_choice import ExpertChoiceMoE
from lorytrain.model.experts import ExpertPool
from lorytrain.model.routing import FFNContext
from lorytrain.model.token_choice import TopKMoE


def naive_ffn(x, w):
    """SwiGLU with an (f, 3, d) weight: rows of W1ᵀ, W3ᵀ and W2."""
    return (F.silu(x @ w[:, 0].T) * (x @ w[:, 1].T)) @ w[:, 2]


def config(**options):
    base = dict(d_model=16, n_heads=2, ffn_dim=24, n_experts=4, segment_len=4)
    return ModelConfig.from_preset("tiny", **{**base, **options})


def ctx_for(length):
    return FFNContext("segment", None, torch.arange(length).unsqueeze(0))


@pytest.mark.parametrize("k", [1, 2])
def test_topk_matches_per_token_reference_and_switch_losses(k):
    torch.manual_seed(0)
    layer = TopKMoE(config(ffn="topk", top_k=k, balance_loss_weight=0.5, z_loss_weight=0.25))
    layer.init_weights(0.3, 0.3)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = layer(x, ctx_for(9))
    flat = x.reshape(-1, 16)
    logits = flat @ layer.router.weight.T
    probs = logits.softmax(-1)
    expected, assigned = [], torch.zeros(4)
    for t in range(flat.shape[0]):
        top_p, top_i = probs[t].topk(k)
        gates = top_p if k == 1 else top_p / top_p.sum()
        expected.append(sum(g * naive_ffn(flat[t], layer.experts.w[i])
                            for g, i in zip(gates, top_i.tolist(), strict=True)))
        assigned[top_i] += 1
    expected = torch.stack(expected).view_as(y)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    balance = 4 * (assigned / (flat.shape[0] * k) * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(layer.last_aux["balance_loss"], 0.5 * balance)
    torch.testing.assert_close(layer.last_aux["z_loss"], 0.25 * z_loss)
    grads = torch.autograd.grad(y.sum() + sum(layer.last_aux.values()), [x, layer.router.weight])
    ref = torch.autograd.grad(expected.sum() + 0.5 * balance + 0.25 * z_loss, [x, layer.router.weight])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert layer.last_stats.tokens_per_expert.sum() == flat.shape[0] * k


def test_token_expert_choice_takes_capacity_tokens_per_expert_in_training():
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(config(ffn="expert-choice", ec_level="token", ec_threshold_momentum=0.5))
    layer.init_weights(0.3, 0.3)
    x = torch.randn(3, 12, 16)
    y = layer.train()(x, ctx_for(12))
    k = 12 // 4  # capacity factor 1: c·L/E tokens per expert and sequence
    assert layer.last_stats.tokens_per_expert.tolist() == [3 * k] * 4
    scores = (x @ layer.router.weight.T).softmax(-1)
    expected = torch.zeros_like(x)
    kth = torch.zeros(4)
    for b in range(3):
        for i in range(4):
            top = scores[b, :, i].topk(k)
            kth[i] += top.values[-1] / 3
            for t in top.indices.tolist():
                expected[b, t] += scores[b, t, i] * naive_ffn(x[b, t], layer.experts.w[i])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.threshold, 0.5 * torch.full((4,), 0.25) + 0.5 * kth)


def test_expert_choice_inference_applies_the_learned_thresholds_per_token():
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(config(ffn="expert-choice", ec_level="token")).eval()
    layer.init_weights(0.3, 0.3)
    layer.threshold.copy_(torch.tensor([0.2, 0.3, 0.25, 0.9]))
    x = torch.randn(2, 6, 16)
    y = layer(x, ctx_for(6))
    scores = (x @ layer.router.weight.T).softmax(-1)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(6):
            for i in range(4):
                if scores[b, t, i] >= layer.threshold[i]:
                    expected[b, t] += scores[b, t, i] * naive_ffn(x[b, t], layer.experts.w[i])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_segment_expert_choice_takes_whole_segments_routed_by_the_previous_one():
    torch.manual_seed(0)
    layer = ExpertChoiceMoE(config(ffn="expert-choice", ec_level="segment")).train()
    layer.init_weights(0.3, 0.3)
    x = torch.randn(2, 16, 16, requires_grad=True)  # 2 × 4 segments; each expert takes 2
    y = layer(x, ctx_for(16))
    segments = x.detach().view(2, 4, 4, 16)
    probs = (segments.mean(2) @ layer.routing.router.weight.T).softmax(-1)  # (2, 4, E)
    weights = torch.cat([probs[:, :1], probs[:, :-1]], dim=1).view(8, 4)
    expected = torch.zeros(8, 4, 16)
    for i in range(4):
        for s in weights[:, i].topk(2).indices.tolist():
            expected[s] += weights[s, i] * naive_ffn(segments.view(8, 4, 16)[s], layer.experts.w[i])
    torch.testing.assert_close(y.detach(), expected.view(2, 16, 16), rtol=1e-5, atol=1e-5)
    assert layer.last_stats.tokens_per_expert.tolist() == [8] * 4
    first_segment_loss = y[:, :4].sum()
    grad = torch.autograd.grad(first_segment_loss, layer.routing.router.weight)[0]
    assert torch.count_nonzero(grad) == 0


def test_samoe_pool_is_shared_by_all_layers_and_trained():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=40, ffn="topk", top_k=2, samoe_pool=3))
    names = [name for name, _ in model.named_parameters()]
    assert names.count("expert_pool.w") == 1 and not any("layers.0.ffn.experts.w" in n for n in names)
    first, second = (block.ffn.experts for block in model.layers)
    assert first.pool is second.pool is model.expert_pool
    model(torch.randint(0, 40, (2, 20))).sum().backward()
    assert model.expert_pool.w.grad.abs().sum() > 0 and first.mix_logits.grad.abs().sum() > 0
    mix = first.mix_logits.softmax(-1)
    torch.testing.assert_close(first.weights(), torch.einsum("eg,gfkd->efkd", mix, model.expert_pool.w))


def test_pool_reference_survives_copies_and_device_moves():
    import copy

    pool = ExpertPool(3, 16, 24)
    layer = TopKMoE(config(ffn="topk", samoe_pool=3), pool)
    holder = torch.nn.ModuleDict({"pool": pool, "layer": layer})
    clone = copy.deepcopy(holder)
    assert clone["layer"].experts.pool is clone["pool"]
