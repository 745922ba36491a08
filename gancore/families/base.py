"""What the trainer drives: a family object (shared/STYLE.md #13).

A family owns its networks and optimisers and says which phases one training step has. The trainer only calls
this interface; it never asks which family, model or loss it runs.

    phases:  GAN -> [D x d_iters, G];  VAE -> [ELBO];  GANomaly -> [G, D];  diffusion -> [denoise]
    each phase: loss(batch) -> (scalar loss, {stat name: 0-d tensor}) on one optimiser
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gancore.config import Config
from gancore.fast import adam_options

Stats = dict[str, torch.Tensor]


@dataclass
class Batch:
    """One batch as the family wants it: images as floats on the device, labels as int64 (or None)."""

    x: torch.Tensor
    y: torch.Tensor | None


@dataclass
class Phase:
    """One optimisation phase of a step: `repeats` times, draw data (or reuse the last batch), loss, step."""

    name: str  # "D", "G", "ELBO", ...
    optimizer: str  # key into Family.optimizers
    loss: Callable[[Batch], tuple[torch.Tensor, Stats]]
    repeats: int = 1
    fresh_batch: bool = True  # draw a new real batch for each repeat (False: reuse the step's last batch)


class Family:
    """Base class: subclasses fill `networks`, `optimizers` and `phases` in __init__."""

    #: the network that generates (GAN: "G"); its weights are the run's snapshots, its EMA copy the sampler
    generator_name: str = "G"
    #: the statistic shown in the progress bar and used for NaN checks (all are checked)
    headline: tuple[str, ...] = ()

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        self.cfg = cfg
        self.image_shape = image_shape  # (C, H, W)
        self.num_classes = num_classes
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.phases: list[Phase] = []
        self.ema: nn.Module | None = None  # set by the trainer when EMA is on
        # Adam's implementation for the run's train.compile mode (fused / capturable on a GPU fast path)
        self.adam_options = adam_options(cfg.train.compile)

    # -- data ------------------------------------------------------------------------------------------------
    def prepare(self, x_uint8: torch.Tensor, y: torch.Tensor | None) -> Batch:
        """uint8 (B, C, H, W) on the device -> the family's input range. Default: [-1, 1]."""
        return Batch(x_uint8.float().div_(127.5).sub_(1.0), y)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `prepare` for images this family produces: -> uint8 (B, C, H, W)."""
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    # -- sampling --------------------------------------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs for the fixed sample grid (drawn once per run from a seeded generator)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        """n images in the family's output range, from `inputs` (fixed grid) or fresh random draws."""
        raise NotImplementedError

    def sampler_network(self) -> nn.Module:
        """The network that generates (its EMA copy when there is one)."""
        if self.ema is not None:
            return self.ema
        net = self.networks[self.generator_name]
        # DDP wraps the network: sampling on the main process alone must not enter DDP's buffer broadcast
        return getattr(net, "module", net)

    def class_sampler(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For class-conditional families: labels (b,) -> b uint8 images of those classes; else None."""
        return None

    # -- reporting -------------------------------------------------------------------------------------------
    def figures(self, out_dir: Path, data: "object") -> list[Path]:
        """Family-specific figures written at the end of a run (VAE: latent scatter, GANomaly: ROC, ...)."""
        return []

    def evaluate(self, data: "object") -> dict[str, float]:
        """Family-specific end-of-run metrics (GANomaly: AUROC); FID etc. come from gancore.metrics."""
        return {}

    # -- helpers ---------------------------------------------------------------------------------------------
    def draws_per_step(self) -> int:
        """Real batches one step consumes: one per repeat of a fresh-batch phase, and one for a step whose first
        phase reuses a batch (there is none yet)."""
        n, have = 0, False
        for p in self.phases:
            for _ in range(p.repeats):
                if p.fresh_batch or not have:
                    n, have = n + 1, True
        return max(1, n)

    @property
    def device(self) -> torch.device:
        return next(iter(self.networks.values())).parameters().__next__().device

    def adam(self, params, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                **self.adam_options)
