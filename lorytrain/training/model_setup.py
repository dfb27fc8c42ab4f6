"""The model side of a training run: which model a config means, its optimizer, the
dense → MoE switch with optimizer state carried over (shard by shard under FSDP), and what
gets logged about it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorytrain.errors import LoryTrainError
from lorytrain.model import (
    LoryLM,
    ModelConfig,
    build_model,
    count_parameters,
    flops_per_token,
    peak_bf16_flops,
    upcycle,
)
from lorytrain.model.shards import fill_shard_, full_tensor
from lorytrain.training.config import TrainConfig
from lorytrain.training.distributed import unwrap

# AdamW weight decay applies to matrices only; routers and SaMoE mixtures stay undecayed
# because shrinking them flattens the routing distribution towards uniform.
NO_DECAY_SUFFIXES = ("router.weight", "mix_logits")

# Training config fields that must agree between a checkpoint and the run resuming it:
# they define the model, the data order or the step arithmetic.
RESUME_FIELDS = ("preset", "ffn", "experts", "segment_len", "model_overrides", "batch_size", "tokens_per_step",
                 "seed", "dense_warmup")

# Above this many parameters a config is refused before anything is allocated (4 TB in fp32).
MAX_PARAMETERS = 10**12


def check_size(config: ModelConfig, source: str = "the model config") -> str:
    """A one-line description of the model's size, computed without building it.

    Args:
        config: a validated model config.
        source: where the config comes from, for the message.

    Raises:
        LoryTrainError: it has more than `MAX_PARAMETERS` parameters.
    """
    count = count_parameters(config)
    if count.total > MAX_PARAMETERS:
        raise LoryTrainError(f"{source} describes a model of {count.total:,} parameters, more than the "
                             f"{MAX_PARAMETERS:,} lory builds; refused before allocating anything")
    kind = "dense" if not config.is_moe else f"{config.ffn} × {config.n_experts} experts"
    return (f"{kind}, {config.n_layers} layers, d {config.d_model}: {count.total / 1e6:,.2f}M parameters "
            f"({count.active / 1e6:,.2f}M active)")


def config_from_state(state: dict, source: str | Path) -> ModelConfig:
    """The validated `ModelConfig` a checkpoint's `state.json` records.

    Raises:
        LoryTrainError: missing, malformed, out of bounds or too large (one line naming `source`).
    """
    if not isinstance(state, dict) or "model_config" not in state:
        raise LoryTrainError(f"{source} records no model_config")
    try:
        config = ModelConfig.from_dict(state["model_config"])
    except LoryTrainError as exc:
        raise LoryTrainError(f"{source}: model_config: {exc}") from None
    check_size(config, str(source))
    return config


def check_weights_fit(config: ModelConfig, weights: str | Path) -> None:
    """Check that a safetensors file holds exactly the tensors `config`'s model has, shape for
    shape, reading only the file's header and building the model on the meta device (no
    memory): a config that does not describe the weights is refused before allocating.

    Raises:
        LoryTrainError: naming the first tensor that is missing, unexpected or of another shape.
    """
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(config).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not iterable)
    except (OSError, SafetensorError) as exc:
        raise LoryTrainError(f"cannot read {weights}: {exc}") from None
    for name in sorted(set(expected) | set(saved)):
        if expected.get(name) != saved.get(name):
            raise LoryTrainError(f"{weights} does not hold the model its config describes: {name} is "
                                 f"{saved.get(name, 'missing')} in the file, {expected.get(name, 'absent')} in the model")


# Dense bf16 peak FLOP/s of common accelerators, for the MFU estimate.
def model_config(config: TrainConfig, vocab_size: int, phase: str = "moe") -> ModelConfig:
    """The `ModelConfig` of a run: preset, then the run's FFN options and overrides.

    Args:
        config: the training config.
        vocab_size: the tokenizer's vocabulary size (from the shards' manifest).
        phase: "dense" for the parameter-matched dense model trained before upcycling.
    """
    overrides = dict(config.model_overrides)
    overrides.update(vocab_size=vocab_size, ffn=config.ffn, n_experts=config.experts,
                     segment_len=config.segment_len)
    if config.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    model = ModelConfig.from_preset(config.preset, **overrides)
    return model.dense() if phase == "dense" else model


def build(config: TrainConfig, phase: str, vocab_size: int, seq_len: int) -> LoryLM:
    """A freshly initialised model for `phase` ("dense" or "moe")."""
    model = build_model(model_config(config, vocab_size, phase))
    if model.config.is_moe and model.config.segment_len > seq_len:
        raise LoryTrainError(f"segment_len {model.config.segment_len} exceeds the shards' seq_len {seq_len}: "
                             "every sequence would be one segment routed on itself; lower --segment-len")
    return model


def empty_model(config: ModelConfig, device: str | torch.device) -> LoryLM:
    """A model with uninitialised weights on `device`, for loading a state dict into: no
    initialisation work and no RNG draws. Tied embeddings are re-tied after allocation."""
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def check_compatible(state: dict, config: TrainConfig, tokenizer: dict, seq_len: int) -> None:
    """Refuse to resume a checkpoint made for another model, data or tokenizer.

    Raises:
        LoryTrainError: naming every field that differs.
    """
    _check_resume_fields(state)
    saved = state["config"]
    problems = [f"{name} ({saved.get(name)!r:.80} in the checkpoint, {getattr(config, name)!r} now)"
                for name in RESUME_FIELDS if saved.get(name) != _jsonable(getattr(config, name))]
    if state.get("seq_len") != seq_len:
        problems.append(f"seq_len ({state.get('seq_len')} in the checkpoint, {seq_len} in the shards)")
    if state["tokenizer"].get("sha256") != tokenizer.get("sha256"):
        problems.append("tokenizer (the shards were made with another tokenizer than the checkpoint's)")
    if problems:
        raise LoryTrainError("cannot resume: the checkpoint differs in " + "; ".join(problems))


def _check_resume_fields(state: dict) -> None:
    """The fields resuming reads from `state.json`, with the types lory writes (the folder may
    come from anywhere)."""
    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problems = [f"{key} is {state.get(key)!r:.80}" for key in ("step", "tokens") if not count(state.get(key))]
    if state.get("phase") not in ("dense", "moe"):
        problems.append(f"phase is {state.get('phase')!r:.80}, not 'dense' or 'moe'")
    for key in ("config", "tokenizer", "data"):
        if not isinstance(state.get(key), dict):
            problems.append(f"{key} is not an object")
    if problems:
        raise LoryTrainError("cannot resume: the checkpoint's state.json is not one lory wrote (" + "; ".join(problems)
                             + ")")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def optimizer_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters with and without weight decay (matrices except routers and
    SaMoE mixtures decay; norms do not)."""
    decay, no_decay = [], []
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(name)
    return decay, no_decay


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, β = config.betas, weight decay on the `optimizer_groups` that take it."""
    params = dict(unwrap(model).named_parameters())
    decay, no_decay = optimizer_groups(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": config.weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=1e-8)


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weighted auxiliary losses of the last forward pass (empty for dense and Lory)."""
    return unwrap(model).aux_losses()


