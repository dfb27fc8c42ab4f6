"""`MoELayer`: what every mixture-of-experts FFN of the decoder shares."""

from __future__ import annotations

import torch
from torch import nn

from lorytrain.model.experts import ExpertBank
from lorytrain.model.routing import RoutingStats


class MoELayer(nn.Module):
    """Base of the MoE FFNs (`LoryMoE`, `TopKMoE`, `ExpertChoiceMoE`).

    Subclasses set `self.experts` and implement `init_routing` and `forward`. After every
    forward pass `last_stats` holds how the layer routed (read by logging and analysis) and
    `last_aux` its auxiliary losses (empty for layers without any).
    """

    experts: ExpertBank

    def __init__(self):
        super().__init__()
        self.last_stats: RoutingStats | None = None
        self.last_aux: dict[str, torch.Tensor] = {}

    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise the routing and the experts."""
        self.init_routing(std)
        self.experts.reset_parameters(std, out_std)

    def init_routing(self, std: float) -> None:
        """Initialise everything but the experts (what upcycling starts fresh)."""
        raise NotImplementedError
