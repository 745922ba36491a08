"""The convolutional VAE of the MNIST VAE report (`vae_conv`): an encoder to (mu, logvar) and a sigmoid decoder.

    encoder: Conv(C,32,3,s2,p1)+ReLU -> Conv(32,64,3,s2,p1)+ReLU -> Linear(64*h*w,128)+ReLU -> mu, logvar heads
    decoder: Linear(nz,128)+ReLU -> Linear(128,64*h*w)+ReLU -> ConvT(64,32,3,s2,p1,op1)+ReLU
             -> ConvT(32,C,3,s2,p1,op1) -> sigmoid          (h, w = H/4, W/4: 7x7 at MNIST's 28x28)
"""

from __future__ import annotations

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.errors import ConfigError
from gancore.registry import MODELS

HIDDEN = 128  # the report's fully connected width


class VAEEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (mu, logvar), each (B, nz)."""

    def __init__(self, image_shape: tuple[int, int, int], nz: int):
        super().__init__()
        c, h, w = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, 2, 1), nn.ReLU(True),  # (B, 1, 28, 28) -> (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(True),  # -> (B, 64, 7, 7)
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), HIDDEN), nn.ReLU(True),  # -> (B, 128)
        )
        self.mu = nn.Linear(HIDDEN, nz)
        self.logvar = nn.Linear(HIDDEN, nz)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.mu(h), self.logvar(h)


class VAEDecoder(nn.Module):
    """(B, nz) -> (B, C, H, W) pixel means in [0, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], nz: int):
        super().__init__()
        c, h, w = image_shape
        self.hw = (h // 4, w // 4)
        self.fc = nn.Sequential(
            nn.Linear(nz, HIDDEN), nn.ReLU(True),
            nn.Linear(HIDDEN, 64 * self.hw[0] * self.hw[1]), nn.ReLU(True),  # -> (B, 64*7*7)
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(True),  # (B, 64, 7, 7) -> (B, 32, 14, 14)
            nn.ConvTranspose2d(32, c, 3, 2, 1, output_padding=1), nn.Sigmoid(),  # -> (B, C, 28, 28)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, 64, *self.hw))


@MODELS.register("vae_conv")
def build_vae_conv(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, nn.Module]:
    _, h, w = image_shape
    if h % 4 or w % 4:
        raise ConfigError(f"model.arch=vae_conv needs image sides divisible by 4 (got {h}x{w}); set data.image_size")
    # PyTorch's default init (the report's); DCGAN's N(0, 0.02) would start the sigmoid decoder flat at 0.5
    return {"encoder": VAEEncoder(image_shape, m.nz), "decoder": VAEDecoder(image_shape, m.nz)}
