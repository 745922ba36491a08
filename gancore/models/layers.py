"""Small shared pieces: activations by name, DCGAN init, optional spectral norm."""

from __future__ import annotations

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
