"""lorytrain: the Lory MoE decoder, its baselines, training, evaluation and analysis.

Model API: `ModelConfig.from_preset(name, **overrides)`, `build_model(config)`,
`upcycle(dense_model, moe_config)`; `model(input_ids)` returns logits (B, L, vocab), with
`model.aux_losses()` and `model.routing_stats()` beside them (see `LoryLM`).
"""

from lorytrain.errors import LoryTrainError
from lorytrain.model import (
    FFN_KINDS,
    PRESETS,
    DecodeCache,
    LoryLM,
    ModelConfig,
    ParamCount,
    RoutingStats,
    build_model,
    count_parameters,
    flops_per_token,
    upcycle,
)

__all__ = [
    "FFN_KINDS",
    "PRESETS",
    "DecodeCache",
    "LoryLM",
    "LoryTrainError",
    "ModelConfig",
    "ParamCount",
    "RoutingStats",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "upcycle",
]
