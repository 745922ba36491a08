"""Exponential moving average of a network's weights (the sampler uses the EMA copy when enabled)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`shadow = d * shadow + (1 - d) * param` after every step, with d = min(decay, (1 + t) / (10 + t)).

    The warm-up on d (as TensorFlow's ExponentialMovingAverage with num_updates) lets short runs sample from a
    shadow that is not still mostly the initial weights. Buffers (BatchNorm statistics) are copied.
    """

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)
        self.num_updates = 0  # a host-side int (no device sync), saved through get_extra_state

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        t = self.num_updates
        d = min(self.decay, (1 + t) / (10 + t))
        self.num_updates += 1
        # foreach lerp: one kernel per dtype group instead of one per tensor
        torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in net.parameters()], 1.0 - d)
        for b_dst, b_src in zip(self.shadow.buffers(), net.buffers()):
            b_dst.copy_(b_src)

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
