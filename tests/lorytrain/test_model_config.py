"""Presets, overrides and errors of ModelConfig; parameter counts of the paper's models; FLOPs."""

import pytest
import torch

from lorydata.errors import LoryError
from lorytrain import LoryTrainError, ModelConfig, build_model, count_parameters, flops_per_token
from lorytrain.model import PRESETS

# total parameters the paper reports (32k vocabulary)
PAPER_TOTALS = {("0.3b", 8): 1.8e9, ("0.3b", 16): 3.5e9, ("0.3b", 32): 6.8e9,
                ("1.5b", 8): 7.8e9, ("1.5b", 16): 15.0e9, ("1.5b", 32): 29.5e9}


@pytest.mark.parametrize("preset,experts", list(PAPER_TOTALS))
def test_paper_presets_match_the_paper_parameter_counts(preset, experts):
    config = ModelConfig.from_preset(preset, ffn="lory", n_experts=experts)
    with torch.device("meta"):
        model = build_model(config)
    built = model.num_parameters()
    assert built == count_parameters(config).total
    assert abs(built / PAPER_TOTALS[preset, experts] - 1) < 0.03


def test_paper_presets_shapes():
    small, large = PRESETS["0.3b"], PRESETS["1.5b"]
    assert (small.n_layers, small.d_model, small.n_heads, small.segment_len) == (24, 1024, 16, 256)
    assert (large.n_layers, large.d_model, large.n_heads) == (48, 1536, 24)


@pytest.mark.parametrize("options", [
    dict(ffn="dense"), dict(ffn="lory"), dict(ffn="prefix", tie_embeddings=True), dict(ffn="topk", top_k=2),
    dict(ffn="expert-choice", ec_level="segment"), dict(ffn="lory", samoe_pool=3), dict(ffn="topk", samoe_pool=5),
])
def test_count_parameters_matches_built_models(options):
    config = ModelConfig.from_preset("tiny", vocab_size=100, **options)
    counted = count_parameters(config)
    assert build_model(config).num_parameters() == counted.total
    dense = count_parameters(config.dense())
    if options["ffn"] in ("lory", "prefix"):
        assert counted.active == dense.total + config.n_layers * config.d_model * config.n_experts


def test_vocab_size_and_other_fields_are_overridable_on_every_preset():
    for name in PRESETS:
        config = ModelConfig.from_preset(name, vocab_size=8192, ffn="lory", n_experts=16, segment_len=None)
        assert config.vocab_size == 8192 and config.n_experts == 16
        assert config.segment_len == PRESETS[name].segment_len
        assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("call,message", [
    (lambda: ModelConfig.from_preset("huge"), "unknown model preset 'huge'"),
    (lambda: ModelConfig.from_preset("tiny", n_expert=4), "unknown model option.*n_expert"),
    (lambda: ModelConfig.from_preset("tiny", ffn="moe"), "ffn must be one of"),
    (lambda: ModelConfig.from_preset("tiny", ffn="expert-choice", samoe_pool=4), "samoe_pool works with"),
    (lambda: ModelConfig.from_preset("tiny", ffn="expert-choice", first_segment="uniform"), "applies to lory"),
    (lambda: ModelConfig.from_preset("tiny", ffn="topk", n_experts=2, top_k=3), "top_k 3 exceeds"),
    (lambda: ModelConfig.from_preset("tiny", n_heads=5), "heads of even size"),
    (lambda: ModelConfig.from_preset("tiny", segment_len=0), "segment_len must be a positive integer"),
    (lambda: ModelConfig.from_dict({"d_model": 64, "layers": 2}), "unknown model option"),
])
def test_bad_configs_raise_one_line_lory_errors(call, message):
    with pytest.raises(LoryTrainError, match=message) as info:
        call()
    assert isinstance(info.value, LoryError) and "\n" not in str(info.value)


def test_bad_forward_options_raise():
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=20))
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(LoryTrainError, match="routing must be"):
        model(ids, routing="token")
    with pytest.raises(LoryTrainError, match="prompt_lens"):
        model(ids, prompt_lens=[0, 5])


def test_flops_per_token_counts_params_attention_and_merge():
    seq = 512
    dense = ModelConfig.from_preset("small")
    d, f, layers, vocab = dense.d_model, dense.ffn_dim, dense.n_layers, dense.vocab_size
    matmul_params = count_parameters(dense).total - vocab * d - (2 * layers + 1) * d  # no lookup, no norms
    assert flops_per_token(dense, seq) == 6 * matmul_params + 12 * layers * d * seq
    lory = ModelConfig.from_preset("small", ffn="lory", n_experts=8)
    merge = layers * (18 * 8 * d * f + 6 * d * 8) / lory.segment_len
    assert flops_per_token(lory, seq) == pytest.approx(flops_per_token(dense, seq) + merge)
    topk = ModelConfig.from_preset("small", ffn="topk", top_k=2, n_experts=8)
    assert flops_per_token(topk, seq) == pytest.approx(flops_per_token(dense, seq) + layers * (18 * d * f + 6 * d * 8))
