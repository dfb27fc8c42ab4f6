"""Precision helper: reductions, norms and routing run in at least float32."""

from __future__ import annotations

import torch


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or wider if it already is (float64 stays float64, e.g. for gradchecks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
