"""Shape test and one optimisation step per model (through the GAN family's own phases)."""

from pathlib import Path

import pytest
import torch

from gancore.config import load_config
from gancore.families.base import Batch, StepContext
from gancore.errors import ConfigError
from gancore.registry import FAMILIES, MODELS

CASES = [
    ("dcgan_mnist", (1, 28, 28), []),
    ("dcgan_mnist", (1, 28, 28), ["model.conditional=true"]),
    ("mlp", (1, 28, 28), []),
    ("mlp", (1, 28, 28), ["model.conditional=true"]),
    ("dcgan", (3, 32, 32), []),
    ("dcgan", (3, 32, 32), ["model.batchnorm=none", "model.g_act=tanh", "model.d_act=relu"]),
    ("dcgan", (3, 32, 32), ["model.conditional=true"]),
    ("dcgan", (3, 32, 32), ["model.batchnorm=g", "loss.name=wgan_gp", "optim.d_iters=5"]),
    ("dcgan", (3, 32, 32), ["model.kernel=5", "model.upsample=nearest", "model.spectral_norm=true", "loss.name=lsgan"]),
    ("dcgan", (3, 64, 64), ["loss.name=hinge"]),
    ("dcgan", (1, 32, 32), ["model.kernel=5"]),
    ("sndcgan", (3, 32, 32), ["model.spectral_norm=true", "model.batchnorm=g", "loss.name=hinge"]),
    ("sndcgan", (3, 32, 32), ["model.spectral_norm=true", "model.batchnorm=g", "loss.name=hinge",
                              "model.conditional=true"]),
    ("sndcgan", (1, 16, 16), ["model.batchnorm=both", "model.conditional=true"]),
]


@pytest.mark.parametrize("arch,shape,over", CASES, ids=[f"{a}-{'-'.join(o) or 'default'}" for a, s, o in CASES])
def test_shapes_and_one_step(arch, shape, over):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", "model.nz=16", "model.ngf=8", "model.ndf=8", *over])
    fam = FAMILIES["gan"](cfg, shape, 10)
    G, D = fam.networks["G"], fam.networks["D"]
    b = 4
    z, y = torch.randn(b, 16), torch.randint(0, 10, (b,))
    cond = y if cfg.model.conditional else None
    x = G(z, cond)
    assert x.shape == (b, *shape)
    assert x.min() >= -1 and x.max() <= 1  # tanh output
    assert D(x, cond).shape == (b, 1)

    batch = Batch(torch.rand(b, *shape) * 2 - 1, y)
    ctx = StepContext()  # what one step's phases share
    for phase in fam.phases:
        before = [p.detach().clone() for p in fam.optimizers[phase.optimizer].param_groups[0]["params"]]
        loss, stats = phase.loss(batch, ctx)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(v) for v in stats.values())
        opt = fam.optimizers[phase.optimizer]
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = opt.param_groups[0]["params"]
        assert any(not torch.equal(a, b_) for a, b_ in zip(after, before)), f"{phase.name} step changed nothing"
    assert fam.phases[0].repeats == cfg.optim.d_iters


def test_mnist_dcgan_matches_report_layout():
    nets = MODELS["dcgan_mnist"](load_config(None).model, (1, 28, 28), 10)
    G, D = nets["G"], nets["D"]
    assert G.fc[0].in_features == 100 and G.fc[0].out_features == 128 * 7 * 7
    convT = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convT] == [(128, 64, (4, 4), (2, 2)), (64, 32, (4, 4), (2, 2))]
    convs = [m for m in D.features if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256]
    assert D.head[0].in_features == 256 * 3 * 3 and D.head[0].out_features == 1024


def test_mlp_keras_batchnorm_momentum():
    G = MODELS["mlp"](load_config(None, ["model.arch=mlp"]).model, (1, 28, 28), 10)["G"]
    bns = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.num_features for m in bns] == [256, 512, 1024] and all(m.momentum == 0.2 for m in bns)


