"""Is the MoE learning as a mixture? Cheap per-layer diagnostics logged during training.

Right after upcycling every expert is a copy of the dense FFN. Expert g's gradient is
Σ_s c_s,g ∂L/∂θ̄_s (c: the segments' merge weights), so while routing stays near uniform the
experts receive the same update and stay copies: the model is a dense model with extra
parameters. These numbers, logged every `--log-every` steps under "diagnostics" in
metrics.jsonl (and TensorBoard as `diagnostics/<name>/<layer>`), say whether that is happening:

- `expert_cosine`: mean pairwise cosine similarity of the layer's experts' flattened weights
  (1.0 right after upcycling; falls as experts diverge);
- `expert_spread`: root mean square distance of the experts from their mean, relative to
  the mean's norm (0.0 right after upcycling; easier to read than 1 - cosine, which is
  about half its square);
- `routing_entropy` / `routing_entropy_std`: entropy (nats) of every segment's routing weights,
  mean and standard deviation over the segments of the step's last micro-batch; log E
  (`log_experts`) is a uniform router, 0 a one-hot one;
- `top1_off_mode`: share of those segments whose top expert is not the batch's most common
  top expert (0 when every segment picks the same expert, whatever the weights);
- `router_grad_norm`: L2 norm of the gradient of the layer's routing parameters (everything
  of the MoE layer but its experts), before clipping.

Under FSDP the expert weights and router gradients are gathered one layer at a time, so every
rank must call these functions alike; routing statistics are this rank's micro-batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorytrain.model.shards import full_tensor
from lorytrain.training.distributed import unwrap


@torch.no_grad()
def expert_similarity(weights: torch.Tensor) -> tuple[float, float]:
    """Mean pairwise cosine similarity of E experts and their relative spread.

    Args:
        weights: (E, ...) one expert per row.

    Returns:
        (mean cosine over the E(E-1)/2 pairs, sqrt(mean_e ||θ_e - θ̄||²) / ||θ̄||).
    """
    flat = weights.detach().flatten(1).double()
    n_experts = flat.shape[0]
    unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-30)
    gram = unit @ unit.T
    off_diagonal = gram.sum() - gram.diagonal().sum()
    cosine = float(off_diagonal / (n_experts * (n_experts - 1)))
    mean = flat.mean(0)
    spread = float((flat - mean).pow(2).sum(1).mean().sqrt() / mean.norm().clamp(min=1e-30))
    return cosine, spread


@torch.no_grad()
def routing_entropy(segment_weights: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation (over segments) of the entropy in nats of (..., E) weights."""
    p = segment_weights.detach().double().flatten(0, -2)
    h = -(p * p.clamp(min=1e-300).log()).sum(-1)
    return float(h.mean()), float(h.std(unbiased=False))


@torch.no_grad()
def top1_off_mode(segment_weights: torch.Tensor) -> float:
    """Share of segments whose top expert differs from the most common top expert."""
    top = segment_weights.detach().flatten(0, -2).argmax(-1)
    counts = torch.bincount(top, minlength=segment_weights.shape[-1])
    return float(1 - counts.max() / top.numel())


def routing_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """An MoE layer's parameters other than its experts (router weights, EC thresholds...)."""
    return [p for name, p in layer.named_parameters() if not name.startswith("experts.")]


@torch.no_grad()
def router_grad_norms(model: nn.Module) -> list[float]:
    """Per MoE layer, the L2 norm of its routing parameters' gradients (0 without gradients).

    Call after backward and before the optimizer clears the gradients (collective under FSDP).
    """
    norms = []
    for layer in unwrap(model).moe_layers():
        grads = [full_tensor(p.grad).double() for p in routing_parameters(layer) if p.grad is not None]
        norms.append(float(torch.sqrt(sum((g.pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64)))))
    return norms


@torch.no_grad()
def moe_diagnostics(model: nn.Module, router_grad: list[float] | None = None) -> dict | None:
    """The per-layer diagnostics of the module docstring, from the model's current weights and
    its last forward pass; None for a dense model.

    Args:
        model: the (possibly wrapped or sharded) model.
        router_grad: `router_grad_norms` taken before the optimizer step, or None to leave it out.

    Returns:
        {name: [one value per MoE layer], ..., "log_experts": log E}.
    """
    layers = unwrap(model).moe_layers()
    if not layers:
        return None
    found: dict[str, list[float]] = {key: [] for key in (
        "expert_cosine", "expert_spread", "routing_entropy", "routing_entropy_std", "top1_off_mode")}
    for layer in layers:
        cosine, spread = expert_similarity(full_tensor(layer.experts.weights()))
        found["expert_cosine"].append(cosine)
        found["expert_spread"].append(spread)
        stats = layer.last_stats
        if stats is not None:
            mean, std = routing_entropy(stats.segment_weights)
            found["routing_entropy"].append(mean)
            found["routing_entropy_std"].append(std)
            found["top1_off_mode"].append(top1_off_mode(stats.segment_weights))
    if router_grad is not None:
        found["router_grad_norm"] = router_grad
    # cosines near 1 keep their decimals; small spreads and gradient norms their significant digits
    result: dict = {key: [round(v, 10) if key == "expert_cosine" else float(f"{v:.7g}") for v in values]
                    for key, values in found.items() if values}
    result["log_experts"] = round(math.log(layers[0].experts.n_experts), 6)
    return result
