"""Cached, batched generation: same logits as a full forward pass, seeded sampling, EOS, errors.

test_model_cache.py checks the cache itself with fixed tokens; these tests drive it through
`generate`, where each step's input is the token sampled from the previous step's logits.
"""

import pytest
import torch

from lorydata.tokenizer import Tokenizer
from lorytrain.errors import LoryTrainError
from lorytrain.generation import (
    SamplingConfig,
    filter_logits,
    full_forward_logits,
    generate,
    generate_text,
    generate_with_logits,
)
from lorytrain.model import ModelConfig, build_model

VOCAB, T = 64, 4
# inside the first segment, exactly two segments, one token, across a boundary
PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8], [17], [40, 41, 42, 43, 44, 45]]

VARIANTS = {
    "lory": dict(ffn="lory"),
    "topk2": dict(ffn="topk", top_k=2),
    "ec-segment": dict(ffn="expert-choice", ec_level="segment"),
}


def tiny(vocab=VOCAB, **options):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=vocab, n_experts=4, segment_len=T, **options)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def lory():
    return tiny(ffn="lory")


@pytest.mark.parametrize("routing", ["prompt", "segment"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_logits_equal_a_full_forward_pass(name, routing):
    model = tiny(**VARIANTS[name])
    # sampling (not greedy) so that the sequences differ, 14 tokens cross 3-4 segments
    config = SamplingConfig(max_new_tokens=14, temperature=1.0, seed=3)
    out = generate_with_logits(model, PROMPTS, config, routing=routing)
    assert [len(t) for t in out.tokens] == [14] * len(PROMPTS)
    full = full_forward_logits(model, [p + t for p, t in zip(PROMPTS, out.tokens, strict=True)],
                               [len(p) for p in PROMPTS], routing)
    for prompt, new, step_logits, logits in zip(PROMPTS, out.tokens, out.logits, full, strict=True):
        assert step_logits.shape == (len(new), VOCAB)
        torch.testing.assert_close(step_logits, logits[len(prompt) - 1 : len(prompt) - 1 + len(new)],
                                   rtol=1e-4, atol=1e-4)


def test_routing_modes_give_different_logits(lory):
    config = SamplingConfig(max_new_tokens=10, temperature=0)
    by_prompt = generate_with_logits(lory, PROMPTS[1:2], config, routing="prompt").logits[0]
    by_segment = generate_with_logits(lory, PROMPTS[1:2], config, routing="segment").logits[0]
    assert (by_prompt - by_segment).abs().max() > 1e-5


@pytest.mark.parametrize("routing", ["prompt", "segment"])
def test_batched_greedy_equals_one_prompt_at_a_time(lory, routing):
    config = SamplingConfig(max_new_tokens=10, temperature=0)
    batched = generate(lory, PROMPTS, config, routing=routing)
    alone = [generate(lory, [p], config, routing=routing)[0] for p in PROMPTS]
    assert batched == alone
    same_length = torch.tensor([p[:3] for p in PROMPTS if len(p) >= 3])  # a (B, L) tensor works too
    assert generate(lory, same_length, config, routing=routing) == generate(lory, same_length.tolist(), config,
                                                                            routing=routing)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(lory):
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7)
    first = generate(lory, PROMPTS, sampled)
    assert generate(lory, PROMPTS, sampled) == first
    assert generate(lory, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=8)) != first
    greedy = generate(lory, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    assert generate(lory, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1, seed=1)) == greedy
    # a tiny nucleus holds only the most likely token too
    assert generate(lory, PROMPTS, SamplingConfig(max_new_tokens=12, top_p=1e-6, seed=2)) == greedy


def test_the_global_rng_is_left_alone(lory):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(lory, PROMPTS, SamplingConfig(max_new_tokens=4, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(top_p, top_k=0):
        return torch.isfinite(filter_logits(logits, top_k, top_p))[0].nonzero().flatten().tolist()

    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(0.45) == [1]  # the most likely token alone already holds 0.5
    assert kept(0.75) == [1, 3]  # 0.5 + 0.3 reaches 0.75; 0.5 alone does not
    assert kept(0.9) == [1, 2, 3]
    assert kept(0.99) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]
    assert kept(1.0, top_k=2) == [1, 3]
    assert kept(0.9, top_k=2) == [1, 3]
    # filtering never touches the kept logits
    torch.testing.assert_close(filter_logits(logits, 0, 0.75)[0, [1, 3]], logits[0, [1, 3]])


def test_eos_stops_each_sequence_after_emitting_it(lory):
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    free = generate(lory, PROMPTS, config)
    # an EOS that sequence 0 emits at step >= 2, for the first time there
    step = next(i for i in range(2, 12) if free[0][i] not in free[0][:i])
    eos = free[0][step]
    stopped = generate(lory, PROMPTS, config, eos_id=eos)
    with_logits = generate_with_logits(lory, PROMPTS, config, eos_id=eos)
    assert with_logits.tokens == stopped
    assert [len(logits) for logits in with_logits.logits] == [len(t) for t in stopped]
    assert stopped[0] == free[0][: step + 1]
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected


def test_generate_text_round_trip():
    tokenizer = Tokenizer()
    model = tiny(vocab=tokenizer.vocab_size, ffn="lory")
    config = SamplingConfig(max_new_tokens=6, temperature=0)
    texts = generate_text(model, tokenizer, ["fn main() {", ""], config, routing="segment")
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = generate(model, [tokenizer.encode("fn main() {"), [tokenizer.eos_id]], config, "segment",
                   eos_id=tokenizer.eos_id)
    for text, new in zip(texts, ids, strict=True):
        assert text == tokenizer.decode([t for t in new if t != tokenizer.eos_id])


@pytest.mark.parametrize(("prompts", "options", "message"), [
    ([], {}, "at least one prompt"),
    ("hello", {}, "at least one prompt"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([["a", "b"]], {}, "integer token ids"),
    ([[1, 2.5]], {}, "integer token ids"),
    ([[1, VOCAB]], {}, f"token id {VOCAB} outside the vocabulary"),
    ([[-1]], {}, "token id -1 outside"),
    ([[1] * 30], dict(max_len=40), r"longest prompt \(30 tokens\) plus max_new_tokens \(16\) exceeds the 40"),
    ([[1]], dict(routing="tokens"), "routing must be"),
    ([[1]], dict(eos_id=VOCAB), "eos_id"),
])
def test_bad_input_is_reported(lory, prompts, options, message):
    with pytest.raises(LoryTrainError, match=message):
        generate(lory, prompts, SamplingConfig(max_new_tokens=16), **options)


def test_default_length_limit_and_bad_settings(lory):
    with pytest.raises(LoryTrainError, match="exceeds the 4096 positions"):
        generate(lory, [[1] * 4000], SamplingConfig(max_new_tokens=100))
    bad = SamplingConfig(max_new_tokens=0, temperature=-1, top_k=-2, top_p=0)
    with pytest.raises(LoryTrainError) as info:
        generate(lory, [[1]], bad)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p"):
        assert name in str(info.value)
    with pytest.raises(LoryTrainError, match="top_p"):
        SamplingConfig(top_p=1.5).validate()
