"""Every shipped preset (configs/*.yaml) is built AND runs one forward pass of each of its networks, with the shapes
its family expects (issue #25 item 4). test_models.py builds the presets; this runs them, at batch 2, on no data:
the image shape comes from the dataset name and data.image_size, as the loop would see it."""

from pathlib import Path

import pytest
import torch

from gancore.config import load_config
from gancore.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "folder": (3, 64, 64)}  # folder: RGB at its image_size
B, K = 2, 10  # batch, classes

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.torch_threads


def _forward_gan(fam, cfg, shape):
    G, D = fam.networks["G"], fam.networks["D"]
    y = torch.randint(0, K, (B,)) if cfg.model.conditional else None
    x = G(torch.randn(B, cfg.model.nz), y)
    assert x.shape == (B, *shape)
    assert D(x, y).shape == (B, 1)


def _forward_ganomaly(fam, cfg, shape):
    G, D = fam.networks["G"], fam.networks["D"]
    x_hat, z, z_hat = G(torch.rand(B, *shape) * 2 - 1)
    assert x_hat.shape == (B, *shape) and z.shape == z_hat.shape == (B, cfg.model.nz)
    assert D(z if cfg.ganomaly.disc == "latent" else x_hat).shape == (B, 1)


def _forward_vae(fam, cfg, shape):
    mu, logvar = fam.networks["encoder"](torch.rand(B, *shape))
    assert mu.shape == logvar.shape == (B, cfg.model.nz)
    assert fam.networks["decoder"](mu).shape == (B, *shape)


def _forward_diffusion(fam, cfg, shape):
    x, y = torch.randn(B, *shape), torch.randint(0, K, (B,))
    t = torch.tensor([0, cfg.diffusion.timesteps - 1])  # both ends of the schedule
    assert fam.networks["denoiser"](x, t, y).shape == (B, *shape)  # eps_theta(x_t, t, y)


def _forward_denoiser_report(fam, cfg, shape):
    x, y = torch.randn(B, *shape), torch.randint(0, K, (B,))
    assert fam.networks["denoiser"](x, y).shape == (B, *shape)  # D(x + sigma eps, y) -> x


FORWARD = {"gan": _forward_gan, "ganomaly": _forward_ganomaly, "vae": _forward_vae, "diffusion": _forward_diffusion,
           "denoiser_report": _forward_denoiser_report}


def test_every_family_has_a_forward_check():
    assert set(FORWARD) == set(FAMILIES.names()), "a new family needs its forward pass here"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_runs_one_forward_pass(preset):
    cfg = load_config(preset, [])
    c, h, _ = SHAPES[cfg.data.name]
    shape = (c, cfg.data.image_size or h, cfg.data.image_size or h)
    torch.manual_seed(0)
    fam = FAMILIES[cfg.family](cfg, shape, K)
    for net in fam.networks.values():
        net.eval()  # BatchNorm running statistics: a batch of 2 in train mode is fine too, eval is what sampling uses
    with torch.no_grad():
        FORWARD[cfg.family](fam, cfg, shape)
