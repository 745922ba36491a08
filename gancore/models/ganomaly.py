"""GANomaly networks (Akcay et al., 2018), registered as `ganomaly`, for square images of side 4 * 2^k (MNIST at 32).

    G:  x -> encoder E1 -> z (nz) -> decoder -> x_hat (tanh) -> encoder E2 -> z_hat (nz)
        E1 = E2 = stride-2 convs ndf, 2ndf, 4ndf (BatchNorm from the second, LeakyReLU 0.2) -> Conv 4x4 -> nz
        decoder = ConvT nz -> 4ngf (4x4) -> ... -> ConvT -> C, BatchNorm + ReLU between, tanh out
    D:  `latent` (default): an MLP on z, nz -> 512 -> 256 -> 1 logit (see gancore/families/ganomaly.py for what is
        real and what is fake); `image`: the paper's D, E1's convolutions -> Conv 4x4 -> 1 logit, whose last feature
        map (4ndf, 4, 4) is what the generator's feature-matching loss compares.
"""

from __future__ import annotations

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.errors import ConfigError
from gancore.models.layers import dcgan_init
from gancore.registry import MODELS


def _stages(h: int, w: int) -> int:
    """Stride-2 stages from h down to 4 (32 -> 3)."""
    n, s = 0, h
    while s > 4 and s % 2 == 0:
        s, n = s // 2, n + 1
    if h != w or s != 4 or n == 0:
        raise ConfigError(f"model.arch=ganomaly needs square images of side 4 * 2^k (got {h}x{w}); "
                          "set data.image_size=32")
    return n


class ConvFeatures(nn.Sequential):
    """(B, C, S, S) -> (B, ndf * 2^(n-1), 4, 4): the DCGAN encoder body (no BatchNorm on the first layer)."""

    def __init__(self, image_shape: tuple[int, int, int], ndf: int):
        c, h, w = image_shape
        layers: list[nn.Module] = []
        cin, ch = c, ndf
        for i in range(_stages(h, w)):  # (B, cin, s, s) -> (B, ch, s/2, s/2): 32 -> 16 -> 8 -> 4 with 64/128/256
            layers += [nn.Conv2d(cin, ch, 4, 2, 1, bias=False), *([nn.BatchNorm2d(ch)] if i else []),
                       nn.LeakyReLU(0.2, True)]
            cin, ch = ch, ch * 2
        super().__init__(*layers)
        self.out_channels = cin


class Encoder(nn.Module):
    """(B, C, S, S) -> (B, nz)."""

    def __init__(self, image_shape: tuple[int, int, int], nz: int, ndf: int):
        super().__init__()
        self.features = ConvFeatures(image_shape, ndf)
        self.head = nn.Conv2d(self.features.out_channels, nz, 4, 1, 0, bias=False)  # (B, 256, 4, 4) -> (B, nz, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


class Decoder(nn.Module):
    """(B, nz) -> (B, C, S, S) in [-1, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], nz: int, ngf: int):
        super().__init__()
        c, h, w = image_shape
        n = _stages(h, w)
        ch = ngf * 2 ** (n - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s): 4 -> 8 -> 16 with 256 -> 128 -> 64
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, c, 4, 2, 1, bias=False), nn.Tanh()]  # -> (B, C, 32, 32)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


class GANomalyGenerator(nn.Module):
    """x -> (x_hat, z, z_hat): encode, decode, encode the reconstruction again."""

    def __init__(self, image_shape: tuple[int, int, int], nz: int, ngf: int, ndf: int):
        super().__init__()
        self.encoder1 = Encoder(image_shape, nz, ndf)
        self.decoder = Decoder(image_shape, nz, ngf)
        self.encoder2 = Encoder(image_shape, nz, ndf)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)  # (B, nz)
        x_hat = self.decoder(z)  # (B, C, S, S)
        return x_hat, z, self.encoder2(x_hat)


class LatentDiscriminator(nn.Module):
    """(B, nz) -> (B, 1) logits."""

    def __init__(self, nz: int, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(nz, width), nn.LeakyReLU(0.2, True),
            nn.Linear(width, width // 2), nn.LeakyReLU(0.2, True),
            nn.Linear(width // 2, 1),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z)


class ImageDiscriminator(nn.Module):
    """(B, C, S, S) -> (B, 1) logits, or with features=True its last feature map (B, 4ndf, 4, 4)."""

    def __init__(self, image_shape: tuple[int, int, int], ndf: int):
        super().__init__()
        self.features = ConvFeatures(image_shape, ndf)
        self.head = nn.Conv2d(self.features.out_channels, 1, 4, 1, 0, bias=False)  # -> (B, 1, 1, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, features: bool = False) -> torch.Tensor:
        f = self.features(x)
        return f if features else self.head(f).flatten(1)


DISCRIMINATORS = {
    "latent": lambda m, image_shape: LatentDiscriminator(m.nz),
    "image": lambda m, image_shape: ImageDiscriminator(image_shape, m.ndf),
}


@MODELS.register("ganomaly")
def build_ganomaly(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int,
                   disc: str = "latent") -> dict[str, nn.Module]:
    """{"G": GANomalyGenerator, "D": the `disc` discriminator (config ganomaly.disc: latent | image)}."""
    G, D = GANomalyGenerator(image_shape, m.nz, m.ngf, m.ndf), DISCRIMINATORS[disc](m, image_shape)
    G.apply(dcgan_init)  # the paper's init: N(0, 0.02) weights, BatchNorm gamma N(1, 0.02)
    D.apply(dcgan_init)
    return {"G": G, "D": D}
