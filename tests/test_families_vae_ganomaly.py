"""The VAE and GANomaly families: shapes, one step, KL, AUROC, loss falls, exact resume, tiny end-to-end runs."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gancore.train import state as ckpt
from gancore.errors import ConfigError
from gancore.experiments.anomaly_table import anomaly_table
from gancore.families.base import StepContext
from gancore.families.ganomaly import GANomaly, auroc
from gancore.families.vae import VAE, kl_divergence
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, state_diffs, tiny
from recompute import ganomaly_metrics_by_sklearn, first_test_images

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.torch_threads

# small GANomaly networks so a CPU step takes milliseconds; the preset's 64/128/256 convs are shape-tested below
SMALL_GANOMALY = ("model.ngf=8", "model.ndf=8", "model.nz=16", "ganomaly.test_subset=200")
CONFIGS = {
    "vae": lambda *o: tiny("vae.test_subset=200", *o, config="configs/mnist_vae.yaml"),
    "ganomaly": lambda *o: tiny(*SMALL_GANOMALY, *o, config="configs/mnist_ganomaly.yaml"),
    "ganomaly_image_d": lambda *o: tiny(*SMALL_GANOMALY, "ganomaly.disc=image", "ganomaly.score=recon", *o,
                                        config="configs/mnist_ganomaly.yaml"),
}


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(before, net) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def _one_step(family, phase, batch, ctx=None):
    opt = family.optimizers[phase.optimizer]
    loss, stats = phase.loss(batch, StepContext() if ctx is None else ctx)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# VAE


def test_vae_shapes_and_one_step():
    cfg = tiny(config="configs/mnist_vae.yaml")
    torch.manual_seed(0)
    fam = VAE(cfg, (1, 28, 28), 10)
    enc, dec = fam.networks["encoder"], fam.networks["decoder"]
    assert fam.generator_name == "decoder" and [p.name for p in fam.phases] == ["ELBO"]
    x_u8 = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    batch = fam.prepare(x_u8, None)
    assert torch.equal(batch.x, x_u8.double().div(255).float())  # pixels in [0, 1]
    assert torch.equal(fam.to_uint8(batch.x), x_u8)  # [0, 1] round trip
    mu, logvar = enc(batch.x)
    assert mu.shape == logvar.shape == (5, 2)
    out = dec(mu)
    assert out.shape == (5, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert fam.sample(7).shape == (7, 1, 28, 28)
    be, bd = _params(enc), _params(dec)
    torch.manual_seed(1)  # the step's eps, drawn again here for the by-hand terms (before the step moves the weights)
    with torch.no_grad():
        mu, logvar = enc(batch.x)
        x_hat = dec(mu + torch.exp(logvar / 2) * torch.randn_like(mu))
        recon_ref = ((x_hat - batch.x) ** 2).sum(dim=(1, 2, 3)).mean()
        kl_ref = (0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).sum(dim=1)).mean()
    torch.manual_seed(1)
    loss, stats = _one_step(fam, fam.phases[0], batch)
    assert set(stats) == {"Loss/total", "Loss/recon", "Loss/kl"} and all(v.ndim == 0 for v in stats.values())
    assert stats["Loss/total"] == pytest.approx(float(stats["Loss/recon"] + stats["Loss/kl"]), rel=1e-6)  # beta 1
    assert stats["Loss/recon"].item() == pytest.approx(recon_ref.item(), rel=1e-5)
    assert stats["Loss/kl"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert _changed(be, enc) and _changed(bd, dec)  # one Adam over both networks


def test_kl_matches_closed_form():
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])
    # 0.5 * sum(sigma^2 + mu^2 - 1 - log sigma^2): (1 + 1 - 1 - 0) + (4 + 4 - 1 - log 4)
    expected = 0.5 * ((1 + 1 - 1 - 0) + (4 + 4 - 1 - math.log(4.0)))
    kl = kl_divergence(mu, logvar)
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(expected, rel=1e-6)
    assert kl[1].item() == 0.0  # the prior itself
    q = torch.distributions.Normal(mu[0], (0.5 * logvar[0]).exp())
    p = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    assert kl[0].item() == pytest.approx(torch.distributions.kl_divergence(q, p).sum().item(), rel=1e-6)


def test_vae_beta_weights_kl():
    torch.manual_seed(0)
    fam = VAE(tiny("vae.beta=4", config="configs/mnist_vae.yaml"), (1, 28, 28), 10)
    batch = fam.prepare(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), None)
    loss, s = fam.loss(batch, StepContext())
    assert loss.item() == pytest.approx((s["Loss/recon"] + 4 * s["Loss/kl"]).item(), rel=1e-6)


@needs_mnist
def test_vae_loss_falls_on_real_mnist():
    from gancore.data import DeviceLoader, load_images

    cfg = tiny("data.subset=1024", "optim.batch_size=128", config="configs/mnist_vae.yaml")
    torch.manual_seed(0)
    x, y = load_images(cfg.data)
    fam = VAE(cfg, tuple(x.shape[1:]), 10)
    loader = DeviceLoader(x, y, 128, seed=0, device=torch.device("cpu"))
    losses = []
    for _ in range(64):  # 8 epochs of 8 batches
        _, stats = _one_step(fam, fam.phases[0], fam.prepare(*loader.next()))
        losses.append(stats["Loss/total"].item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, (first, last)  # per image: ~140 -> ~55 (summed squared error + KL)


# ----------------------------------------------------------------------------------------------------------------
# GANomaly


@pytest.mark.parametrize("disc", ["latent", "image"])
def test_ganomaly_shapes_and_one_step(disc):
    torch.manual_seed(0)
    # the preset's networks (convs 64/128/256, nz 100) at 32x32
    fam = GANomaly(tiny(f"ganomaly.disc={disc}", config="configs/mnist_ganomaly.yaml"), (1, 32, 32), 10)
    G, D = fam.networks["G"], fam.networks["D"]
    assert [p.name for p in fam.phases] == ["G", "D"] and not fam.phases[1].fresh_batch
    convs = [m.out_channels for m in G.encoder1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 256, 100]
    batch = fam.prepare(torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8), None)
    x_hat, z, z_hat = G(batch.x)
    assert x_hat.shape == (6, 1, 32, 32) and z.shape == z_hat.shape == (6, 100)
    assert x_hat.abs().max() <= 1  # tanh
    assert D(z if disc == "latent" else batch.x).shape == (6, 1)
    bg, bd = _params(G), _params(D)
    ctx = StepContext()  # what the two phases share
    _, gs = _one_step(fam, fam.phases[0], batch, ctx)
    assert {"Loss/G", "Loss/adv", "Loss/con", "Loss/enc"} <= set(gs)
    w = fam.cfg.ganomaly
    assert gs["Loss/G"].item() == pytest.approx(
        (w.w_adv * gs["Loss/adv"] + w.w_con * gs["Loss/con"] + w.w_enc * gs["Loss/enc"]).item(), rel=1e-5)
    assert _changed(bg, G) and not _changed(bd, D)
    x, x_hat, z = ctx.take("recon")
    ctx.put("recon", (x, x_hat, z))  # left for the D phase, as the G phase left it
    D0 = copy.deepcopy(D)  # D before its step, for the by-hand loss
    torch.manual_seed(2)  # the latent D's prior draws, drawn again below
    _, ds = _one_step(fam, fam.phases[1], batch, ctx)  # reuses the G phase's batch and reconstructions
    torch.manual_seed(2)
    real, fake = (x, x_hat) if disc == "image" else (torch.randn_like(z), z)
    with torch.no_grad():  # BCE by hand: target s (label smoothing) on reals, 0 on fakes
        lr, lf = D0(real), D0(fake)
    s = fam.cfg.loss.label_smoothing
    want = (s * F.softplus(-lr) + (1 - s) * F.softplus(lr)).mean() + F.softplus(lf).mean()
    assert ds["Loss/D"].item() == pytest.approx(want.item(), rel=1e-5)
    assert _changed(bd, D)
    with pytest.raises(RuntimeError, match="after its G phase"):
        fam.phases[1].loss(batch, StepContext())


def test_ganomaly_needs_a_normal_class_and_power_of_two_size():
    with pytest.raises(ConfigError, match="data.normal_class"):
        GANomaly(tiny("data.normal_class=-1", config="configs/mnist_ganomaly.yaml"), (1, 32, 32), 10)
    with pytest.raises(ConfigError, match="data.image_size=32"):
        GANomaly(tiny(config="configs/mnist_ganomaly.yaml"), (1, 28, 28), 10)


def test_auroc_separable_identical_and_ties():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50), np.ones(70)]
    assert auroc(np.r_[rng.uniform(0, 1, 50), rng.uniform(2, 3, 70)], labels) == 1.0
    assert auroc(np.r_[rng.uniform(2, 3, 50), rng.uniform(0, 1, 70)], labels) == 0.0
    assert auroc(np.ones(120), labels) == 0.5  # all tied: chance
    same = rng.normal(size=20000)  # both classes from one distribution
    assert auroc(same, rng.integers(0, 2, 20000)) == pytest.approx(0.5, abs=0.015)
    from sklearn.metrics import roc_auc_score

    for seed in range(5):
        r = np.random.default_rng(seed)
        s = r.integers(0, 8, 300).astype(float)  # heavy ties
        y = r.integers(0, 2, 300)
        s[y == 1] += r.integers(0, 3, (y == 1).sum())  # some signal
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------------------------------------
# Through the trainer: end-to-end, resume, generate


FIGURES = {
    "vae": ["vae_reconstructions.png", "vae_latent.png", "vae_manifold.png", "vae_prior_samples.png"],
    "ganomaly": ["ganomaly_score_hist.png", "ganomaly_roc.png", "ganomaly_reconstructions.png"],
}
FIGURES["ganomaly_image_d"] = FIGURES["ganomaly"]
METRICS = {"vae": {"vae_test_elbo", "vae_test_recon", "vae_test_kl"}, "ganomaly": {"auroc", "average_precision"}}
METRICS["ganomaly_image_d"] = METRICS["ganomaly"]


def _vae_metrics_by_hand(checkpoint) -> dict[str, float]:
    """vae_test_*: per test image, pixels in [0, 1], one z = mu + sigma eps draw (eps from the family's fixed seed,
    500 images per draw) -> summed squared error, KL(N(mu, sigma^2) || N(0, I)) summed over latents; means."""
    from gancore.families.vae import EVAL_SEED

    family, cfg, _ = ckpt.load_family(checkpoint)
    enc, dec = family.networks["encoder"], family.networks["decoder"]
    x_all, _ = first_test_images(cfg, cfg.vae.test_subset)
    g = torch.Generator().manual_seed(EVAL_SEED)
    recon, kl = [], []
    with torch.no_grad():
        for x in (x_all.double() / 255).float().split(500):
            mu, logvar = enc(x)
            z = mu + torch.exp(logvar / 2) * torch.randn(mu.shape, generator=g)
            recon.append(((dec(z) - x) ** 2).sum(dim=(1, 2, 3)))
            kl.append(0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).sum(dim=1))
    recon, kl = torch.cat(recon).double().mean().item(), torch.cat(kl).double().mean().item()
    return {"vae_test_recon": recon, "vae_test_kl": kl, "vae_test_elbo": -(recon + kl)}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """One uninterrupted 3-epoch run per family (12 steps), shared by the end-to-end and resume tests."""
    root = tmp_path_factory.mktemp("full")
    return {k: fit(make("train.epochs=3"), out=root / k) for k, make in CONFIGS.items()}


@needs_mnist
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_run_figures_and_metrics(full_runs, name):
    r = full_runs[name]
    assert r.status == "finished" and r.step == r.total_steps == 12
    for f in FIGURES[name]:
        assert (r.run_dir / "figures" / f).is_file(), f
    assert set(r.metrics) == METRICS[name]
    # the metrics recomputed here from the final checkpoint: by hand (VAE) and by scikit-learn on scores written
    # out here (GANomaly), not through the families' evaluate()
    expected = (_vae_metrics_by_hand if name == "vae" else ganomaly_metrics_by_sklearn)(r.checkpoint)
    assert r.metrics == pytest.approx(expected, rel=1e-5, abs=1e-6), (r.metrics, expected)
    for rel in ["snapshots/epoch_003.png", "plots/loss_all.png", "samples/step_00000012.png"]:
        assert (r.run_dir / rel).is_file(), rel


@needs_mnist
@pytest.mark.parametrize("name", ["vae", "ganomaly"])
def test_resume_is_bit_identical(full_runs, tmp_path, name):
    cfg = CONFIGS[name]("train.epochs=3")
    full = full_runs[name]
    part = fit(cfg, out=tmp_path / "part", stop_after=5)  # mid-epoch (4 steps per epoch)
    assert part.status == "stopped" and part.step == 5
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")
    assert resumed.status == "finished" and resumed.step == full.step
    a, b = ckpt.load(full.checkpoint), ckpt.load(resumed.checkpoint)
    for key in ("networks", "optimizers", "loader", "history", "step"):
        assert state_diffs(a[key], b[key]) == [], key
    assert resumed.metrics == full.metrics


@needs_mnist
@pytest.mark.parametrize("name", ["vae", "ganomaly"])
def test_generate_from_checkpoint(full_runs, tmp_path, name):
    from gancore.generate import generate  # what jobs/generate.py calls

    out = generate(full_runs[name].run_dir, 12, tmp_path / "s.npz", batch_size=5)
    z = np.load(out)
    side = 28 if name == "vae" else 32
    assert z["x"].shape == (12, 1, side, side) and z["x"].dtype == np.uint8
    if name == "ganomaly":  # reconstructions of real test images: their digits come along
        assert "y" in z and z["y"].shape == (12,)


@needs_mnist
def test_anomaly_table_two_digits(tmp_path):
    rows, out, complete = anomaly_table(ROOT / "configs/mnist_ganomaly.yaml", digits=[0, 1],
                                        overrides=[*SMALL_GANOMALY, "data.subset=64", "optim.batch_size=32",
                                                   "train.epochs=1", "train.progress=false", "track.enabled=false",
                                                   "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,1]]"],
                                        out=tmp_path / "table")
    assert complete and [r["normal_digit"] for r in rows] == [0, 1]
    from gancore.train.rundir import checkpoint_file

    for r in rows:  # each digit's AUROC / AP recomputed by scikit-learn from that digit's final checkpoint
        want = ganomaly_metrics_by_sklearn(checkpoint_file(r["run_dir"]))
        assert (r["auroc"], r["average_precision"]) == pytest.approx((want["auroc"], want["average_precision"]))
    lines = (out / "table.csv").read_text().splitlines()
    assert lines[0].startswith("normal_digit,auroc,average_precision") and len(lines) == 3
    assert [float(v) for v in lines[1].split(",")[1:3]] == pytest.approx([rows[0]["auroc"], rows[0]["average_precision"]])
    md = (out / "table.md").read_text()
    assert "| mean |" in md and (out / "digit_1" / "figures" / "ganomaly_roc.png").is_file()


@needs_mnist
def test_ganomaly_auroc_floor_on_a_trained_model(tmp_path):
    """100 steps on the normal digit 1, scored by reconstruction error, reach AUROC 0.94-0.98 on 1,000 test images
    (seeds 0-2, measured); after one step the same model scores 0.0, so a model that does not learn (or a score that
    does not rank) fails the 0.9 floor. (The latent score is noisier at this budget: 0.76-0.91.)"""
    cfg = tiny("model.ngf=16", "model.ndf=16", "model.nz=32", "data.normal_class=1", "data.subset=2048",
               "optim.batch_size=32", "train.max_steps=100", "ganomaly.test_subset=1000", "ganomaly.score=recon",
               config="configs/mnist_ganomaly.yaml")
    m = fit(cfg, out=tmp_path / "run").metrics
    assert m["auroc"] > 0.9 and m["average_precision"] > 0.95, m
