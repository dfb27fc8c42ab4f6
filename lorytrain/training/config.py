"""`TrainConfig`: everything a training run is told, from a YAML/TOML file plus CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorydata.errors import LoryDataError
from lorydata.remote import parse_size
from lorytrain.errors import LoryTrainError


@dataclass
class TrainConfig:
    """A training run.

    Args:
        data: shard folder to train on, or its URL (`s3://bucket/prefix/train`).
        out: run folder (checkpoints, metrics.jsonl, TensorBoard events).
        eval_data: held-out shard folder (or URL) for periodic evaluation (per-domain loss).
        cache_dir: local cache of shards streamed from a URL (default `~/.cache/lory/shards`).
        cache_limit: most bytes in `cache_dir` (e.g. "20GB"; default 3 shards per
            dataloader worker).
        preset: model size preset (`lorytrain.ModelConfig.from_preset`).
        ffn: dense | lory | topk | expert-choice | prefix.
        experts: experts per MoE layer.
        segment_len: Lory routing segment length T.
        model_overrides: further `ModelConfig` fields (e.g. {"n_layers": 2}).
        seq_len: tokens per sequence; must match the shards (None: take the shards').
        batch_size: sequences per micro-batch on each rank.
        tokens_per_step: tokens per optimizer step over all ranks; sets gradient
            accumulation (None: one micro-batch per step).
        steps: optimizer steps (or give `tokens`).
        tokens: training tokens in all; converted to steps.
        lr: peak learning rate.
        min_lr_ratio: final learning rate of the cosine decay, as a share of `lr`.
        warmup: linear warm-up, as a share of steps (< 1) or a number of steps (≥ 1).
        dense_warmup: share of steps trained as a dense model before upcycling to the MoE
            (None: 0.05 for MoE runs, as in the paper; 0 for dense).
        weight_decay: AdamW weight decay (not applied to norms, biases or the router).
        betas: AdamW betas.
        grad_clip: max global gradient norm (0 disables clipping).
        precision: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16.
        device: auto (CUDA when torch sees a GPU) | cuda | cpu.
        compile: wrap the model in `torch.compile`.
        activation_checkpointing: recompute each block's activations in backward.
        parallel: auto | ddp | fsdp (only with several processes under torchrun).
        eval_every: steps between evaluations (0: only at the end).
        eval_batches: micro-batches per evaluation (0: the whole eval set).
        save_every: steps between checkpoints (0: only at the end).
        save_final: write a checkpoint at the end of the run (off: only the `save_every`
            ones; for throughput measurements that must not write gigabytes).
        keep_last: checkpoints to keep.
        log_every: steps between metric records (MoE steps also record the expert and routing
            `diagnostics` of `lorytrain.training.diagnostics`).
        num_workers: dataloader worker processes per rank.
        seed: seed of initialisation and data order.
        record_samples: each rank appends the `seq_id`s of every step's sequences to
            `RUN_DIR/samples/rank-<r>.jsonl` (data provenance, disjointness checks).
        resume: continue from the latest checkpoint in `out`.
        allow_data_change: let `resume` continue on another corpus than the run's (normally
            refused: `data` must be the corpus recorded in the checkpoint).
    """

    data: str = ""
    out: str = ""
    eval_data: str | None = None
    cache_dir: str | None = None
    cache_limit: int | str | None = None
    preset: str = "tiny"
    ffn: str = "lory"
    experts: int = 8
    segment_len: int | None = None
    model_overrides: dict = field(default_factory=dict)
    seq_len: int | None = None
    batch_size: int = 8
    tokens_per_step: int | None = None
    steps: int | None = None
    tokens: int | None = None
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    dense_warmup: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "auto"
    eval_every: int = 0
    eval_batches: int = 0
    save_every: int = 0
    save_final: bool = True
    keep_last: int = 2
    log_every: int = 1
    num_workers: int = 0
    seed: int = 0
    record_samples: bool = False
    resume: bool = False
    allow_data_change: bool = False

    def validate(self) -> None:
        """Raise `LoryTrainError` for values that cannot work."""
        problems = []
        if not self.data:
            problems.append("--data is required")
        if not self.out:
            problems.append("--out is required")
        if self.steps is None and self.tokens is None:
            problems.append("give --steps or --tokens")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be positive, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be positive, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            problems.append(f"--parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if not 0 <= (self.dense_warmup or 0) < 1:
            problems.append(f"--dense-warmup must be in [0, 1), got {self.dense_warmup}")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        try:
            parse_size(self.cache_limit)
        except LoryDataError as exc:
            problems.append(f"--cache-limit: {exc}")
        if problems:
            raise LoryTrainError("; ".join(problems))

    @property
    def is_moe(self) -> bool:
        return self.ffn != "dense"

    @property
    def dense_warmup_fraction(self) -> float:
        if not self.is_moe:
            return 0.0
        return 0.05 if self.dense_warmup is None else self.dense_warmup

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a dict, refusing unknown keys with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoryTrainError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON config file into a dict.

    Raises:
        LoryTrainError: the file is missing, unparsable or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise LoryTrainError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml, toml and json each raise their own error types
        raise LoryTrainError(f"cannot parse config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoryTrainError(f"config {path} must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(config_file: str | Path | None, overrides: dict) -> TrainConfig:
    """File values first, then every override that is not None; validated."""
    data = load_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(data)
    config.validate()
    return config


def _scalar(text: str):
    """'2' → 2, '1e4' → 10000.0, 'true' → True, 'none' → None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict:
    """KEY=VALUE strings to a dict, with numbers and booleans parsed."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoryTrainError(f"model override {item!r} is not KEY=VALUE")
        parsed[key.strip()] = _scalar(value)
    return parsed
