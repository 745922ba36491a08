"""The class-conditional U-Net of the diffusion family (`model.arch=unet`), after Ho et al. / improved-diffusion.

    x (B, C, H, W), t (B,) int, y (B,) int (index num_classes = the "null" class for classifier-free guidance)
    -> eps prediction (B, C, H, W)

Sinusoidal time embedding -> MLP, plus a learned class embedding (num_classes + 1 rows), added together and fed
to every residual block. Levels: one per `diffusion.channel_mult` entry (width model.ngf * mult), each with
`diffusion.num_res_blocks` residual blocks (GroupNorm, SiLU, dropout); a stride-2 conv between levels, nearest
upsampling + conv on the way back, skip connections concatenated. Optional self-attention at the lowest
resolution and in the middle block (`diffusion.attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gancore.config import ModelConfig
from gancore.families.diffusion_config import DiffusionConfig
from gancore.errors import ConfigError
from gancore.registry import MODELS


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features (Transformer positional encoding of t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups; narrow widths (tiny test U-Nets) keep >= 4 channels per group, since one channel
    per group would be instance norm, which erases the per-channel time/class embedding added before it."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0 and g <= max(1, ch // 4))
    return nn.GroupNorm(groups, ch)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialised layer: each residual branch starts as the identity (improved-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> + emb -> GN -> SiLU -> dropout -> conv, plus a (1x1 when widths differ) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)  # (B, ch, H, W) -> (B, ch, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, ch, H, W) -> (B, ch, 2H, 2W)


class Seq(nn.ModuleList):
    """Layers applied in order; residual blocks also get the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t, y); `null_class` (= num_classes) is the label of the unconditional model."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, base: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, attention: bool, dropout: float):
        super().__init__()
        c, h, w = image_shape
        levels = len(channel_mult)
        if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
            raise ConfigError(f"model.arch=unet: image size {h}x{w} is not divisible by 2^{levels - 1} "
                              f"(diffusion.channel_mult has {levels} levels); use fewer levels or data.image_size")
        self.base = base
        self.null_class = num_classes
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row: the null label (unconditional)

        self.inp = nn.Conv2d(c, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base], base
        for i, mult in enumerate(channel_mult):
            lowest = i == levels - 1
            for _ in range(num_res_blocks):
                block = [ResBlock(ch, base * mult, emb_dim, dropout)]
                ch = base * mult
                if attention and lowest:
                    block.append(Attention(ch))
                self.down.append(Seq(block))
                skips.append(ch)
            if not lowest:
                self.down.append(Seq([Downsample(ch)]))
                skips.append(ch)
        self.mid = Seq([ResBlock(ch, ch, emb_dim, dropout), *([Attention(ch)] if attention else []),
                        ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):  # one extra block per level takes the Downsample's skip
                block = [ResBlock(ch + skips.pop(), base * mult, emb_dim, dropout)]
                ch = base * mult
                if attention and i == levels - 1:
                    block.append(Attention(ch))
                if i > 0 and j == num_res_blocks:
                    block.append(Upsample(ch))
                self.up.append(Seq(block))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, c, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        emb = self.time_mlp(timestep_embedding(t, self.base)) + self.class_emb(y)  # (B, 4*base)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


@MODELS.register("unet")
def build_unet(m: ModelConfig, image_shape: tuple[int, int, int], num_classes: int,
               diffusion: DiffusionConfig = DiffusionConfig()) -> dict[str, nn.Module]:
    """{"denoiser": UNet}. The level layout lives in the diffusion section, which the family passes along."""
    return {"denoiser": UNet(image_shape, num_classes, m.ngf, diffusion.channel_mult, diffusion.num_res_blocks,
                             diffusion.attention, diffusion.dropout)}
