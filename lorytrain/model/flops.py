"""Parameter counts and training FLOPs per token of a config, and accelerator peaks (for presets and MFU)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorytrain.model.config import SEGMENT_ROUTED, ModelConfig


@dataclass
class ParamCount:
    """Parameters of a config.

    Args:
        total: every parameter.
        active: parameters one token uses (one merged expert for lory/prefix, k experts for
            top-k, c experts on average for expert choice), embeddings included.
        embedding: input embedding plus (untied) output projection.
    """

    total: int
    active: int
    embedding: int


def _experts_per_token(config: ModelConfig) -> float:
    if config.ffn == "topk":
        return config.top_k
    if config.ffn == "expert-choice":
        return config.capacity_factor
    return 1.0


def count_parameters(config: ModelConfig) -> ParamCount:
    """Parameters of `build_model(config)`, counted without building it."""
    d, f, n_exp = config.d_model, config.ffn_dim, config.n_experts
    expert = 3 * d * f
    embedding = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    shared = config.n_layers * (4 * d * d + 2 * d) + d  # attention, two norms per block, final norm
    if not config.is_moe:
        total = embedding + shared + config.n_layers * expert
        return ParamCount(total, total, embedding)
    router = d * n_exp
    if config.samoe_pool:
        layer_ffn = router + n_exp * config.samoe_pool
        pool = config.samoe_pool * expert
    else:
        layer_ffn, pool = router + n_exp * expert, 0
    total = embedding + shared + config.n_layers * layer_ffn + pool
    active = embedding + shared + config.n_layers * (router + round(_experts_per_token(config) * expert))
    return ParamCount(total, active, embedding)


def flops_per_token(config: ModelConfig, seq_len: int, batch_tokens: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token, for MFU.

    6 FLOPs per active matmul parameter (embedding lookups excluded) plus 12·layers·d·seq_len
    for attention scores (PaLM's convention, as nanoGPT and torchtitan report it), plus the
    routing work: the token routers, and for lory/prefix the merge, 2·E·3df FLOPs per segment
    forward and twice that backward (dθ_i and de), i.e. 18·E·d·f/T per token and layer (E/T
    of the FFN). Recomputing merged weights in backward (6·E·d·f per segment) is not counted,
    as MFU excludes recomputation.

    Args:
        config: model config.
        seq_len: tokens per sequence.
        batch_tokens: tokens per forward pass; only SaMoE top-k, which builds its layer
            experts from the pool once per pass, needs it (default seq_len).
    """
    d, f, layers, n_exp = config.d_model, config.ffn_dim, config.n_layers, config.n_experts
    head = config.vocab_size * d
    per_layer = 4 * d * d + _experts_per_token(config) * 3 * d * f
    flops = 6 * (head + layers * per_layer) + 12 * layers * d * seq_len
    if not config.is_moe:
        return float(flops)
    sources = config.samoe_pool or n_exp
    if config.ffn in SEGMENT_ROUTED or (config.ffn == "expert-choice" and config.ec_level == "segment"):
        routing = 6 * d * n_exp / config.segment_len
    else:
        routing = 6 * d * n_exp
    if config.ffn in SEGMENT_ROUTED:
        routing += 18 * sources * d * f / config.segment_len
    elif config.samoe_pool:
        routing += 18 * n_exp * sources * d * f / (batch_tokens or seq_len)
    return float(flops + layers * routing)


# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, by normalised device name (see
# `normalise_device_name`). Vendor datasheets print the sparse figure for Hopper, Ada and
# Blackwell (marked "with sparsity"); the dense one is half of it:
# - NVIDIA H100 datasheet: SXM 1,979, PCIe 1,513, NVL 1,671 sparse; H800 is an H100 with
#   narrower NVLink (same SXM/PCIe figures); GH200 carries the H100 SXM chip.
# - NVIDIA H200 datasheet: SXM 1,979, NVL 1,671 sparse.
# - NVIDIA A100 datasheet: 312 dense for SXM4 and PCIe, 40 and 80 GB alike (A800 likewise).
# - NVIDIA L40S / L40 datasheet: 362.05 / 181.05 dense; L4 and A10 datasheets: 242 / 250 sparse.
# - NVIDIA HGX B200 (8 GPUs): 36 PFLOP/s sparse, i.e. 2,250 dense per GPU.
# - NVIDIA Ada architecture whitepaper, RTX 4090: 165.2 with fp32 accumulation, dense.
# - AMD Instinct MI300X datasheet: 1,307.4 dense.
# Names not listed (other cards, MIG slices, which own a fraction of the SMs) get no peak,
# and no MFU is reported, rather than a wrong figure.
PEAK_BF16_TFLOPS = {
    "H100": 989.4,  # SXM5: "NVIDIA H100 80GB HBM3"
    "H100 SXM": 989.4,
    "H100 SXM5": 989.4,
    "H100 PCIE": 756.0,
    "H100 NVL": 835.5,
    "H800": 989.4,
    "H800 PCIE": 756.0,
    "GH200": 989.4,
    "H200": 989.4,
    "H200 SXM": 989.4,
    "H200 NVL": 835.5,
    "A100": 312.0,
    "A100 SXM4": 312.0,
    "A100 PCIE": 312.0,
    "A800 SXM4": 312.0,
    "A800 PCIE": 312.0,
    "L40S": 362.05,
    "L40": 181.05,
    "L4": 121.0,
    "A10": 125.0,
    "B200": 2250.0,
    "RTX 4090": 165.2,
    "INSTINCT MI300X": 1307.4,
}


def normalise_device_name(name: str) -> str:
    """A device name as `PEAK_BF16_TFLOPS` keys it: upper case, vendor and memory size dropped.

    "NVIDIA A100-SXM4-80GB" → "A100 SXM4", "NVIDIA H100 80GB HBM3" → "H100",
    "NVIDIA GeForce RTX 4090" → "RTX 4090", "AMD Instinct MI300X" → "INSTINCT MI300X".
    """
    words = re.sub(r"[-_]", " ", name.upper()).split()
    drop = {"NVIDIA", "AMD", "GEFORCE", "TESLA"}
    return " ".join(w for w in words if w not in drop and not re.fullmatch(r"\d+GB|HBM\w*", w))


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the accelerator called `device_name` (as
    `torch.cuda.get_device_name` reports it), or None when it is not one we know exactly."""
    tflops = PEAK_BF16_TFLOPS.get(normalise_device_name(device_name))
    return None if tflops is None else tflops * 1e12
