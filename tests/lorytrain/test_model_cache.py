"""KV-cached incremental decoding gives the logits of one full forward pass with the same routing."""

import pytest
import torch

from lorytrain.errors import LoryTrainError
from lorytrain.model import ModelConfig, build_model
from tests.lorytrain.runkit import FFN_VARIANTS

T, VOCAB = 8, 50
PROMPT_LENS = [3, 8, 13]  # inside segment 1, exactly one segment, across a boundary

VARIANTS = FFN_VARIANTS


def decode(model, prompts, lens, new_tokens, routing):
    """Prefill, then 1 token per call, then the last 3 tokens in one call; logits per sequence."""
    cache = model.new_cache(len(lens), 48, routing=routing)
    logits = model(prompts, cache=cache, prompt_lens=torch.tensor(lens))
    per_seq = [[logits[b, : lens[b]]] for b in range(len(lens))]
    steps = [new_tokens[:, i : i + 1] for i in range(new_tokens.shape[1] - 3)] + [new_tokens[:, -3:]]
    for chunk in steps:
        out = model(chunk, cache=cache)
        for b in range(len(lens)):
            per_seq[b].append(out[b])
    assert cache.lengths.tolist() == [n + new_tokens.shape[1] for n in lens]
    return [torch.cat(parts) for parts in per_seq]


@pytest.mark.parametrize("routing", ["segment", "prompt"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_matches_a_full_forward_pass(name, routing):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=4, segment_len=T, **VARIANTS[name])
    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (3, max(PROMPT_LENS)), generator=generator)
    new_tokens = torch.randint(0, VOCAB, (3, 14), generator=generator)
    lens = torch.tensor(PROMPT_LENS)
    with torch.no_grad():
        cached = decode(model, prompts, PROMPT_LENS, new_tokens, routing)
        full_ids = torch.zeros(3, max(PROMPT_LENS) + 14, dtype=torch.long)  # right-padded sequences
        for b, n in enumerate(PROMPT_LENS):
            full_ids[b, : n + 14] = torch.cat([prompts[b, :n], new_tokens[b]])
        full = model(full_ids, routing=routing, prompt_lens=lens)
    for b, n in enumerate(PROMPT_LENS):
        torch.testing.assert_close(cached[b], full[b, : n + 14], rtol=1e-4, atol=1e-4)


def test_segment_and_prompt_routing_differ_and_prompt_routing_keeps_one_merge():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=VOCAB, ffn="lory", n_experts=4, segment_len=T))
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert (model(ids, routing="segment") - model(ids, routing="prompt")).abs().max() > 1e-4
        cache = model.new_cache(1, 40, routing="prompt")
        model(ids[:, :5], cache=cache)
        weights = [s.segment_weights.clone() for s in model.routing_stats()]
        for i in range(5, 30):
            model(ids[:, i : i + 1], cache=cache)
        for before, stats in zip(weights, model.routing_stats(), strict=True):
            torch.testing.assert_close(stats.segment_weights, before)


def test_cache_misuse_is_reported():
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=VOCAB, ffn="lory", n_experts=4))
    cache = model.new_cache(2, 6)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(LoryTrainError, match="routing"):
        model(ids, cache=cache, routing="prompt")
    with pytest.raises(LoryTrainError, match="prompt_lens"):
        model(ids, cache=cache, prompt_lens=[5, 1])
    model(ids, cache=cache)
    with pytest.raises(LoryTrainError, match="prefill"):
        model(ids[:, :1], cache=cache, prompt_lens=[1, 1])
    with pytest.raises(LoryTrainError, match="holds 6 positions"):
        model(ids, cache=cache)
    with pytest.raises(LoryTrainError, match="routing must be"):
        model.new_cache(1, 4, routing="tokens")
