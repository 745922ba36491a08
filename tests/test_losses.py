"""Loss values against hand computation; the gradient penalty against autograd on a toy critic."""

import math

import helpers
import pytest
import torch
from torch import nn

from gancore.config import LossConfig
from gancore.losses import Hinge, InstanceNoise, LeastSquares, NonSaturating, WassersteinGP, gradient_penalty, make_loss
from gancore.errors import RegistryError
from gancore.families.base import StepContext
from conftest import needs_mnist


class Fixed(nn.Module):
    """A 'discriminator' that returns the first pixel of each image as its logit."""

    def forward(self, x, y=None):
        return x.flatten(1)[:, :1]


def imgs(*vals):
    return torch.tensor(vals, dtype=torch.float32).view(-1, 1, 1, 1)


def sp(x):  # softplus, by hand
    return math.log1p(math.exp(x))


def test_nonsaturating_by_hand():
    D, real, fake = Fixed(), imgs(2.0, -1.0), imgs(0.5, -3.0)
    loss, stats = NonSaturating(LossConfig()).d_loss(D, real, fake)
    # BCE(logit, 1) = softplus(-l); BCE(logit, 0) = softplus(l)
    want = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["D/acc"].item() == pytest.approx(0.5 * (0.5 + 0.5))
    assert stats["D/real"].item() == pytest.approx((1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1))) / 2, rel=1e-6)
    g, _ = NonSaturating(LossConfig()).g_loss(D, fake)
    assert g.item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)


