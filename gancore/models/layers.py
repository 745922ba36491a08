"""Small shared pieces: activations by name, DCGAN init, optional spectral norm, the GAN builders' image sizes."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def act(name: str) -> nn.Module:
    """relu | lrelu (slope 0.2, the DCGAN paper's) | tanh."""
    return {"relu": lambda: nn.ReLU(True), "lrelu": lambda: nn.LeakyReLU(0.2, True), "tanh": nn.Tanh}[name]()


def maybe_sn(layer: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(layer) if on else layer


def dcgan_init(m: nn.Module) -> None:
    """DCGAN paper init: conv/linear weights N(0, 0.02), BatchNorm gamma N(1, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        # under spectral norm `weight` is computed; initialise the stored original
        w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
        nn.init.normal_(w, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def image_sizes(makes: str, fits: Callable[[int, int], bool]) -> Callable[[Any], Any]:
    """Decorates a GAN builder with the images it makes: `makes` in words, `fits(h, w)` the rule (one place; the
    builder checks it with `check_size`, and a size error lists every GAN builder whose rule takes the data)."""
    def deco(builder: Any) -> Any:
        builder.makes, builder.fits = makes, fits
        return builder
    return deco


def four_times_power_of_2(h: int, w: int) -> bool:
    """Square, side 4 * 2^k with k >= 1 (8, 16, 32, 64, 128, ...): G starts at 4x4 and doubles."""
    return h == w and h >= 8 and h % 4 == 0 and (h // 4) & (h // 4 - 1) == 0


def check_size(arch: str, image_shape: tuple[int, int, int]) -> None:
    """A ConfigError when model.arch=`arch` cannot make images of `image_shape`, naming the GAN archs that can."""
    from gancore.errors import ConfigError
    from gancore.registry import MODELS

    h, w = image_shape[1:]
    if MODELS[arch].fits(h, w):
        return
    gan = [n for n in MODELS.names() if getattr(MODELS[n], "fits", None)]
    fit = [n for n in gan if MODELS[n].fits(h, w)]
    by_size: dict[str, list[str]] = {}
    for n in gan:
        by_size.setdefault(MODELS[n].makes, []).append(n)
    sizes = "; ".join(f"{', '.join(names)}: {makes}" for makes, names in by_size.items())
    sides = [s for s in (8, 16, 28, 32, 64, 128, 256) if MODELS[arch].fits(s, s)]
    near = min(sides, key=lambda s: (abs(s - max(h, w)), s)) if sides else None
    resize = f"data.image_size={near}" if near else "data.image_size=S"
    raise ConfigError(f"model.arch={arch} makes {MODELS[arch].makes} images, the data is {h}x{w}; for {h}x{w} use "
                      f"model.arch={', '.join(fit)}, or resize the data with {resize} ({sizes})")


def dcgan_pair(G: nn.Module, D: nn.Module) -> dict[str, nn.Module]:
    """A GAN builder's result: {"G": G, "D": D}, both with the DCGAN init."""
    G.apply(dcgan_init)
    D.apply(dcgan_init)
    return {"G": G, "D": D}


class LabelMap(nn.Module):
    """Class label -> one extra (B, 1, H, W) input plane for a conditional discriminator."""

    def __init__(self, num_classes: int, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w
        self.embed = nn.Embedding(num_classes, h * w)

    def forward(self, y):
        return self.embed(y).view(-1, 1, self.h, self.w)
