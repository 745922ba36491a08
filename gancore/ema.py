"""Exponential moving average of a network's weights (the sampler uses the EMA copy when enabled)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`shadow = decay * shadow + (1 - decay) * param` after every optimiser step; buffers are copied."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        # foreach lerp: one kernel per dtype group instead of one per tensor
        src = [p.detach() for p in net.parameters()]
        dst = list(self.shadow.parameters())
        torch._foreach_lerp_(dst, src, 1.0 - self.decay)
        for b_dst, b_src in zip(self.shadow.buffers(), net.buffers()):
            b_dst.copy_(b_src)

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
