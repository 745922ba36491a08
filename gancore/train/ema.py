"""Exponential moving average of a network's weights (the sampler uses the EMA copy when enabled)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`shadow = d * shadow + (1 - d) * param` after every step, with d = min(decay, (1 + t) / (10 + t)).

    The warm-up on d (as TensorFlow's ExponentialMovingAverage with num_updates) lets short runs sample from a
    shadow that is not still mostly the initial weights. Buffers (BatchNorm statistics) are copied.
    The update counter t lives on the device and d is computed there, so an update reads nothing on the host and
    can be replayed inside a captured CUDA graph (gancore/train/fast.py); float64 maths, then the same float32 weight
    the host formula gives.
    """

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)
        # not in state_dict (saved through get_extra_state, as before: old checkpoints load unchanged)
        self.register_buffer("updates", torch.zeros((), dtype=torch.float64, device=_device(net)),
                             persistent=False)

    @property
    def num_updates(self) -> int:
        return int(self.updates.item())

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        t = self.updates
        weight = (1.0 - torch.clamp((1.0 + t) / (10.0 + t), max=self.decay)).float()
        shadow = list(self.shadow.parameters())
        # foreach lerp: one kernel per dtype group instead of one per tensor
        torch._foreach_lerp_(shadow, [p.detach() for p in net.parameters()], [weight] * len(shadow))
        for b_dst, b_src in zip(self.shadow.buffers(), net.buffers()):
            b_dst.copy_(b_src)
        self.updates.add_(1)

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates.fill_(int(state["num_updates"]))

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)


def _device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
