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


def _last_layer_by_hand(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """G's last Linear / Conv2d / ConvTranspose2d applied to its input h with torch.nn.functional and its weights."""
    F = torch.nn.functional
    if isinstance(layer, torch.nn.Linear):
        return F.linear(h, layer.weight, layer.bias)
    if isinstance(layer, torch.nn.ConvTranspose2d):
        return F.conv_transpose2d(h, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding)
    return F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding)


def _loss_by_hand(cfg, phase: str, logits: list[torch.Tensor], stats: dict) -> float:
    """The phase's loss written out from D's logits as the phase saw them (real, fake[, interpolates] for D; the
    fakes for G); WGAN-GP's penalty is taken from its statistic (test_losses.py checks it against autograd)."""
    F = torch.nn.functional
    name, t = cfg.loss.name, cfg.loss.label_smoothing
    if phase == "G":
        lf = logits[0].flatten()
        return {"nonsaturating": F.softplus(-lf).mean(), "lsgan": 0.5 * (lf - 1).pow(2).mean(),
                "hinge": -lf.mean(), "wgan_gp": -lf.mean()}[name].item()
    lr, lf = logits[0].flatten(), logits[1].flatten()
    if name == "nonsaturating":  # BCE(l, t) = t softplus(-l) + (1 - t) softplus(l)
        return ((t * F.softplus(-lr) + (1 - t) * F.softplus(lr)).mean() + F.softplus(lf).mean()).item()
    if name == "lsgan":
        return (0.5 * ((lr - t).pow(2).mean() + lf.pow(2).mean())).item()
    if name == "hinge":
        return ((1 - lr).clamp(min=0).mean() + (1 + lf).clamp(min=0).mean()).item()
    return (lf.mean() - lr.mean() + cfg.loss.gp_weight * stats["D/gp"]).item()  # wgan_gp


@pytest.mark.parametrize("arch,shape,over", CASES, ids=[f"{a}-{'-'.join(o) or 'default'}" for a, s, o in CASES])
def test_shapes_and_one_step(arch, shape, over):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", "model.nz=16", "model.ngf=8", "model.ndf=8", *over])
    fam = FAMILIES["gan"](cfg, shape, 10)
    G, D = fam.networks["G"], fam.networks["D"]
    b = 4
    z, y = torch.randn(b, 16), torch.randint(0, 10, (b,))
    cond = y if cfg.model.conditional else None
    # G's output is tanh of its last layer: that layer recomputed from its weights on the input it got
    last = [m for m in G.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    seen = []
    hook = last.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    x = G(z, cond)
    hook.remove()
    assert x.shape == (b, *shape)
    with torch.no_grad():
        torch.testing.assert_close(x, torch.tanh(_last_layer_by_hand(last, seen[0])).view(b, *shape),
                                   rtol=1e-5, atol=1e-6)
    assert D(x, cond).shape == (b, 1)

    batch = Batch(torch.rand(b, *shape) * 2 - 1, y)
    ctx = StepContext()  # what one step's phases share
    for phase in fam.phases:
        opt = fam.optimizers[phase.optimizer]
        params = opt.param_groups[0]["params"]
        before = [p.detach().clone() for p in params]
        logits = []
        hook = D.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
        loss, stats = phase.loss(batch, ctx)
        hook.remove()
        assert loss.ndim == 0 and stats[f"Loss/{phase.name}"] == loss.detach()
        assert loss.item() == pytest.approx(_loss_by_hand(cfg, phase.name, logits, stats), rel=1e-5, abs=1e-6)
        opt.zero_grad()
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        opt.step()
        # Adam's first step, bias-corrected: m_hat = g, v_hat = g^2, so p <- p - lr g / (|g| + eps)
        lr, eps = opt.param_groups[0]["lr"], opt.param_groups[0]["eps"]
        assert lr == (cfg.optim.lr_d if phase.name == "D" else cfg.optim.lr_g)
        for p, p0, g in zip(params, before, grads):
            torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + eps), rtol=0, atol=1e-3 * lr)
        # and the step is not vacuous: every weight matrix and kernel got a gradient (not every bias: hinge and
        # WGAN losses have d/d(bias) = -1 + 1 = 0 at D's head; class embeddings: only the labels drawn)
        embedded = {id(q) for m in fam.networks[phase.optimizer].modules() if isinstance(m, torch.nn.Embedding)
                    for q in m.parameters()}
        assert all(g.any() for p, g in zip(params, grads) if p.dim() >= 2 and id(p) not in embedded), phase.name
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


def _lin(i, o):
    return i * o + o


def _conv(i, o, k):
    return i * o * k * k + o


# G: Linear(100, 128*7*7) + BN1d, ConvT 128->64 + BN, ConvT 64->32 + BN, Conv3x3 32->1; D: Conv 1->64, 64->128 + BN,
# 128->256 + BN (4x4), Linear(256*3*3, 1024), Linear(1024, 1)  (BatchNorm: a gain and a bias per channel)
_DCGAN_MNIST = {"G": _lin(100, 6272) + 2 * 6272 + _conv(128, 64, 4) + 2 * 64 + _conv(64, 32, 4) + 2 * 32
                + _conv(32, 1, 3),
                "D": _conv(1, 64, 4) + _conv(64, 128, 4) + 2 * 128 + _conv(128, 256, 4) + 2 * 256 + _lin(2304, 1024)
                + _lin(1024, 1)}
HAND_COUNTS = {
    "mnist_dcgan.yaml": _DCGAN_MNIST, "quickstart.yaml": _DCGAN_MNIST,
    # Keras MLP: G Dense 100->256->512->1024 (BatchNorm after each) -> 784; D Dense 784->512->256->1
    "mnist_mlp_gan.yaml": {"G": _lin(100, 256) + 2 * 256 + _lin(256, 512) + 2 * 512 + _lin(512, 1024) + 2 * 1024
                           + _lin(1024, 784), "D": _lin(784, 512) + _lin(512, 256) + _lin(256, 1)},
}


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
    # the optimisers hold every trainable weight of the networks, each exactly once, and nothing else; every
    # phase steps one of them and every one is stepped by some phase
    trainable = [p for n in fam.networks.values() for p in n.parameters() if p.requires_grad]
    optimised = [p for o in fam.optimizers.values() for group in o.param_groups for p in group["params"]]
    assert len({id(p) for p in optimised}) == len(optimised)
    assert {id(p) for p in optimised} == {id(p) for p in trainable}, preset
    assert {ph.optimizer for ph in fam.phases} == set(fam.optimizers), preset
    if preset in HAND_COUNTS:  # the report presets' parameter counts, layer by layer from their layouts
        assert {k: sum(p.numel() for p in n.parameters()) for k, n in fam.networks.items()} == HAND_COUNTS[preset]
