"""GANomaly-style anomaly detection: train on one "normal" class, score test images, report AUROC.

Owns: the GANomaly family object, its adversaries (latent / image D), anomaly scores, AUROC and its figures. The
per-digit table of many such runs is gancore/experiments/anomaly_table.py.

    G phase (fresh batch):  x -> G -> (x_hat, z, z_hat)
        Loss/G = w_adv * adv + w_con * |x - x_hat|_1 (mean) + w_enc * |z - z_hat|_2^2 (mean)
    D phase (same batch, what it needs stashed by the G phase): the adversary's D loss

Two adversaries (config ganomaly.disc), each an object with the same two methods:
  latent (default): D tells prior draws N(0, I) ("real") from the encoder's codes z ("fake"); the generator's
      adversarial term pushes z toward the prior (adversarial-autoencoder style). The D/G objectives are the
      configured loss object (loss.name, non-saturating BCE by default).
  image: the paper's image discriminator, x "real" vs x_hat "fake" with the configured loss; the generator's
      adversarial term is feature matching, the mean squared difference of D's last feature maps of x and x_hat.

Anomaly score per image (higher = more anomalous; ganomaly.score): latent, mean over dims of (z - z_hat)^2
(the paper's), or recon, mean over pixels of (x - x_hat)^2. Evaluation convention: on the test split with every
class, images of `data.normal_class` are normal (label 0), all others anomalous (label 1, the positive class).

Sample grids: there is no prior to sample from, so `fixed_inputs` holds a fixed, seeded draw of real test images
(all classes) and `sample` returns their reconstructions x_hat; the trainer's grids and jobs/generate.py show x_hat
(generate's labels are the inputs' digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from gancore.config import Config
from gancore.errors import ConfigError
from gancore.families.base import (EVAL_BATCH, Batch, Family, Phase, Stats, StepContext, eval_mode, load_test_split,
                                   save_figure, titled_rows, unwrap)
from gancore.losses import AdversarialLoss, make_loss
from gancore.registry import FAMILIES, MODELS


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def auroc(scores, labels) -> float:
    """scikit-learn's ROC AUC (labels: 1 = anomalous, the positive class; higher score = more anomalous; 0.5 =
    chance), with a one-line error when a class is missing (scikit-learn's names neither class)."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(labels).astype(bool).ravel()
    if pos.all() or not pos.any():
        raise ValueError(f"AUROC needs both classes (got {int(pos.sum())} positives, {int((~pos).sum())} negatives)")
    return float(roc_auc_score(pos.astype(np.int64), np.asarray(scores, dtype=np.float64).ravel()))


# ----------------------------------------------------------------------------------------------------------------
# Adversaries: what D sees and the generator's adversarial term


class LatentAdversary:
    """D on codes: prior draws N(0, I) are real, the encoder's z are fake; G's term pulls z toward the prior."""

    def __init__(self, loss: AdversarialLoss):
        self.loss = loss

    def g_adv(self, D: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        adv, stats = self.loss.g_loss(D, z)
        return adv, {"D/fake_g": stats["D/fake_g"]}

    def d_loss(self, D: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        return self.loss.d_loss(D, torch.randn_like(z), z)  # the global RNG: checkpointed, resume redraws the same


class ImageAdversary:
    """The paper's D on images: x real, x_hat fake; G's term is feature matching on D's last feature maps."""

    def __init__(self, loss: AdversarialLoss):
        self.loss = loss

    def g_adv(self, D: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        # The feature maps bypass a DDP wrapper: D is not optimised here, and a DDP forward whose head goes unused
        # would wait for gradients that never come. Gradients D collects here are cleared by its own phase.
        f = unwrap(D)
        with torch.no_grad():
            real = f(x, features=True)
        return (real - f(x_hat, features=True)).pow(2).mean(), {}

    def d_loss(self, D: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        return self.loss.d_loss(D, x, x_hat)


ADVERSARIES = {"latent": LatentAdversary, "image": ImageAdversary}


# ----------------------------------------------------------------------------------------------------------------
# Anomaly scores: (x, x_hat, z, z_hat) -> (B,), higher = more anomalous

SCORES = {
    "latent": lambda x, x_hat, z, z_hat: (z - z_hat).pow(2).mean(dim=1),
    "recon": lambda x, x_hat, z, z_hat: (x - x_hat).pow(2).flatten(1).mean(dim=1),
}


@FAMILIES.register("ganomaly")
class GANomaly(Family):
    generator_name = "G"
    headline = ("Loss/G", "Loss/D", "Loss/con")

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        g = cfg.ganomaly
        if cfg.data.normal_class < 0:
            raise ConfigError("family=ganomaly trains on one normal class: set data.normal_class (e.g. 0)")
        if g.disc == "latent" and cfg.loss.name == "wgan_gp":
            raise ConfigError("loss.name=wgan_gp's gradient penalty expects image-shaped D inputs; "
                              "use ganomaly.disc=image or another loss.name")
        if make_loss(cfg.loss).uses_real_in_g:  # its G step (encoder codes / x_hat) has no real batch to pass
            raise ConfigError(f"loss.name={cfg.loss.name} compares fakes with reals in the generator step, which "
                              "family=ganomaly does not have; use loss.name=nonsaturating, lsgan or hinge")
        nets = MODELS[cfg.model.arch](cfg.model, image_shape, num_classes, disc=g.disc)
        self.networks = {"G": nets["G"], "D": nets["D"]}
        self.optimizers = {
            "G": self.adam(nets["G"].parameters(), cfg.optim.lr_g),
            "D": self.adam(nets["D"].parameters(), cfg.optim.lr_d),
        }
        self.adversary = ADVERSARIES[g.disc](make_loss(cfg.loss))
        self.score_fn = SCORES[g.score]
        self.w_adv, self.w_con, self.w_enc = g.w_adv, g.w_con, g.w_enc
        self.normal_class = cfg.data.normal_class
        self.phases = [
            Phase("G", "G", self.g_loss),
            Phase("D", "D", self.d_loss, fresh_batch=False),  # D sees the G phase's batch and reconstructions
        ]
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores: tuple[float, np.ndarray] | None = None  # (weights fingerprint, test scores)

    # -- the two phases --------------------------------------------------------------------------------------
    def g_loss(self, batch: Batch, ctx: StepContext):
        x_hat, z, z_hat = self.networks["G"](batch.x)
        adv, stats = self.adversary.g_adv(self.networks["D"], batch.x, x_hat, z)
        con = (batch.x - x_hat).abs().mean()  # contextual: L1 between x and x_hat
        enc = (z - z_hat).pow(2).mean()  # latent: L2 between z and z_hat
        loss = self.w_adv * adv + self.w_con * con + self.w_enc * enc
        ctx.put("recon", (batch.x, x_hat.detach(), z.detach()))  # for this step's D phase
        return loss, {"Loss/G": loss.detach(), "Loss/adv": adv.detach(), "Loss/con": con.detach(),
                      "Loss/enc": enc.detach(), **stats}

    def d_loss(self, batch: Batch, ctx: StepContext):
        if "recon" not in ctx:
            raise RuntimeError("GANomaly's D phase runs after its G phase (the phases are [G, D])")
        x, x_hat, z = ctx.take("recon")
        return self.adversary.d_loss(self.networks["D"], x, x_hat, z)

    # -- sampling: reconstructions of fixed real test images -------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.test_split()
        idx = torch.randperm(len(x), generator=generator)[torch.arange(n) % len(x)]
        return {"x": x[idx], "y": y[idx]}  # uint8 test images (all classes) and their digits

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        return self.reconstruct(self.sample_inputs(n, generator, inputs)["x"][:n])[0]

    def reconstruct(self, x_uint8: torch.Tensor):
        """(x_hat, z, z_hat) on the device for uint8 images, in eval mode (BatchNorm running statistics)."""
        G = self.sampler_network()
        with eval_mode(G):
            outs = [G(self.prepare(c.to(self.device), None).x) for c in x_uint8.split(EVAL_BATCH)]
        return tuple(torch.cat(o) for o in zip(*outs))

    # -- scores, metrics, figures ----------------------------------------------------------------------------
    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            self._test = load_test_split(self.cfg, self.cfg.ganomaly.test_subset)
        return self._test

    def scores(self, x_uint8: torch.Tensor) -> np.ndarray:
        """Anomaly scores (N,) of uint8 images; higher = more anomalous."""
        G = self.sampler_network()
        out = []
        with eval_mode(G):
            for c in x_uint8.split(EVAL_BATCH):
                x = self.prepare(c.to(self.device), None).x
                x_hat, z, z_hat = G(x)
                out.append(self.score_fn(x, x_hat, z, z_hat).float().cpu())
        return torch.cat(out).numpy()

    def test_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, anomalous 0/1) on the test split, computed once per set of weights (figures + evaluate)."""
        x, y = self.test_split()
        G = self.sampler_network()
        with torch.no_grad():
            fingerprint = float(sum(t.double().sum() for t in (*G.parameters(), *G.buffers())))
        if self._scores is None or self._scores[0] != fingerprint:
            self._scores = (fingerprint, self.scores(x))
        return self._scores[1], (y != self.normal_class).numpy().astype(np.int64)

    def evaluate(self, data: object) -> dict[str, float]:
        """On the test split (normal class = negative, other classes = positive): AUROC and average precision."""
        from sklearn.metrics import average_precision_score

        s, anomalous = self.test_scores()
        ap = average_precision_score(anomalous, s.astype(np.float64))
        return {"auroc": auroc(s, anomalous), "average_precision": float(ap)}

    def figures(self, out_dir: Path, data: object) -> list[Path]:
        """Score histograms (normal vs anomalous), the ROC curve, reconstructions of normal and anomalous images."""
        from sklearn.metrics import roc_curve

        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        s, anomalous = self.test_scores()
        what = f"{self.cfg.ganomaly.score} score"
        paths = []

        fig, ax = plt.subplots(figsize=(7, 4))
        hi = np.percentile(s, 99.5) if np.isfinite(s).all() else 1.0  # a few outliers must not squash the bulk
        bins = np.linspace(float(s.min()), max(float(hi), float(s.min()) + 1e-12), 60)
        for flag, name in ((0, f"normal (digit {self.normal_class})"), (1, "anomalous (other digits)")):
            ax.hist(np.clip(s[anomalous == flag], bins[0], bins[-1]), bins=bins, density=True, alpha=0.55, label=name)
        ax.set_xlabel(f"anomaly {what} (clipped at the 99.5th percentile)")
        ax.set_ylabel("density")
        ax.set_title(f"test-set anomaly scores, {len(s)} images")
        ax.legend()
        paths.append(save_figure(fig, out_dir / "ganomaly_score_hist.png"))

        fpr, tpr, _ = roc_curve(anomalous, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, label=f"AUROC {auroc(s, anomalous):.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set_xlabel("false positive rate (normal flagged)")
        ax.set_ylabel("true positive rate (anomalies caught)")
        ax.set_title(f"ROC, normal digit {self.normal_class}, {what}")
        ax.legend(loc="lower right")
        paths.append(save_figure(fig, out_dir / "ganomaly_roc.png"))

        # 8 normal and 8 anomalous test images (top) and their reconstructions (bottom)
        x, _ = self.test_split()
        pick = torch.cat([torch.from_numpy(np.flatnonzero(anomalous == f)[:8]) for f in (0, 1)])
        rec = self.to_uint8(self.reconstruct(x[pick])[0]).cpu()
        paths.append(titled_rows([(x[pick], "test images: normal | anomalous"), (rec, "reconstructions")],
                                 out_dir / "ganomaly_reconstructions.png", figsize=(10, 2.1)))
        return paths