def test_spectral_norm_bounds_top_singular_value():
    torch.manual_seed(0)
    D = MODELS["dcgan"](load_config(None, ["model.arch=dcgan", "model.spectral_norm=true", "model.batchnorm=none"]).model, (3, 32, 32), 10)["D"]
    lin = D.head
    for _ in range(30):  # power iterations run in train-mode forwards
        D(torch.randn(2, 3, 32, 32))
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), ord=2).item()
    assert sigma == pytest.approx(1.0, rel=0.05)


def _sndcgan(*over):
    cfg = load_config(None, ["model.arch=sndcgan", "model.spectral_norm=true", "model.batchnorm=g", *over])
    return MODELS["sndcgan"](cfg.model, (3, 32, 32), 10)


def test_sndcgan_matches_the_standard_cnn_layout():
    """Miyato et al. 2018, table 3 (CIFAR-10): G 512x4x4 -> ConvT 256, 128, 64 -> Conv3x3 3; D Conv3x3 64, 4x4/2 64,
    3x3 128, 4x4/2 128, 3x3 256, 4x4/2 256, 3x3 512 -> global sum -> Linear 1; spectral norm on every D layer."""
    nets = _sndcgan()
    G, D = nets["G"], nets["D"]
    assert G.fc.out_features == 512 * 4 * 4
    assert [(m.in_channels, m.out_channels) for m in G.ups] == [(512, 256), (256, 128), (128, 64)]
    assert [m.affine for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [True] * 3
    convs = [m for m in D.features if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == [
        (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2), (512, 3, 1)]
    assert all(hasattr(m, "parametrizations") for m in [*convs, D.head])  # spectral norm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules()) and D.embed is None


def test_projection_discriminator_adds_the_class_embedding_inner_product():
    """D(x, y) = w . h(x) + b + <embed(y), h(x)>, h = sum over H, W of the last features: checked by hand."""
    torch.manual_seed(0)
    D = _sndcgan("model.conditional=true")["D"].eval()  # eval: the spectral-norm power iteration holds still
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 9])
    with torch.no_grad():
        h = D.features(x).sum(dim=(2, 3))
        expect = h @ D.head.weight.T + D.head.bias + (D.embed.weight[y] * h).sum(1, keepdim=True)
        assert torch.allclose(D(x, y), expect, atol=1e-5)
        other = D(x, torch.tensor([1, 1, 1]))
    assert not torch.allclose(D(x, y), other)  # the class matters


def test_class_batchnorm_uses_the_class_gain_and_bias():
    from gancore.models.sngan import ClassBatchNorm2d

    torch.manual_seed(0)
    bn = ClassBatchNorm2d(4, 3)
    with torch.no_grad():
        bn.gain.weight.copy_(torch.arange(12.0).view(3, 4))
        bn.bias.weight.copy_(-torch.arange(12.0).view(3, 4))
    x, y = torch.randn(6, 4, 5, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    normed = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    out = bn(x, y)
    for i, c in enumerate(y.tolist()):
        g, b = torch.arange(4.0) + 4 * c, -(torch.arange(4.0) + 4 * c)
        assert torch.allclose(out[i], normed[i] * g[:, None, None] + b[:, None, None], atol=1e-4)
    assert _sndcgan("model.conditional=true")["G"].norms[0].gain.weight.eq(1).all()  # starts as plain BatchNorm


def test_bad_image_size_for_dcgan():
    with pytest.raises(ConfigError, match="4 \\* 2\\^k"):
        MODELS["dcgan"](load_config(None, ["model.arch=dcgan"]).model, (1, 28, 28), 10)


PRESETS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "folder": (3, 64, 64)}  # folder: RGB at its image_size


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_its_family_and_networks(preset):
    """Each configs/*.yaml is parsed, validated AND built: its family with every network, optimiser and phase (no
    data: the image shape comes from the dataset name and data.image_size, as the loop would see it)."""
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / preset, [])
    c, h, w = SHAPES[cfg.data.name]
    side = cfg.data.image_size or h
    torch.manual_seed(0)
    fam = FAMILIES[cfg.family](cfg, (c, side, side), 10)
    assert fam.networks and all(sum(p.numel() for p in n.parameters()) > 0 for n in fam.networks.values())
    assert fam.optimizers and fam.phases
