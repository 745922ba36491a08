"""DCGAN generators and discriminators.

`dcgan_mnist`: the MNIST DCGAN report's networks (28x28). `dcgan`: the configurable CIFAR-10 DCGAN (32x32 or any
size 4 * 2^k) used by the ablations: BatchNorm placement, activations, 4x4 or 5x5 kernels, transposed-conv or
upsample+conv generator, spectral norm, class-conditional G and D (label embedding). The WGAN-GP critic is this
discriminator with `model.batchnorm=g` (no BatchNorm in the critic).
"""

from __future__ import annotations

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.errors import ConfigError
from gancore.models.layers import LabelMap, act, check_size, dcgan_pair, four_times_power_of_2, image_sizes, maybe_sn
from gancore.registry import MODELS


def _bn2d(c: int, on: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(c)] if on else []


class MNISTGenerator(nn.Module):
    """Linear(nz -> 128*7*7)+BN+ReLU -> ConvT 128->64 -> ConvT 64->32 -> Conv 32->C (3x3) + tanh."""

    def __init__(self, nz: int, channels: int, bn: bool, g_act: str, num_classes: int = 0, embed_dim: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        nin = nz + (embed_dim if num_classes else 0)
        self.fc = nn.Sequential(nn.Linear(nin, 128 * 7 * 7), *([nn.BatchNorm1d(128 * 7 * 7)] if bn else []), act(g_act))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1), *_bn2d(64, bn), act(g_act),  # (B, 128, 7, 7) -> (B, 64, 14, 14)
            nn.ConvTranspose2d(64, 32, 4, 2, 1), *_bn2d(32, bn), act(g_act),  # -> (B, 32, 28, 28)
            # The report's last layer, ConvT(32, 1, 4, 1, 1), gives 29x29 ((28-1)*1 - 2 + 4 = 29). A size-preserving
            # 3x3 convolution ends at 28x28 with the same receptive-field growth.
            nn.Conv2d(32, channels, 3, 1, 1), nn.Tanh(),  # -> (B, C, 28, 28)
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(self.fc(z).view(-1, 128, 7, 7))


class MNISTDiscriminator(nn.Module):
    """Conv 64 (4,2,1) -> 128 -> 256 (BN, LeakyReLU 0.2) -> Flatten -> Linear(., 1024) -> Linear(1024, 1)."""

    def __init__(self, image_shape: tuple[int, int, int], bn: bool, d_act: str, sn: bool, num_classes: int = 0):
        super().__init__()
        c, h, w = image_shape
        self.label = LabelMap(num_classes, h, w) if num_classes else None
        cin = c + (1 if num_classes else 0)
        self.features = nn.Sequential(
            maybe_sn(nn.Conv2d(cin, 64, 4, 2, 1), sn), act(d_act),  # (B, 1, 28, 28) -> (B, 64, 14, 14)
            maybe_sn(nn.Conv2d(64, 128, 4, 2, 1), sn), *_bn2d(128, bn), act(d_act),  # -> (B, 128, 7, 7)
            maybe_sn(nn.Conv2d(128, 256, 4, 2, 1), sn), *_bn2d(256, bn), act(d_act),  # -> (B, 256, 3, 3)
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(2, cin, h, w)).shape[1]  # 256*3*3 = 2304 at 28x28
        self.head = nn.Sequential(maybe_sn(nn.Linear(n, 1024), sn), act(d_act), maybe_sn(nn.Linear(1024, 1), sn))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.label is not None:
            x = torch.cat([x, self.label(y)], 1)
        return self.head(self.features(x))  # (B, 1) logits


@MODELS.register("dcgan_mnist")
@image_sizes("28x28", lambda h, w: (h, w) == (28, 28))  # G's fc -> (128, 7, 7) -> 14 -> 28 is fixed
def build_dcgan_mnist(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, nn.Module]:
    check_size("dcgan_mnist", image_shape)
    nc = num_classes if m.conditional else 0
    G = MNISTGenerator(m.nz, image_shape[0], m.batchnorm in ("both", "g"), m.g_act, nc, m.embed_dim)
    D = MNISTDiscriminator(image_shape, m.batchnorm in ("both", "d"), m.d_act, m.spectral_norm, nc)
    return dcgan_pair(G, D)


def _up(cin: int, cout: int, k: int, mode: str) -> nn.Module:
    """x2 upsampling: transposed conv (k=4: p=1; k=5: p=2, output_padding=1) or nearest upsample + conv."""
    if mode == "nearest":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, k, 1, k // 2))
    return nn.ConvTranspose2d(cin, cout, k, 2, (k - 1) // 2, output_padding=(k % 2))


def _n_stages(size: int) -> int:
    n, s = 0, size
    while s > 4:
        if s % 2:
            raise ConfigError(f"model.arch=dcgan needs an image size of 4 * 2^k (got {size}); set data.image_size=32")
        s, n = s // 2, n + 1
    return n


class DCGANGenerator(nn.Module):
    """z (+ label embedding) -> Linear -> (ngf*2^(n-1), 4, 4) -> n x2 upsamplings -> (C, 4*2^n, 4*2^n) + tanh."""

    def __init__(self, m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, _ = image_shape
        n = _n_stages(h)
        bn = m.batchnorm in ("both", "g")
        self.c0 = m.ngf * 2 ** (n - 1)
        self.embed = nn.Embedding(num_classes, m.embed_dim) if num_classes else None
        nin = m.nz + (m.embed_dim if num_classes else 0)
        self.fc = nn.Sequential(nn.Linear(nin, self.c0 * 16), *([nn.BatchNorm1d(self.c0 * 16)] if bn else []), act(m.g_act))
        layers: list[nn.Module] = []
        ch = self.c0
        for _ in range(n - 1):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            layers += [_up(ch, ch // 2, m.kernel, m.upsample), *_bn2d(ch // 2, bn), act(m.g_act)]
            ch //= 2
        layers += [_up(ch, c, m.kernel, m.upsample), nn.Tanh()]  # last stage -> (B, C, H, W)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(self.fc(z).view(-1, self.c0, 4, 4))


class DCGANDiscriminator(nn.Module):
    """(C [+1 label plane], H, W) -> n stride-2 convs (ndf, 2ndf, ...) -> (ndf*2^(n-1), 4, 4) -> Linear -> 1 logit."""

    def __init__(self, m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = image_shape
        n = _n_stages(h)
        bn = m.batchnorm in ("both", "d")
        sn = m.spectral_norm
        self.label = LabelMap(num_classes, h, w) if num_classes else None
        ch_in, ch = c + (1 if num_classes else 0), m.ndf
        layers: list[nn.Module] = []
        for i in range(n):  # (B, ch_in, s, s) -> (B, ch, s/2, s/2); no BN on the first layer (DCGAN)
            layers += [maybe_sn(nn.Conv2d(ch_in, ch, m.kernel, 2, (m.kernel - 1) // 2), sn), *_bn2d(ch, bn and i > 0), act(m.d_act)]
            ch_in, ch = ch, ch * 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = maybe_sn(nn.Linear(ch_in * 16, 1), sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.label is not None:
            x = torch.cat([x, self.label(y)], 1)
        return self.head(self.features(x))


@MODELS.register("dcgan")
@image_sizes("square 4 * 2^k (8, 16, 32, 64, 128, ...)", four_times_power_of_2)
def build_dcgan(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, nn.Module]:
    check_size("dcgan", image_shape)
    nc = num_classes if m.conditional else 0
    return dcgan_pair(DCGANGenerator(m, image_shape, nc), DCGANDiscriminator(m, image_shape, nc))
