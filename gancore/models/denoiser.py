"""The report's model (`model.arch=denoiser_report`): a one-level class-conditional convolutional denoiser.

    noisy x (B, C, H, W), y (B,) -> clean-image estimate (B, C, H, W)

Conv encoder at full resolution -> one stride-2 downsampling level, where the class embedding is added as a
per-channel bias -> transposed-conv decoder back to full resolution, the encoder's features concatenated (the one
skip connection) -> conv to C channels. No time input: it is trained at one fixed noise level (diffusion.sigma).
"""

from __future__ import annotations

import torch
from torch import nn

from gancore.config import ModelConfig
from gancore.families.diffusion_config import DiffusionConfig
from gancore.errors import ConfigError
from gancore.registry import MODELS


class OneLevelDenoiser(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int):
        super().__init__()
        c = image_shape[0]
        w = width
        self.enc = nn.Sequential(  # (B, C, H, W) -> (B, w, H, W)
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(True), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(True))
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(True))  # -> (B, 2w, H/2, W/2)
        self.class_emb = nn.Embedding(num_classes, 2 * w)  # the class as a bias on the bottleneck features
        self.mid = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(True))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(True))  # -> (B, w, H, W)
        self.dec = nn.Sequential(  # [up, enc] (B, 2w, H, W) -> (B, C, H, W)
            nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU(True), nn.Conv2d(w, c, 3, padding=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        h = self.down(e) + self.class_emb(y)[:, :, None, None]
        h = self.up(self.mid(h))
        return self.dec(torch.cat([h, e], 1))


@MODELS.register("denoiser_report")
def build_denoiser_report(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int,
                          diffusion: DiffusionConfig = DiffusionConfig()) -> dict[str, nn.Module]:
    """{"denoiser": OneLevelDenoiser} of base width model.ngf (the preset: 64)."""
    if image_shape[1] % 2 or image_shape[2] % 2:
        raise ConfigError(f"model.arch=denoiser_report needs an even image size (got {image_shape[1]}x{image_shape[2]})")
    return {"denoiser": OneLevelDenoiser(image_shape, num_classes, m.ngf)}
