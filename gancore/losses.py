"""Adversarial objectives as small objects with the same two methods.

    d_loss(D, real, fake, y) -> (loss, stats)     g_loss(D, fake, y, real=None) -> (loss, stats)

D is called inside the loss, so objectives that need more than logits (WGAN-GP's gradient penalty, R1/R2) keep the
same interface. A loss whose G step compares fakes with reals (the relativistic RaGAN, R3GAN's RpGAN) says so with
`uses_real_in_g = True`, and the family then passes the step's real batch as `real` (the others are not given one,
so their steps draw nothing more from the random streams). Such a loss is one class and a registry line. Stats are detached 0-d tensors named like `D/real`; the trainer aggregates them without host syncs.
Regularisers that act on D's inputs (instance noise) sit beside them and are applied by the GAN family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gancore.config import LossConfig
from gancore.registry import LOSSES

Stats = dict[str, torch.Tensor]


def _d(D: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return (D(x, y) if y is not None else D(x)).float().flatten()  # (B,) logits, fp32 for the loss maths


def _prob_stats(real: torch.Tensor, fake: torch.Tensor) -> Stats:
    """D(x), D(G(z)) as probabilities and D's accuracy at threshold 0.5 (logit 0)."""
    real, fake = real.detach(), fake.detach()
    acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
    return {"D/real": torch.sigmoid(real).mean(), "D/fake": torch.sigmoid(fake).mean(), "D/acc": acc}


