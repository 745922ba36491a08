"""The MLP GAN of the Keras report: G Dense 256/512/1024 (LeakyReLU 0.2 + BatchNorm) -> tanh; D 512/256 -> 1."""

from __future__ import annotations

import math

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.models.layers import image_sizes, maybe_sn
from gancore.registry import MODELS


class MLPGenerator(nn.Module):
    def __init__(self, nz: int, image_shape: tuple[int, int, int], bn: bool, num_classes: int = 0, embed_dim: int = 0):
        super().__init__()
        self.image_shape = image_shape
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        layers: list[nn.Module] = []
        width = nz + (embed_dim if num_classes else 0)
        for h in (256, 512, 1024):
            # Keras order Dense -> LeakyReLU -> BatchNorm; Keras momentum 0.8 == torch momentum 0.2
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2, True)]
            if bn:
                layers.append(nn.BatchNorm1d(h, momentum=0.2))
            width = h
        layers += [nn.Linear(width, math.prod(image_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z).view(-1, *self.image_shape)  # (B, nz) -> (B, C, H, W)


class MLPDiscriminator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], sn: bool, num_classes: int = 0):
        super().__init__()
        n = math.prod(image_shape)
        self.embed = nn.Embedding(num_classes, n) if num_classes else None
        width = n * (2 if num_classes else 1)
        self.net = nn.Sequential(
            maybe_sn(nn.Linear(width, 512), sn), nn.LeakyReLU(0.2, True),
            maybe_sn(nn.Linear(512, 256), sn), nn.LeakyReLU(0.2, True),
            maybe_sn(nn.Linear(256, 1), sn),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)
        if self.embed is not None:
            h = torch.cat([h, self.embed(y)], 1)
        return self.net(h)  # (B, 1) logits


@MODELS.register("mlp")
@image_sizes("any size", lambda h, w: True)  # fully connected: the image is one vector
def build_mlp(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, nn.Module]:
    nc = num_classes if m.conditional else 0
    return {
        "G": MLPGenerator(m.nz, image_shape, bn=m.batchnorm in ("both", "g"), num_classes=nc, embed_dim=m.embed_dim),
        "D": MLPDiscriminator(image_shape, sn=m.spectral_norm, num_classes=nc),
    }
