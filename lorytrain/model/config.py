"""`ModelConfig`: the shape of a decoder and the kind of FFN it uses, plus named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, replace

from lorytrain.errors import LoryTrainError

FFN_KINDS = ("dense", "lory", "topk", "expert-choice", "prefix")
SEGMENT_ROUTED = ("lory", "prefix")  # soft merging of whole segments
SAMOE_KINDS = ("lory", "prefix", "topk")  # FFN kinds that can draw their experts from a SaMoE pool

# Upper bounds of the integer sizes, far above any real model (the paper's largest has d 1536,
# 48 layers, 32 experts) but low enough that a config read from a run folder cannot make lory
# allocate without end: a `state.json` comes from wherever the folder came from.
SIZE_LIMITS = {"vocab_size": 1 << 22, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "ffn_dim": 1 << 18,
               "n_experts": 4096, "segment_len": 1 << 20, "top_k": 4096}
COUNT_LIMITS = {"samoe_pool": 4096, "merge_chunk": 1 << 20, "merge_tile": 1 << 20}  # 0 allowed


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU) and its FFN/MoE layer.

    Options that do not apply to the chosen `ffn` are ignored (e.g. `top_k` for `lory`).

    Args:
        vocab_size: embedding rows; set it from the tokenizer (the bundled one has 8192).
        d_model: hidden size d.
        n_layers: decoder blocks.
        n_heads: attention heads (head size d / n_heads, even for RoPE).
        ffn_dim: inner size f of the dense FFN and of every expert.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the input embedding with the output projection.
        init_std: std of the normal initialisation (output projections get
            init_std / sqrt(2 n_layers)).
        ffn: dense | lory | topk | expert-choice | prefix.
        n_experts: experts E per MoE layer.
        segment_len: routing segment length T of lory, prefix and segment-level EC.
        first_segment: "self" (paper: segment 1 routes on its own mean, stop-gradient on its
            weights) or "uniform" (strictly causal: segment 1 uses weights 1/E). lory/prefix only.
        top_k: experts per token of `topk` (k = 1: Switch gate p; k > 1: renormalised gates).
        ec_level: "token" or "segment" for `expert-choice`.
        capacity_factor: expert-choice capacity c (each expert takes c·n/E tokens or segments).
        ec_threshold_momentum: EMA momentum of the per-expert score thresholds that the causal
            inference rule of expert choice uses.
        balance_loss_weight: weight of the Switch load-balancing loss of `topk`.
        z_loss_weight: weight of the router z-loss of `topk`.
        samoe_pool: G > 0 draws every layer's experts from a global pool of G expert FFNs
            shared by all layers (SaMoE); lory, prefix and topk only.
        merge_chunk: segments merged per step by the Lory layer (0: all of them).
        merge_tile: inner FFN units merged per step (0: sized so the merged tile stays in a
            CPU's cache, or within 2^28 elements on a GPU); bounds transient merged weights.
        activation_checkpointing: recompute each block's activations in the backward pass.
        router_init_std: std of the routers' normal initialisation (0: `init_std`), at
            upcycling and from scratch; larger values start routing further from uniform.
        upcycle_noise: at upcycling, add to every expert copy Gaussian noise of this std relative
            to the dense FFN's own (per gate/up/down part), centred over the experts so that their
            mean is still the dense FFN; breaks the experts' symmetry (0: exact copies, the paper).
    """

    vocab_size: int = 32000
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    ffn_dim: int = 2816
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    ffn: str = "dense"
    n_experts: int = 8
    segment_len: int = 256
    first_segment: str = "self"
    top_k: int = 1
    ec_level: str = "token"
    capacity_factor: float = 1.0
    ec_threshold_momentum: float = 0.99
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    samoe_pool: int = 0
    merge_chunk: int = 0
    merge_tile: int = 0
    activation_checkpointing: bool = False
    router_init_std: float = 0.0
    upcycle_noise: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.ffn != "dense"

    def dense(self) -> ModelConfig:
        """The parameter-matched dense config this MoE config upcycles from."""
        return replace(self, ffn="dense", samoe_pool=0)

    def validate(self) -> ModelConfig:
        """Raise `LoryTrainError` naming every value that cannot work (types, signs, the
        bounds of `SIZE_LIMITS` and `COUNT_LIMITS`); returns self. Nothing is allocated.
        `lorytrain.training.model_setup.check_size` bounds the parameter count."""
        problems = _type_problems(self)
        if problems:
            raise LoryTrainError("; ".join(problems))
        if self.d_model % self.n_heads or self.head_dim % 2:
            problems.append(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.ffn not in FFN_KINDS:
            problems.append(f"ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        if self.first_segment not in ("self", "uniform"):
            problems.append(f"first_segment must be 'self' or 'uniform', got {self.first_segment!r}")
        if self.ec_level not in ("token", "segment"):
            problems.append(f"ec_level must be 'token' or 'segment', got {self.ec_level!r}")
        if self.is_moe and self.n_experts < 2:
            problems.append(f"an MoE layer needs n_experts >= 2, got {self.n_experts}")
        if self.ffn == "topk" and self.top_k > self.n_experts:
            problems.append(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if not self.capacity_factor > 0:
            problems.append(f"capacity_factor must be positive, got {self.capacity_factor}")
        if not 0 <= self.ec_threshold_momentum < 1:
            problems.append(f"ec_threshold_momentum must be in [0, 1), got {self.ec_threshold_momentum}")
        if self.samoe_pool and self.ffn not in SAMOE_KINDS:
            problems.append(f"samoe_pool works with ffn {', '.join(SAMOE_KINDS)}, not {self.ffn!r}")
        if self.ffn == "expert-choice" and self.first_segment == "uniform":
            problems.append("first_segment='uniform' applies to lory and prefix, not expert-choice")
        if problems:
            raise LoryTrainError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build and validate from a dict, refusing unknown keys."""
        if not isinstance(data, dict):
            raise LoryTrainError(f"a model config must be a mapping of option names to values, got {data!r:.80}")
        _check_keys(data)
        return cls(**data).validate()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (`tiny`, `small`, `0.3b`, `1.5b`) with fields overridden.

        Overrides whose value is None are ignored, so optional CLI values can be passed through.

        Raises:
            LoryTrainError: unknown preset, unknown field or invalid value.
        """
        if name not in PRESETS:
            raise LoryTrainError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        _check_keys(overrides)
        return replace(PRESETS[name], **overrides).validate()


def _type_problems(config: ModelConfig) -> list[str]:
    """Wrong types, signs and sizes: checked before any arithmetic on the values."""
    problems = []
    for name, limit in SIZE_LIMITS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            problems.append(f"{name} must be a positive integer up to {limit:,}, got {value!r:.80}")
    for name, limit in COUNT_LIMITS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            problems.append(f"{name} must be an integer from 0 to {limit:,}, got {value!r:.80}")
    for name in ("rope_theta", "norm_eps", "init_std", "capacity_factor", "ec_threshold_momentum",
                 "balance_loss_weight", "z_loss_weight", "router_init_std", "upcycle_noise"):
        value, positive = getattr(config, name), name in ("rope_theta", "norm_eps", "init_std")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{name} must be a finite number, got {value!r:.80}")
        elif value < 0 or (positive and value == 0):
            problems.append(f"{name} must be {'positive' if positive else '>= 0'}, got {value!r}")
    for name in ("tie_embeddings", "activation_checkpointing"):
        if not isinstance(getattr(config, name), bool):
            problems.append(f"{name} must be true or false, got {getattr(config, name)!r:.80}")
    for name in ("ffn", "first_segment", "ec_level"):
        if not isinstance(getattr(config, name), str):
            problems.append(f"{name} must be a string, got {getattr(config, name)!r:.80}")
    return problems


def _check_keys(data: dict) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoryTrainError(f"unknown model option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")


# f follows LLaMA's rule (2/3 · 4d rounded up to a multiple of 256 for the paper sizes), which
# lands the paper's total parameter counts with a 32k vocabulary: 0.3b → 1.83B / 3.49B / 6.81B
# and 1.5b → 7.80B / 15.05B / 29.54B for 8 / 16 / 32 experts.
PRESETS: dict[str, ModelConfig] = {
    # tests and quick CPU checks: a few hundred thousand parameters plus the embeddings
    "tiny": ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, ffn_dim=176, segment_len=32),
    # CPU reproductions: ~1M parameters per layer (dense), 4 segments of 128 in a 512-token sequence
    "small": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_dim=688, segment_len=128),
    "0.3b": ModelConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, ffn_dim=2816, segment_len=256),
    "1.5b": ModelConfig(vocab_size=32000, d_model=1536, n_layers=48, n_heads=24, ffn_dim=4096, segment_len=256),
}