class AdversarialLoss:
    uses_real_in_g = False  # True: g_loss needs the real batch (`real=`)

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def d_loss(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def g_loss(self, D: nn.Module, fake: torch.Tensor, y: torch.Tensor | None = None,
               real: torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError


@LOSSES.register("nonsaturating")
class NonSaturating(AdversarialLoss):
    """Goodfellow's BCE with the non-saturating G loss -log D(G(z)); one-sided label smoothing on real targets."""

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        target = torch.full_like(lr, self.cfg.label_smoothing)  # 0.9 = one-sided smoothing (Salimans et al.)
        loss = F.binary_cross_entropy_with_logits(lr, target) + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        return loss, {"Loss/D": loss.detach(), **_prob_stats(lr, lf)}

    def g_loss(self, D, fake, y=None, real=None):
        lf = _d(D, fake, y)
        loss = F.binary_cross_entropy_with_logits(lf, torch.ones_like(lf))
        return loss, {"Loss/G": loss.detach(), "D/fake_g": torch.sigmoid(lf.detach()).mean()}


@LOSSES.register("lsgan")
class LeastSquares(AdversarialLoss):
    """LSGAN (Mao et al.): MSE of D's raw output to targets 1 (real) / 0 (fake); G pulls fakes to 1."""

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        loss = 0.5 * ((lr - self.cfg.label_smoothing).pow(2).mean() + lf.pow(2).mean())
        return loss, {"Loss/D": loss.detach(), "D/real": lr.detach().mean(), "D/fake": lf.detach().mean(),
                      "D/acc": 0.5 * ((lr.detach() > 0.5).float().mean() + (lf.detach() < 0.5).float().mean())}

    def g_loss(self, D, fake, y=None, real=None):
        lf = _d(D, fake, y)
        loss = 0.5 * (lf - 1).pow(2).mean()
        return loss, {"Loss/G": loss.detach(), "D/fake_g": lf.detach().mean()}


@LOSSES.register("hinge")
class Hinge(AdversarialLoss):
    """Hinge loss (Lim & Ye; SAGAN): D: relu(1 - D(x)) + relu(1 + D(G(z))); G: -D(G(z))."""

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        loss = F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
        return loss, {"Loss/D": loss.detach(), **_prob_stats(lr, lf)}

    def g_loss(self, D, fake, y=None, real=None):
        lf = _d(D, fake, y)
        loss = -lf.mean()
        return loss, {"Loss/G": loss.detach(), "D/fake_g": torch.sigmoid(lf.detach()).mean()}


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates x_hat (Gulrajani et al.)."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = _d(D, x_hat, y)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def zero_centred_penalty(D: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """E ||grad_x D(x)||_2^2 at the given images (R1 on real ones, R2 on generated ones; Mescheder et al. 2018)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_d(D, x, y).sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


@LOSSES.register("wgan_gp")
class WassersteinGP(AdversarialLoss):
    """WGAN-GP: critic maximises D(x) - D(G(z)) with a gradient penalty (weight loss.gp_weight); no sigmoid."""

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        gp = gradient_penalty(D, real, fake, y)
        wdist = lr.mean() - lf.mean()
        loss = -wdist + self.cfg.gp_weight * gp
        return loss, {"Loss/D": loss.detach(), "D/real": lr.detach().mean(), "D/fake": lf.detach().mean(),
                      "D/wasserstein": wdist.detach(), "D/gp": gp.detach()}

    def g_loss(self, D, fake, y=None, real=None):
        lf = _d(D, fake, y)
        loss = -lf.mean()
        return loss, {"Loss/G": loss.detach(), "D/fake_g": lf.detach().mean()}


def _real_logits(D: nn.Module, real: torch.Tensor | None, y: torch.Tensor | None, loss: str) -> torch.Tensor:
    """D's logits of the real batch in a G step: constants for G (no graph through D is kept)."""
    if real is None:
        from gancore.errors import ConfigError

        raise ConfigError(f"loss.name={loss} needs the real batch in the generator step and this family passes "
                          "none; use loss.name=nonsaturating, lsgan or hinge")
    with torch.no_grad():
        return _d(D, real, y)


@LOSSES.register("ragan")
class RelativisticAverage(AdversarialLoss):
    """RaGAN (Jolicoeur-Martineau, 2018), relativistic average standard GAN: D asks whether a real image is more
    realistic than the average fake, and a fake less than the average real; G the other way round.
    D: BCE(D(x) - mean D(G(z)), 1) + BCE(D(G(z)) - mean D(x), 0); G: the targets swapped."""

    uses_real_in_g = True

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        rr, rf = lr - lf.mean(), lf - lr.mean()  # (B,) relative logits
        loss = F.binary_cross_entropy_with_logits(rr, torch.ones_like(rr)) + \
            F.binary_cross_entropy_with_logits(rf, torch.zeros_like(rf))
        return loss, {"Loss/D": loss.detach(), **_prob_stats(rr, rf)}

    def g_loss(self, D, fake, y=None, real=None):
        lr, lf = _real_logits(D, real, y, "ragan"), _d(D, fake, y)
        rr, rf = lr - lf.mean(), lf - lr.mean()
        loss = F.binary_cross_entropy_with_logits(rf, torch.ones_like(rf)) + \
            F.binary_cross_entropy_with_logits(rr, torch.zeros_like(rr))
        return loss, {"Loss/G": loss.detach(), "D/fake_g": torch.sigmoid(rf.detach()).mean()}


@LOSSES.register("rpgan")
class RelativisticPairing(AdversarialLoss):
    """RpGAN (R3GAN: Huang et al., 2024, "The GAN is dead; long live the GAN!"): each fake is paired with a real of
    the batch; D: softplus(D(G(z)_i) - D(x_i)), G: softplus(D(x_i) - D(G(z)_i)), batch means. R3GAN's R1 and R2
    are the GAN family's zero-centred penalties, for any loss: loss.r1 and loss.r2 (R3GAN: equal weights)."""

    uses_real_in_g = True

    def d_loss(self, D, real, fake, y=None):
        lr, lf = _d(D, real, y), _d(D, fake, y)
        loss = F.softplus(lf - lr).mean()
        return loss, {"Loss/D": loss.detach(), "D/real": lr.detach().mean(), "D/fake": lf.detach().mean(),
                      "D/acc": (lr.detach() > lf.detach()).float().mean()}  # pairs D orders correctly

    def g_loss(self, D, fake, y=None, real=None):
        lr, lf = _real_logits(D, real, y, "rpgan"), _d(D, fake, y)
        loss = F.softplus(lr - lf).mean()
        return loss, {"Loss/G": loss.detach(), "D/fake_g": lf.detach().mean()}


class InstanceNoise:
    """Gaussian noise of std `sigma` added to every D input, real and fake (MNIST report: 0.05)."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.sigma > 0 else x


def make_loss(cfg: LossConfig) -> AdversarialLoss:
    return LOSSES[cfg.name](cfg)
