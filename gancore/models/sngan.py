"""`sndcgan`: the "standard CNN" of the spectral-normalisation paper (Miyato et al., 2018), the network of the
published SNDCGAN / CNN-SNGAN CIFAR-10 numbers, with the projection discriminator (Miyato & Koyama, 2018) and a
class-conditional BatchNorm generator when `model.conditional` is on.

G: z -> Linear -> (8 ngf, 4, 4) -> n x [ConvT 4x4 /2, BatchNorm (per-class gain and bias when conditional), ReLU]
   -> Conv 3x3 -> C channels, tanh.                          (32x32, ngf 64: 512 -> 256 -> 128 -> 64 -> 3)
D: x -> n x [Conv 3x3, act, Conv 4x4 /2, act] (ndf, 2 ndf, 4 ndf) -> Conv 3x3 (8 ndf), act -> sum over H, W = h
   -> Linear(h) [+ <embed(y), h>, the projection term, when conditional] -> one logit.
Spectral norm (`model.spectral_norm`) goes on every D layer, the class embedding included; BatchNorm in D only
where `model.batchnorm` asks for it (the paper's SN discriminator has none). The paper's LeakyReLU slope is 0.1;
`model.d_act=lrelu` is gancore's 0.2 (DCGAN's), named in the presets that use this network.
"""

from __future__ import annotations

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.models.dcgan import _bn2d, _n_stages
from gancore.models.layers import act, check_size, dcgan_pair, four_times_power_of_2, image_sizes, maybe_sn
from gancore.registry import MODELS


class ClassBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; the gain and bias come from the class (each class starts at 1 and 0)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class SNDCGANGenerator(nn.Module):
    def __init__(self, m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, _ = image_shape
        n = _n_stages(h)
        self.c0 = m.ngf * 2 ** n
        self.fc = nn.Linear(m.nz, self.c0 * 16)
        self.ups = nn.ModuleList()
        self.norms = nn.ModuleList()
        ch, bn = self.c0, m.batchnorm in ("both", "g")
        for _ in range(n):  # (B, ch, s, s) -> (B, ch/2, 2s, 2s)
            self.ups.append(nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1))
            self.norms.append(ClassBatchNorm2d(ch // 2, num_classes) if num_classes and bn
                              else nn.Sequential(*_bn2d(ch // 2, bn)))
            ch //= 2
        self.act = act(m.g_act)
        self.out = nn.Sequential(nn.Conv2d(ch, c, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fc(z).view(-1, self.c0, 4, 4)
        for up, norm in zip(self.ups, self.norms):
            x = up(x)
            x = self.act(norm(x, y) if isinstance(norm, ClassBatchNorm2d) else norm(x))
        return self.out(x)


class SNDCGANDiscriminator(nn.Module):
    def __init__(self, m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, _ = image_shape
        sn, bn = m.spectral_norm, m.batchnorm in ("both", "d")
        layers: list[nn.Module] = []
        cin, ch = c, m.ndf
        for _ in range(_n_stages(h)):  # (B, cin, s, s) -> (B, ch, s/2, s/2)
            layers += [maybe_sn(nn.Conv2d(cin, ch, 3, 1, 1), sn), *_bn2d(ch, bn), act(m.d_act),
                       maybe_sn(nn.Conv2d(ch, ch, 4, 2, 1), sn), *_bn2d(ch, bn), act(m.d_act)]
            cin, ch = ch, ch * 2
        layers += [maybe_sn(nn.Conv2d(cin, ch, 3, 1, 1), sn), *_bn2d(ch, bn), act(m.d_act)]  # (B, 8 ndf, 4, 4)
        self.features = nn.Sequential(*layers)
        self.head = maybe_sn(nn.Linear(ch, 1), sn)
        self.embed = maybe_sn(nn.Embedding(num_classes, ch), sn) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))  # (B, 8 ndf): global sum pooling
        out = self.head(h)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1, keepdim=True)  # projection: <embed(y), h>
        return out  # (B, 1) logits


@MODELS.register("sndcgan")
@image_sizes("square 4 * 2^k (8, 16, 32, 64, 128, ...)", four_times_power_of_2)
def build_sndcgan(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, nn.Module]:
    check_size("sndcgan", image_shape)
    nc = num_classes if m.conditional else 0
    return dcgan_pair(SNDCGANGenerator(m, image_shape, nc), SNDCGANDiscriminator(m, image_shape, nc))
