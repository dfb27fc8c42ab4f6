"""Configuration of a Lory decoder exported by `lory export-hf` (loaded with trust_remote_code).

Self-contained: this file runs from the exported folder and imports nothing from lory.
"""

from __future__ import annotations

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

FFN_KINDS = ("dense", "lory", "topk", "expert-choice", "prefix")
ROUTING_MODES = ("causal", "segment", "prompt")


class LoryConfig(PreTrainedConfig):
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU) whose FFNs are dense, Lory soft-merged
    MoE layers (routed once per segment from the previous segment), token-choice top-k or
    expert-choice layers.

    Args:
        vocab_size: embedding rows.
        hidden_size: d.
        num_hidden_layers: decoder blocks.
        num_attention_heads: heads (head size d / heads).
        intermediate_size: inner size f of every FFN and expert.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        ffn: dense | lory | topk | expert-choice | prefix.
        n_experts: experts per MoE layer.
        segment_len: routing segment length T (lory, prefix, segment-level expert choice).
        first_segment: routing of the first segment in training: "self" (the paper's rule, on
            its own mean) or "uniform" (weights 1/E).
        moe_top_k: experts per token of topk (not `top_k`, which transformers reserves for sampling).
        ec_level: "token" or "segment" for expert-choice.
        routing: how the lory family routes at inference, in a forward pass and in `generate()`:
            "causal" (default: segment k > 0 by segment k-1, segment 0's token t by the running
            mean of tokens 0..t; no logit depends on a later token), "segment" (the paper's
            training rule: segment 0 by its own mean) or "prompt" (the paper's generation rule:
            route once on the prompt). See modeling_lory.py.
        max_position_embeddings: the training sequence length (lm-eval's `--model hf` cuts
            requests to it, as lory's harness does; RoPE itself has no limit).
    """

    model_type = "lory"

    def __init__(self, vocab_size: int = 8192, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, intermediate_size: int = 176, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-5, ffn: str = "dense", n_experts: int = 8, segment_len: int = 256,
                 first_segment: str = "self", moe_top_k: int = 1, ec_level: str = "token",
                 routing: str = "causal", max_position_embeddings: int = 4096, **kwargs):
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {ffn!r}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.ffn = ffn
        self.n_experts = n_experts
        self.segment_len = segment_len
        self.first_segment = first_segment
        self.moe_top_k = moe_top_k
        self.ec_level = ec_level
        self.routing = routing
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