def upcycle_model(dense: LoryLM, config: TrainConfig, shard: Callable[[LoryLM], object] | None = None) -> LoryLM:
    """The run's MoE model upcycled from `dense` (`lorytrain.model.upcycle`; with `shard`,
    each process builds only its shards)."""
    bare = unwrap(dense)
    return upcycle(bare, model_config(config, bare.config.vocab_size, "moe"), shard=shard)


@torch.no_grad()
def carry_optimizer_state(dense: nn.Module, dense_optimizer: torch.optim.Optimizer, moe: nn.Module,
                          moe_optimizer: torch.optim.Optimizer) -> None:
    """Give the upcycled model's optimizer the dense model's Adam state.

    Shared weights keep their moments; every expert starts from its dense FFN's moments
    (each expert is a copy of that FFN), so the first MoE steps move experts exactly as the
    dense steps moved the FFN; routers start with empty state. Under FSDP each process
    fills only its shards of the expert moments, gathering one dense FFN's moments at a time.

    Args:
        dense: the dense model `dense_optimizer` updated (it and its optimizer are spent after).
        dense_optimizer: its optimizer.
        moe: the model `upcycle_model` made of it.
        moe_optimizer: the fresh optimizer of `moe` (`make_optimizer`).
    """
    dense_params = dict(unwrap(dense).named_parameters())
    for name, param in unwrap(moe).named_parameters():
        source = dense_params.get(name.replace(".ffn.experts.w", ".ffn.w"))
        old = dense_optimizer.state.get(source, {}) if source is not None else {}
        state = {}
        for key, value in old.items():
            if value.ndim == 0 or value.shape == param.shape:  # the step count; a shared weight's moments
                state[key] = value.clone() if value.ndim == 0 else value
            else:
                state[key] = torch.empty_like(param)
                fill_shard_(state[key], full_tensor(value).unsqueeze(0).expand(param.shape))
        if state:
            moe_optimizer.state[param] = state


def expert_use(model: nn.Module) -> list[list[float]] | None:
    """Per MoE layer, the share of segments (or assignments) each expert got in the last
    forward pass; None for a dense model."""
    stats = [s for s in unwrap(model).routing_stats() if s is not None]
    if not stats:
        return None
    return [[round(float(v), 4) for v in s.expert_use()] for s in stats]


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, when it is one we know."""
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def mfu(model: nn.Module, tokens_per_s: float, device: torch.device, seq_len: int) -> float | None:
    """Model FLOPs utilisation of one device: achieved training FLOP/s over the bf16 peak."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return flops_per_token(unwrap(model).config, seq_len) * tokens_per_s / peak


def model_config_dict(model: nn.Module) -> dict:
    return unwrap(model).config.to_dict()
