"""The lorytrain model: LLaMA-style decoder, Lory MoE layer and baselines."""

from lorytrain.model.cache import DecodeCache
from lorytrain.model.config import FFN_KINDS, PRESETS, ModelConfig
from lorytrain.model.decoder import LoryLM, build_model
from lorytrain.model.flops import ParamCount, count_parameters, flops_per_token, peak_bf16_flops
from lorytrain.model.routing import RoutingStats
from lorytrain.model.swiglu import merged_swiglu
from lorytrain.model.upcycle import upcycle

__all__ = [
    "FFN_KINDS",
    "PRESETS",
    "DecodeCache",
    "LoryLM",
    "ModelConfig",
    "ParamCount",
    "RoutingStats",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "merged_swiglu",
    "peak_bf16_flops",
    "upcycle",
]
