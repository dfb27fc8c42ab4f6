"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` as a share of steps (< 1) or a step count (≥ 1)."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_at(step: int, peak_lr: float, total_steps: int, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Args:
        step: the step about to be taken.
        peak_lr: learning rate at the end of warm-up.
        total_steps: steps of the whole run.
        warmup: warm-up steps; the rate rises linearly from peak/warmup to peak.
        min_lr_ratio: the rate at the last step, as a share of the peak.
    """
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = peak_lr * min_lr_ratio
    return floor + 0.5 * (peak_lr - floor) * (1 + math.cos(math.pi * progress))
