"""The GAN family (owns: the GAN family object): networks G and D, an adversarial loss object (gancore.losses),
D x d_iters then G per step, samples G(z[, y]) from a fixed or fresh z."""

from __future__ import annotations

import torch

from gancore.config import Config
from gancore.families.base import Batch, Family, Phase, StepContext, eval_mode
from gancore.losses import InstanceNoise, make_loss, zero_centred_penalty
from gancore.registry import FAMILIES, MODELS


@FAMILIES.register("gan")
class GAN(Family):
    generator_name = "G"
    headline = ("Loss/D", "Loss/G")

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        nets = MODELS[cfg.model.arch](cfg.model, image_shape, num_classes)
        self.networks = {"G": nets["G"], "D": nets["D"]}
        self.optimizers = {
            "D": self.adam(nets["D"].parameters(), cfg.optim.lr_d),
            "G": self.adam(nets["G"].parameters(), cfg.optim.lr_g),
        }
        self.loss = make_loss(cfg.loss)
        self.noise = InstanceNoise(cfg.loss.instance_noise)
        self.nz = cfg.model.nz
        self.conditional = cfg.model.conditional
        self.phases = [
            Phase("D", "D", self.d_loss, repeats=cfg.optim.d_iters),  # a fresh real batch per D step
            Phase("G", "G", self.g_loss, fresh_batch=False),
        ]

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        # conditional fakes take the real batch's labels, so D sees the same class mix on both sides
        return batch.y if self.conditional else None

    def d_loss(self, batch: Batch, ctx: StepContext):
        G, D = self.networks["G"], self.networks["D"]
        y = self._labels(batch)
        z = torch.randn(batch.x.shape[0], self.nz, device=batch.x.device)
        # G's forward keeps its graph: the G phase reuses the last D step's fakes (as the DCGAN reference loop
        # does: one G forward per step; G's weights do not change during the D phase, so the graph stays valid)
        fake = G(z, y)
        ctx.put("fake", (fake, y))  # for this step's G phase
        real, fake = self.noise(batch.x), self.noise(fake.detach())
        loss, stats = self.loss.d_loss(D, real, fake, y)
        n = self.cfg.loss.penalty_batch or None  # the first n images (loss.penalty_batch), or all
        for name, weight, x in (("r1", self.cfg.loss.r1, real), ("r2", self.cfg.loss.r2, fake)):
            if weight > 0:  # zero-centred gradient penalties (loss.r1 / loss.r2), on the images D was shown
                penalty = zero_centred_penalty(D, x[:n], y[:n] if y is not None else None)
                loss = loss + 0.5 * weight * penalty
                stats = {**stats, "Loss/D": loss.detach(), f"D/{name}": penalty.detach()}
        return loss, stats

    def g_loss(self, batch: Batch, ctx: StepContext):
        D = self.networks["D"]
        fake, y = ctx.take("fake")  # the last D step's G(z); taken: the graph is released after use
        # relativistic losses compare with this step's real batch (the last D step's); others are given none
        real = self.noise(batch.x) if self.loss.uses_real_in_g else None
        return self.loss.g_loss(D, self.noise(fake), y, real=real)

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        z = torch.randn(n, self.nz, generator=generator)
        y = self.grid_labels(n)
        return {"z": z, "y": y}

    def class_sampler(self):
        if not self.conditional:
            return None
        g = torch.Generator().manual_seed(4321)
        return lambda y: self.to_uint8(self.sample(len(y), inputs={"z": torch.randn(len(y), self.nz, generator=g), "y": y}))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        inputs = self.sample_inputs(n, generator, inputs)
        G, dev = self.sampler_network(), self.device
        with eval_mode(G):  # BatchNorm running statistics; sampling must not change the training state
            y = inputs["y"].to(dev) if self.conditional else None
            return G(inputs["z"].to(dev), y)
