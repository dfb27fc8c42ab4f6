"""The scoring rule ("causal" routing) in lory's own model: strictly causal for every FFN kind,
what KV-cached decoding computes, and the paper's weights at the end of a full first segment."""

import pytest
import torch

from lorytrain.generation import SamplingConfig, full_forward_logits, generate_with_logits
from lorytrain.model import ModelConfig, build_model
from lorytrain.model.routing import FFNContext
from tests.lorytrain.runkit import FFN_VARIANTS

T, LENGTH, VOCAB = 8, 30, 50
VARIANTS = FFN_VARIANTS


def sharp_model(**options):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=4, segment_len=T, **options))
    with torch.no_grad():  # sharp routers: what routing sees shows in the logits
        for layer in model.moe_layers():
            router = getattr(getattr(layer, "routing", None), "router", None) or getattr(layer, "router", None)
            router.weight.mul_(40)
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_routing_is_causal_from_the_first_token(name):
    model = sharp_model(**VARIANTS[name])
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=generator)
    with torch.no_grad():
        reference = model(ids, routing="causal")
        for p in range(1, LENGTH):
            changed = ids.clone()
            changed[:, p:] = torch.randint(0, VOCAB, (2, LENGTH - p), generator=generator)
            torch.testing.assert_close(model(changed, routing="causal")[:, :p], reference[:, :p], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_causal_decoding_equals_one_forward_pass(name):
    model = sharp_model(**VARIANTS[name])
    prompts = [[3, 4, 5], list(range(1, 9)), list(range(10, 23))]  # inside segment 0, exactly one, across
    out = generate_with_logits(model, prompts, SamplingConfig(max_new_tokens=14, temperature=0), routing="causal")
    # no prompt boundary needed: the plain forward pass over prompt + generated tokens
    full = full_forward_logits(model, [p + t for p, t in zip(prompts, out.tokens, strict=True)],
                               [1, 1, 1], routing="causal")
    for prompt, logits, whole in zip(prompts, out.logits, full, strict=True):
        torch.testing.assert_close(logits, whole[len(prompt) - 1 : len(prompt) - 1 + len(logits)], rtol=1e-4, atol=1e-4)


def test_causal_rule_gives_the_last_token_of_segment_0_the_papers_weights():
    model = sharp_model(ffn="lory")
    layer = model.moe_layers()[0]
    x = torch.randn(2, 20, model.config.d_model)
    ctx = FFNContext("causal", None, torch.arange(20)[None])
    weights, _ = layer.routing(x, ctx)
    running = layer.routing.running_first(x, ctx)
    paper, _ = layer.routing(x, FFNContext("segment", None, ctx.positions))
    assert running.shape == (2, T, 4)
    torch.testing.assert_close(running[:, -1], paper[:, 0])
    torch.testing.assert_close(weights[:, 1:], paper[:, 1:])  # later segments route as in training
    assert (running[:, 0] - paper[:, 0]).abs().max() > 1e-3  # the first token sees only itself
    assert layer.routing.running_first(x, FFNContext("segment", None, ctx.positions)) is None
