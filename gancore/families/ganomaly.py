"""GANomaly-style anomaly detection: train on one "normal" class, score test images, report AUROC.

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

import csv
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gancore.config import Config
from gancore.errors import ConfigError
from gancore.families.base import Batch, Family, Phase, Stats
from gancore.families.vae import bare, eval_mode, load_test_split, save_figure
from gancore.losses import AdversarialLoss, make_loss
from gancore.registry import FAMILIES, MODELS

EVAL_BATCH = 500


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def auroc(scores, labels) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula; tied scores get their average rank.

    labels: 1 = positive (anomalous), 0 = negative; a higher score means "more positive". 0.5 = chance.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(labels).astype(bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes (got {n_pos} positives, {n_neg} negatives)")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each group of equal scores
    ranks = (last - (counts - 1) / 2.0)[inverse.ravel()]  # the group's average rank, for every score
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """Average precision of the positive (anomalous) class, scikit-learn's step-wise definition."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)))


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
        f = bare(D)
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
        self._stash: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (x, x_hat, z) for D
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores: tuple[float, np.ndarray] | None = None  # (weights fingerprint, test scores)

    # -- the two phases --------------------------------------------------------------------------------------
    def g_loss(self, batch: Batch):
        x_hat, z, z_hat = self.networks["G"](batch.x)
        adv, stats = self.adversary.g_adv(self.networks["D"], batch.x, x_hat, z)
        con = (batch.x - x_hat).abs().mean()  # contextual: L1 between x and x_hat
        enc = (z - z_hat).pow(2).mean()  # latent: L2 between z and z_hat
        loss = self.w_adv * adv + self.w_con * con + self.w_enc * enc
        self._stash = (batch.x, x_hat.detach(), z.detach())
        return loss, {"Loss/G": loss.detach(), "Loss/adv": adv.detach(), "Loss/con": con.detach(),
                      "Loss/enc": enc.detach(), **stats}

    def d_loss(self, batch: Batch):
        if self._stash is None:
            raise RuntimeError("GANomaly's D phase runs after its G phase (the phases are [G, D])")
        x, x_hat, z = self._stash
        self._stash = None
        return self.adversary.d_loss(self.networks["D"], x, x_hat, z)

    # -- sampling: reconstructions of fixed real test images -------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.test_split()
        idx = torch.randperm(len(x), generator=generator)[torch.arange(n) % len(x)]
        return {"x": x[idx], "y": y[idx]}  # uint8 test images (all classes) and their digits

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        inputs = inputs or self.fixed_inputs(n, generator if generator is not None else torch.Generator().manual_seed(0))
        return self.reconstruct(inputs["x"][:n])[0]

    def reconstruct(self, x_uint8: torch.Tensor):
        """(x_hat, z, z_hat) on the device for uint8 images, in eval mode (BatchNorm running statistics)."""
        G = bare(self.sampler_network())
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
        G = bare(self.sampler_network())
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
        G = bare(self.sampler_network())
        with torch.no_grad():
            fingerprint = float(sum(t.double().sum() for t in (*G.parameters(), *G.buffers())))
        if self._scores is None or self._scores[0] != fingerprint:
            self._scores = (fingerprint, self.scores(x))
        return self._scores[1], (y != self.normal_class).numpy().astype(np.int64)

    def evaluate(self, data: object) -> dict[str, float]:
        """On the test split (normal class = negative, other classes = positive): AUROC and average precision."""
        s, anomalous = self.test_scores()
        return {"auroc": auroc(s, anomalous), "average_precision": average_precision(s, anomalous)}

    def figures(self, out_dir: Path, data: object) -> list[Path]:
        """Score histograms (normal vs anomalous), the ROC curve, reconstructions of normal and anomalous images."""
        from sklearn.metrics import roc_curve

        from gancore import plots

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
        fig, axes = plt.subplots(2, 1, figsize=(10, 2.1))
        for ax, imgs, title in zip(axes, (x[pick], rec), ("test images: normal | anomalous", "reconstructions")):
            ax.imshow(plots.grid(imgs, nrow=len(pick)))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        paths.append(save_figure(fig, out_dir / "ganomaly_reconstructions.png"))
        return paths


# ----------------------------------------------------------------------------------------------------------------
# The per-digit table (jobs/anomaly_table.py)


def anomaly_table(config: str | Path, digits=range(10), overrides: list[str] | tuple[str, ...] = (),
                  out: str | Path | None = None) -> tuple[list[dict], Path, bool]:
    """Train and evaluate one model per normal digit; write table.csv / table.md under `out`.

    Each digit is a run in `out/digit_<d>` (resumed when it holds checkpoints, so a rerun skips finished digits'
    training). Returns (rows, out, complete); `complete` is False when a run was stopped by a signal.
    With tracking on, the table is also a summary MLflow run's metrics and artifacts.
    """
    from gancore.config import load_config
    from gancore.trainer import fit
    from gancore.tracking import make_tracker

    base = load_config(config, [*overrides, "data.normal_class=-1"])
    out = Path(out) if out else Path("runs") / f"{base.name}-table-{datetime.now():%Y%m%d-%H%M%S}"
    rows, complete = [], True
    for d in digits:
        cfg = load_config(config, [*overrides, f"data.normal_class={d}", f"name={base.name}-digit{d}"])
        r = fit(cfg, out=out / f"digit_{d}", resume="auto")
        if r.status != "finished":
            complete = False
            break
        rows.append({"normal_digit": d, "auroc": r.metrics["auroc"], "average_precision": r.metrics["average_precision"],
                     "run_dir": str(r.run_dir), "run_id": r.run_id or ""})
    paths = write_table(rows, out)
    if rows and base.track.enabled:
        tracker = make_tracker(base, True)
        tracker.start(base, out, None, tags={"gancore.kind": "anomaly_table",
                                             "gancore.digits": ",".join(str(r["normal_digit"]) for r in rows)})
        metrics = {f"auroc_digit{r['normal_digit']}": r["auroc"] for r in rows}
        metrics["auroc_mean"] = float(np.mean([r["auroc"] for r in rows]))
        tracker.log_metrics(metrics, 0)
        for p in paths:
            tracker.log_artifact(p, "report")
        tracker.finish("FINISHED" if complete else "KILLED")
    return rows, out, complete


def write_table(rows: list[dict], out: Path) -> list[Path]:
    """table.csv and table.md (per digit, then the mean) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["normal_digit", "auroc", "average_precision", "run_dir", "run_id"]
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| normal digit | AUROC | average precision |", "|---:|---:|---:|"]
    lines += [f"| {r['normal_digit']} | {r['auroc']:.4f} | {r['average_precision']:.4f} |" for r in rows]
    if rows:
        lines.append(f"| mean | {np.mean([r['auroc'] for r in rows]):.4f} | "
                     f"{np.mean([r['average_precision'] for r in rows]):.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return [out / "table.csv", out / "table.md"]


def rich_table(rows: list[dict]):
    """The per-digit table for the terminal."""
    from rich.table import Table

    t = Table(title="GANomaly: AUROC per normal digit (test split; other digits = anomalous)")
    t.add_column("normal digit", justify="right")
    t.add_column("AUROC", justify="right")
    t.add_column("average precision", justify="right")
    for r in rows:
        t.add_row(str(r["normal_digit"]), f"{r['auroc']:.4f}", f"{r['average_precision']:.4f}")
    if rows:
        t.add_section()
        t.add_row("mean", f"{np.mean([r['auroc'] for r in rows]):.4f}",
                  f"{np.mean([r['average_precision'] for r in rows]):.4f}")
    return t
