"""export-hf and export-dense: the exported models compute what lory computes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lorydata.tokenizer import Tokenizer
from lorytrain.errors import LoryTrainError
from lorytrain.export.dense import average_routing, export_llama, merge_to_dense, vllm_head_size_warning
from lorytrain.export.hf import export_hf
from lorytrain.generation import SamplingConfig, generate
from lorytrain.model import LoryLM, ModelConfig

VOCAB = 97
# every --ffn kind, with the variants that change the exported math
KINDS = {
    "dense": {"ffn": "dense"},
    "lory": {"ffn": "lory"},
    "lory-uniform-first": {"ffn": "lory", "first_segment": "uniform"},
    "lory-samoe": {"ffn": "lory", "samoe_pool": 3},
    "prefix": {"ffn": "prefix"},
    "topk-1": {"ffn": "topk", "top_k": 1},
    "topk-2": {"ffn": "topk", "top_k": 2},
    "expert-choice-token": {"ffn": "expert-choice", "ec_level": "token"},
    "expert-choice-segment": {"ffn": "expert-choice", "ec_level": "segment"},
}


def tiny(kind: str, vocab: int = VOCAB, seed: int = 0) -> LoryLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, segment_len=8, n_experts=4,
                         **KINDS[kind])
    model = LoryLM(config).eval()
    with torch.no_grad():  # sharp routers: routing decisions change the logits visibly
        for block in model.layers:
            ffn = block.ffn
            router = getattr(getattr(ffn, "routing", None), "router", None) or getattr(ffn, "router", None)
            if router is not None:
                router.weight.mul_(40)
    return model


def load_hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def load_hf_with(folder, **config):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **config).eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_logits_equal_lory_forward(kind, tmp_path):
    model = tiny(kind)
    hf = load_hf(export_hf(model, tmp_path / "hf"))
    assert hf.config.routing == "causal"
    ids = torch.randint(0, VOCAB, (2, 29))  # 3 full segments and a partial one
    with torch.no_grad():
        assert (model(ids, routing="causal") - hf(ids).logits).abs().max() <= 1e-4
        for routing in ("causal", "segment", "prompt"):  # every mode of an uncached pass
            assert (model(ids, routing=routing) - hf(ids, routing=routing).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", list(KINDS))
def test_appending_tokens_never_changes_earlier_logits_of_an_export(kind, tmp_path):
    hf = load_hf(export_hf(tiny(kind), tmp_path / "hf"))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 29), generator=generator)
    with torch.no_grad():
        reference = hf(ids).logits
        for p in range(1, 29, 2):  # inside the first segment of 8 tokens too
            changed = ids.clone()
            changed[:, p:] = torch.randint(0, VOCAB, (2, 29 - p), generator=generator)
            assert (hf(changed).logits[:, :p] - reference[:, :p]).abs().max() <= 1e-5
            assert (hf(ids[:, :p]).logits - reference[:, :p]).abs().max() <= 1e-5  # or cut off


def test_the_papers_segment_rule_does_see_later_tokens(tmp_path):
    """The check above is sensitive: with routing="segment" the first segment is not causal."""
    hf = load_hf(export_hf(tiny("lory"), tmp_path / "hf", routing="segment"))
    ids = torch.randint(0, VOCAB, (1, 29))
    with torch.no_grad():
        assert (hf(ids[:, :5]).logits - hf(ids).logits[:, :5]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["lory", "prefix", "topk-2", "expert-choice-segment", "lory-uniform-first", "dense"])
@pytest.mark.parametrize("routing", ["causal", "segment", "prompt"])
def test_generate_equals_lory_generate_cached_or_not(kind, routing, tmp_path):
    model = tiny(kind)
    hf = load_hf(export_hf(model, tmp_path / "hf", routing=routing))
    prompt = torch.randint(0, VOCAB, (1, 5))
    steps = 22  # from inside the first segment across several routing segments of 8 tokens
    greedy = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=steps, temperature=0), routing=routing)
    for use_cache in (True, False):
        out = hf.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=use_cache)
        assert out[0, 5:].tolist() == greedy[0], use_cache
    # sampled: lory seeds its own generator, transformers draws from the global one with the same seed
    sampled = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=steps, temperature=0.8, seed=5),
                       routing=routing)
    torch.manual_seed(5)
    out = hf.generate(prompt, max_new_tokens=steps, do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
    assert out[0, 5:].tolist() == sampled[0]


@pytest.mark.parametrize("kind", ["lory", "expert-choice-segment"])
@pytest.mark.parametrize("routing", ["causal", "segment", "prompt"])
def test_generate_batches_left_padded_prompts(kind, routing, tmp_path):
    model = tiny(kind)
    hf = load_hf(export_hf(model, tmp_path / "hf", routing=routing))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23]]
    expected = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0), routing=routing)
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 10 - len(prompt) :], mask[row, 10 - len(prompt) :] = torch.tensor(prompt), 1
    for use_cache in (True, False):
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          use_cache=use_cache)
        assert out[:, 10:].tolist() == expected, use_cache


def test_export_refuses_an_unknown_routing_mode(tmp_path):
    with pytest.raises(LoryTrainError, match="routing must be one of causal, segment, prompt"):
        export_hf(tiny("lory"), tmp_path / "hf", routing="tokens")


def test_export_ships_a_working_tokenizer_and_refuses_to_overwrite(tmp_path, default_tokenizer_path):
    tok = Tokenizer(default_tokenizer_path)
    model = tiny("lory", vocab=tok.vocab_size)
    folder = export_hf(model, tmp_path / "hf", default_tokenizer_path)
    hf_tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    text = "git rebase --onto main"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lory.LoryForCausalLM"
    assert (config["routing"], config["first_segment"]) == ("causal", "self")
    card = (folder / "README.md").read_text()
    assert "`causal` (default)" in card and "`segment`" in card and "`prompt`" in card
    # the paper's rule is a flag away
    assert load_hf_with(folder, routing="segment").config.routing == "segment"
    for name in ("modeling_lory.py", "configuration_lory.py"):
        assert "lory" + "train" not in (folder / name).read_text()  # runs without lory installed
    with pytest.raises(LoryTrainError, match="not empty"):
        export_hf(model, folder)


def fix_routing(model: LoryLM, weights: list[torch.Tensor]) -> None:
    """Make every Lory layer route every segment with the given fixed weights."""
    for block, w in zip(model.layers, weights, strict=True):
        routing = block.ffn.routing
        routing.forward = lambda x, ctx, w=w, T=routing.segment_len: (w.expand(x.shape[0], -(-x.shape[1] // T), -1), T)


@pytest.mark.parametrize("kind", ["lory", "lory-samoe", "prefix"])
def test_dense_llama_equals_lory_under_fixed_routing(kind, tmp_path):
    model = tiny(kind)
    torch.manual_seed(1)
    weights = [torch.softmax(2 * torch.randn(4), 0) for _ in model.layers]
    folder = export_llama(merge_to_dense(model, weights), tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    fix_routing(model, weights)
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        assert (model(ids) - llama(ids).logits).abs().max() <= 1e-4


def test_merge_refuses_token_level_moe():
    with pytest.raises(LoryTrainError, match="per token"):
        merge_to_dense(tiny("topk-2"), [None, None])


def test_average_routing_over_text_is_the_mean_segment_weight(default_tokenizer_path):
    tok = Tokenizer(default_tokenizer_path)
    model = tiny("lory", vocab=tok.vocab_size)
    text = "git rebase replays commits on top of another base. " * 6
    average = average_routing(model, text, tok, seq_len=32)
    ids = [tok.eos_id, *tok.encode(text)]
    per_layer = [[] for _ in model.layers]
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            model(torch.tensor([ids[start : start + 32]]))
            for layer, stats in enumerate(model.routing_stats()):
                per_layer[layer].append(stats.segment_weights[0])
    for layer, weights in enumerate(per_layer):
        expected = torch.cat(weights).mean(0)
        assert torch.allclose(average.weights[layer], expected, atol=1e-6)
    assert average.segments == sum(w.shape[0] for w in per_layer[0])
    with pytest.raises(LoryTrainError, match="domains"):
        average_routing(model, text, tok, domain="git")


def test_vllm_head_size_warning_names_what_fits():
    tiny_preset = vllm_head_size_warning(64, 4)  # the tiny preset: heads of 16
    assert "head size 16" in tiny_preset and "CPU backend" in tiny_preset and "at least 32" in tiny_preset
    assert "--model-override n_heads=2" in tiny_preset
    cpu_only = vllm_head_size_warning(96, 2)  # 48: FlashAttention and Triton take it, the CPU backend not
    assert "CPU backend" in cpu_only and "GPU" not in cpu_only and "3 heads of 32" in cpu_only
    assert "multiple of 8" in vllm_head_size_warning(600, 10)
    for d_model, heads in ((64, 2), (256, 4), (1024, 16), (1536, 24)):  # 32, 64, 64, 64
        assert vllm_head_size_warning(d_model, heads) is None