def test_label_smoothing_changes_real_target_only():
    D, real, fake = Fixed(), imgs(2.0), imgs(-1.0)
    loss, _ = NonSaturating(LossConfig(label_smoothing=0.9)).d_loss(D, real, fake)
    # BCE with target t: -(t log s(l) + (1-t) log(1-s(l))) = softplus(-l)*t + softplus(l)*(1-t)
    want = 0.9 * sp(-2.0) + 0.1 * sp(2.0) + sp(-1.0)
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_lsgan_by_hand():
    D, real, fake = Fixed(), imgs(0.8, 1.2), imgs(0.1, -0.3)
    loss, _ = LeastSquares(LossConfig()).d_loss(D, real, fake)
    want = 0.5 * (((0.8 - 1) ** 2 + (1.2 - 1) ** 2) / 2 + (0.1 ** 2 + 0.3 ** 2) / 2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    g, _ = LeastSquares(LossConfig()).g_loss(D, fake)
    assert g.item() == pytest.approx(0.5 * ((0.1 - 1) ** 2 + (-0.3 - 1) ** 2) / 2, rel=1e-6)


def test_hinge_by_hand():
    D, real, fake = Fixed(), imgs(0.5, 2.0), imgs(-2.0, 0.25)
    loss, _ = Hinge(LossConfig()).d_loss(D, real, fake)
    want = (0.5 + 0.0) / 2 + (0.0 + 1.25) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert Hinge(LossConfig()).g_loss(D, fake)[0].item() == pytest.approx(-(-2.0 + 0.25) / 2)


def test_gradient_penalty_matches_autograd_on_toy_critic():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    alpha = torch.rand(5, 1, 1, 1)
    gp = gradient_penalty(critic, real, fake, None, alpha=alpha)
    # by hand: per-sample gradient of the critic at each interpolate, one at a time
    terms = []
    for i in range(5):
        xi = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (gi,) = torch.autograd.grad(critic(xi).sum(), xi, create_graph=True)
        terms.append((gi.norm() - 1) ** 2)
    want = torch.stack(terms).mean()
    assert gp.item() == pytest.approx(want.item(), rel=1e-5)
    # create_graph=True: the penalty itself is differentiable w.r.t. the critic, with the by-hand penalty's gradient
    # (the last layer's bias does not change the critic's input gradient, so it gets none, in both)
    params = [critic[1].weight, critic[1].bias, critic[3].weight]
    got_grads = torch.autograd.grad(gp, params + [critic[3].bias], allow_unused=True)
    want_grads = torch.autograd.grad(want, params)
    assert got_grads[-1] is None
    for got, w in zip(got_grads, want_grads):
        assert w.abs().max() > 1e-4  # every layer that shapes the input gradient gets a gradient
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_of_linear_critic_is_known():
    # D(x) = w.x has gradient w everywhere: penalty = (||w|| - 1)^2 = (5 - 1)^2 = 16
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    critic = nn.Sequential(nn.Flatten(), lin)
    gp = gradient_penalty(critic, torch.randn(4, 1, 1, 2), torch.randn(4, 1, 1, 2), None)
    assert gp.item() == pytest.approx(16.0, rel=1e-6)


def test_wgan_gp_loss_combines_terms():
    D, real, fake = Fixed(), imgs(1.0, 3.0), imgs(-1.0, 0.0)
    loss, stats = WassersteinGP(LossConfig(gp_weight=10.0)).d_loss(D, real, fake)
    # Fixed critic: gradient is e_0 (norm 1) -> penalty 0; loss = -(mean real - mean fake) = -(2 - (-0.5))
    assert stats["D/gp"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(-2.5)


def test_instance_noise_std():
    torch.manual_seed(0)
    x = torch.zeros(20000)
    assert InstanceNoise(0.05)(x).std().item() == pytest.approx(0.05, rel=0.03)
    assert InstanceNoise(0.0)(x) is x


def test_registry_error_lists_known():
    with pytest.raises(RegistryError, match="unknown loss .wgan..*known: hinge, lsgan, nonsaturating, ragan, rpgan, wgan_gp"):
        make_loss(LossConfig(name="wgan"))


class Square(nn.Module):
    """D(x) = sum_i x_i^2 / 2: grad_x D = x, so E||grad||^2 = mean over the batch of ||x||^2, by hand."""

    def forward(self, x, y=None):
        return 0.5 * x.flatten(1).pow(2).sum(1, keepdim=True)


def test_zero_centred_penalty_by_hand():
    from gancore.losses import zero_centred_penalty

    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).view(2, 1, 1, 2)  # ||x||^2 = 5 and 10
    assert zero_centred_penalty(Square(), x, None).item() == pytest.approx(7.5)


def test_gan_family_adds_r1_on_real_and_r2_on_fake_images_by_hand():
    from gancore.config import from_dict
    from gancore.families.base import Batch
    from gancore.families.gan import GAN

    cfg = from_dict({"loss": {"r1": 2.0, "r2": 0.5}, "model": {"arch": "dcgan_mnist", "ngf": 8, "ndf": 8, "nz": 4}})
    fam = GAN(cfg, (1, 28, 28), 10)
    fam.networks["D"] = Square()
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    ctx = StepContext()
    loss, stats = fam.d_loss(Batch(x, torch.zeros(3, dtype=torch.long)), ctx)
    fake = ctx.take("fake")[0].detach()
    base, _ = NonSaturating(cfg.loss).d_loss(Square(), x, fake)
    r1 = x.flatten(1).pow(2).sum(1).mean()  # grad of Square at x is x
    r2 = fake.flatten(1).pow(2).sum(1).mean()
    assert stats["D/r1"].item() == pytest.approx(r1.item(), rel=1e-5)
    assert stats["D/r2"].item() == pytest.approx(r2.item(), rel=1e-5)
    assert loss.item() == pytest.approx(base.item() + 0.5 * 2.0 * r1.item() + 0.5 * 0.5 * r2.item(), rel=1e-5)
    assert stats["Loss/D"].item() == pytest.approx(loss.item())


def test_penalty_batch_takes_the_first_images_only():
    from gancore.config import from_dict
    from gancore.families.base import Batch
    from gancore.families.gan import GAN

    cfg = from_dict({"loss": {"r1": 2.0, "penalty_batch": 2}, "model": {"arch": "dcgan_mnist", "ngf": 8, "ndf": 8, "nz": 4}})
    fam = GAN(cfg, (1, 28, 28), 10)
    fam.networks["D"] = Square()
    x = torch.randn(5, 1, 28, 28)
    _, stats = fam.d_loss(Batch(x, torch.zeros(5, dtype=torch.long)), StepContext())
    assert stats["D/r1"].item() == pytest.approx(x[:2].flatten(1).pow(2).sum(1).mean().item(), rel=1e-5)


def test_ragan_by_hand_and_g_gradient():
    from gancore.losses import RelativisticAverage

    D, real, fake = Fixed(), imgs(2.0, -1.0), imgs(0.5, -3.0)
    # mean D(x) = 0.5, mean D(G(z)) = -1.25: relative logits real [3.25, 0.25], fake [0, -3.5]
    loss, stats = RelativisticAverage(LossConfig()).d_loss(D, real, fake)
    assert loss.item() == pytest.approx((sp(-3.25) + sp(-0.25)) / 2 + (sp(0.0) + sp(-3.5)) / 2, rel=1e-6)
    fake = fake.clone().requires_grad_(True)
    g, _ = RelativisticAverage(LossConfig()).g_loss(D, fake, real=real)
    assert g.item() == pytest.approx((sp(-0.0) + sp(3.5)) / 2 + (sp(3.25) + sp(0.25)) / 2, rel=1e-6)
    # dG/dD(G(z))_j = -sigmoid(-rf_j)/B - mean_i sigmoid(rr_i)/B (the second through mean D(G(z)) in rr)
    g.backward()
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    want = [-sig(-rf) / 2 - (sig(3.25) + sig(0.25)) / 2 / 2 for rf in (0.0, -3.5)]
    assert fake.grad.flatten().tolist() == pytest.approx(want, rel=1e-6)


class Quad(nn.Module):
    """D(x) = a * ||x||^2 / 2, so grad_x D = a x and ||grad_x D||^2 = a^2 ||x||^2 (the R1/R2 penalties by hand)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))

    def forward(self, x, y=None):
        return (0.5 * self.a * x.flatten(1).pow(2).sum(1, keepdim=True))


def test_rpgan_by_hand():
    from gancore.losses import RelativisticPairing

    D = Quad()
    real = torch.tensor([[1.0, 2.0], [0.0, 3.0]]).view(2, 1, 1, 2)  # D(x) = [2.5, 4.5]
    fake = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(2, 1, 1, 2)  # D(G(z)) = [1, 2]
    loss, stats = RelativisticPairing(LossConfig(name="rpgan")).d_loss(D, real, fake)
    assert loss.item() == pytest.approx((sp(1 - 2.5) + sp(2 - 4.5)) / 2, rel=1e-6)  # pairs (fake_i, real_i)
    assert stats["D/acc"].item() == 1.0  # both reals score above their fakes
    g, _ = RelativisticPairing(LossConfig(name="rpgan")).g_loss(D, fake, real=real)
    assert g.item() == pytest.approx((sp(2.5 - 1) + sp(4.5 - 2)) / 2, rel=1e-6)
    with pytest.raises(Exception, match="loss.name=rpgan needs the real batch in the generator step"):
        RelativisticPairing(LossConfig(name="rpgan")).g_loss(D, fake)


def test_rpgan_with_r1_r2_through_the_gan_family_by_hand():
    """R3GAN's loss: RpGAN plus the family's R1 (reals) and R2 (fakes), values and D's parameter gradient."""
    from gancore.config import from_dict
    from gancore.families.base import Batch
    from gancore.families.gan import GAN

    g1, g2 = 0.2, 0.4
    cfg = from_dict({"loss": {"name": "rpgan", "r1": g1, "r2": g2},
                     "model": {"arch": "dcgan_mnist", "ngf": 8, "ndf": 8, "nz": 4}})
    fam = GAN(cfg, (1, 28, 28), 10)
    fam.networks["D"] = D = Quad()
    torch.manual_seed(0)
    x, ctx = 0.1 * torch.randn(3, 1, 28, 28), StepContext()
    loss, stats = fam.d_loss(Batch(x, torch.zeros(3, dtype=torch.long)), ctx)
    fake = ctx.take("fake")[0].detach()
    qr, qf = x.flatten(1).pow(2).sum(1), fake.flatten(1).pow(2).sum(1)  # ||x||^2: D = q/2, grad = x, penalty = q
    d = 0.5 * (qf - qr)  # D(G(z)_i) - D(x_i) at a = 1
    adv = torch.nn.functional.softplus(d).mean()
    assert stats["D/r1"].item() == pytest.approx(qr.mean().item(), rel=1e-5)
    assert stats["D/r2"].item() == pytest.approx(qf.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx((adv + 0.5 * g1 * qr.mean() + 0.5 * g2 * qf.mean()).item(), rel=1e-5)
    # the penalties reach D's parameter: penalty = a^2 q, so d/da (g/2 a^2 q) = g q at a = 1
    loss.backward()
    want = (torch.sigmoid(d) * d).mean() + g1 * qr.mean() + g2 * qf.mean()
    assert D.a.grad.item() == pytest.approx(want.item(), rel=1e-5)


def _penalty_by_hand(D: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2, the gradient of the summed logits by autograd."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x)
    return grad.flatten(1).pow(2).sum(1).mean()


@needs_mnist
@pytest.mark.parametrize("name", ["ragan", "rpgan"])
def test_relativistic_losses_train_through_the_gan_family_unchanged(name, monkeypatch):
    """The GAN family hands the real batch to losses that ask for it: a few real steps, and the epoch's logged
    Loss/D, Loss/G, D/r1 and D/r2 equal the losses written out here on what each step's loss was given (a copy of
    D as it was then, its real and fake images), averaged over the epoch's 4 steps."""
    import copy

    from conftest import tiny
    from gancore.losses import LOSSES
    from gancore.train.loop import fit

    cls, seen = LOSSES[name], {"d": [], "g": []}
    d_loss, g_loss = cls.d_loss, cls.g_loss

    def record_d(self, D, real, fake, y=None):
        seen["d"].append((copy.deepcopy(D), real.detach().clone(), fake.detach().clone()))
        return d_loss(self, D, real, fake, y)

    def record_g(self, D, fake, y=None, real=None):
        seen["g"].append((copy.deepcopy(D), real.detach().clone(), fake.detach().clone()))
        return g_loss(self, D, fake, y, real=real)

    monkeypatch.setattr(cls, "d_loss", record_d)
    monkeypatch.setattr(cls, "g_loss", record_g)
    r1w, r2w = 0.5, 0.5
    r = fit(tiny(f"loss.name={name}", "train.epochs=1", f"loss.r1={r1w}", f"loss.r2={r2w}"), out="r")
    assert r.status == "finished" and r.step == 4
    from gancore.train import state as ckpt

    h = ckpt.load(r.checkpoint)["history"]
    assert h["epoch"] == [1] and len(seen["d"]) == len(seen["g"]) == 4
    softplus = torch.nn.functional.softplus
    want = {"Loss/D": [], "Loss/G": [], "D/r1": [], "D/r2": []}
    for D, real, fake in seen["d"]:
        with torch.no_grad():
            lr, lf = D(real).flatten(), D(fake).flatten()
        if name == "ragan":  # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l), on the relative logits
            adv = softplus(-(lr - lf.mean())).mean() + softplus(lf - lr.mean()).mean()
        else:
            adv = softplus(lf - lr).mean()
        r1, r2 = _penalty_by_hand(D, real), _penalty_by_hand(D, fake)
        want["Loss/D"].append((adv + 0.5 * r1w * r1 + 0.5 * r2w * r2).item())
        want["D/r1"].append(r1.item())
        want["D/r2"].append(r2.item())
    for D, real, fake in seen["g"]:
        with torch.no_grad():
            lr, lf = D(real).flatten(), D(fake).flatten()
        if name == "ragan":
            g = softplus(-(lf - lr.mean())).mean() + softplus(lr - lf.mean()).mean()
        else:
            g = softplus(lr - lf).mean()
        want["Loss/G"].append(g.item())
    for key, values in want.items():
        assert h[key] == [pytest.approx(sum(values) / 4, rel=1e-5)], (key, values)


def test_loss_names_come_from_the_registry():
    from gancore.registry import LOSSES

    assert {"ragan", "rpgan"} <= set(LOSSES.names())
    with pytest.raises(RegistryError, match="unknown loss 'rpgna'.*known: " + ", ".join(LOSSES.names())):
        make_loss(LossConfig(name="rpgna"))


def test_train_help_lists_the_registered_losses():
    import sys

    from conftest import ROOT
    from gancore.registry import LOSSES

    p = helpers.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], timeout=120, what="train.py --help")
    assert p.returncode == 0 and f"  loss.name: {', '.join(LOSSES.names())}\n" in p.stdout, p.stdout
