"""End-to-end: a tiny run's artifacts, bit-identical resume, NaN stop, generate to png/npz/h5."""

import os
import sys

import h5py
import numpy as np
import helpers
import pytest
import torch

from gancore.train import state as ckpt
from gancore.errors import CheckpointError, NonFiniteLossError
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, state_diffs, tiny

pytestmark = needs_mnist


def test_tiny_run_writes_every_artifact(tmp_path):
    r = fit(tiny(), out=tmp_path / "run")
    d = r.run_dir
    assert r.status == "finished" and r.step == r.total_steps == 8  # 128 images / 32 per batch * 2 epochs
    for rel in ["config.yaml", "real_samples.png", "loss_report.json", "loss_report.md",
                "plots/loss_all.png", "plots/loss_epochs_1-1.png", "plots/loss_epochs_2-2.png",
                "snapshots/epoch_001.png", "snapshots/epoch_002.png", "snapshots/G_epoch_001.pt",
                "snapshots/G_epoch_002.pt", "samples/step_00000004.png", "samples/step_00000008.png",
                "checkpoints/step_00000008.pt"]:
        assert (d / rel).is_file(), rel
    import json

    report = json.loads((d / "loss_report.json").read_text())
    assert set(report) == {"1-1", "2-2", "1-2"}
    assert {"Loss/D", "Loss/G", "D/real", "D/fake", "D/acc"} <= set(report["1-2"])
    # the mean over epochs 1-2 is the mean of the two per-epoch means
    assert report["1-2"]["Loss/D"] == pytest.approx((report["1-1"]["Loss/D"] + report["2-2"]["Loss/D"]) / 2)
    G = torch.load(d / "snapshots/G_epoch_002.pt", weights_only=True)
    state = ckpt.load(d / "checkpoints/step_00000008.pt")
    assert all(torch.equal(G[k], state["networks"]["G"][k]) for k in G)
    from PIL import Image

    assert Image.open(d / "snapshots/epoch_002.png").size == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 grid of 28px + 2px pad


@pytest.mark.parametrize("over,stop", [([], 3), (["optim.d_iters=2", "loss.name=wgan_gp", "model.batchnorm=g", "train.ema_decay=0.9"], 2)],
                         ids=["dcgan", "wgan_gp-d_iters2-ema"])
def test_resume_is_bit_identical(tmp_path, over, stop):
    cfg = tiny("train.epochs=3", *over)
    full = fit(cfg, out=tmp_path / "full")
    part = fit(cfg, out=tmp_path / "part", stop_after=stop)
    assert part.status == "stopped" and part.step == stop
    assert ckpt.latest(tmp_path / "part").name == f"step_{stop:08d}.pt"
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")
    assert resumed.status == "finished" and resumed.step == full.step
    a, b = ckpt.load(full.checkpoint), ckpt.load(resumed.checkpoint)
    for key in ("networks", "optimizers", "ema", "loader", "history", "step"):
        assert state_diffs(a[key], b[key]) == [], key
    # the loss history across the interruption equals the uninterrupted one, value for value
    assert a["history"]["Loss/D"] == b["history"]["Loss/D"]


def test_resume_rejects_other_hyperparameters(tmp_path):
    fit(tiny(), out=tmp_path / "r", stop_after=2)
    with pytest.raises(CheckpointError, match="optim.lr_g: 0.0002 -> 0.1"):
        fit(tiny("optim.lr_g=0.1"), out=tmp_path / "r", resume="auto")


def test_existing_run_dir_is_not_overwritten(tmp_path):
    fit(tiny(), out=tmp_path / "r", stop_after=2)
    before = (tmp_path / "r/checkpoints/step_00000002.pt").read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume auto"):
        fit(tiny(), out=tmp_path / "r")
    assert (tmp_path / "r/checkpoints/step_00000002.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from gancore.families.gan import GAN

    calls = {"n": 0}
    orig = GAN.g_loss

    def poisoned(self, batch, step):
        calls["n"] += 1
        loss, stats = orig(self, batch, step)
        if calls["n"] >= 5:  # step 5 goes bad
            loss = loss * float("nan")
            stats = {**stats, "Loss/G": loss.detach()}
        return loss, stats

    monkeypatch.setattr(GAN, "g_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite Loss/G at step 5; the last good checkpoint is .*step_00000004.pt"):
        fit(tiny("train.checkpoint_every=2"), out=tmp_path / "r")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_00000002.pt", "step_00000004.pt"]
    good = ckpt.load(tmp_path / "r/checkpoints/step_00000004.pt")
    # the last good checkpoint is the one an unpoisoned run writes at step 4, tensor for tensor
    monkeypatch.setattr(GAN, "g_loss", orig)
    ref = ckpt.load(fit(tiny("train.checkpoint_every=2"), out=tmp_path / "ref", stop_after=4).checkpoint)
    for key in ("networks", "optimizers", "loader", "step"):
        assert state_diffs(good[key], ref[key]) == [], key



def test_generate_png_npz_h5(tmp_path):
    r = fit(tiny("model.conditional=true"), out=tmp_path / "r")
    gen = [sys.executable, str(ROOT / "jobs" / "generate.py"), str(r.run_dir)]
    for out in ("imgs", "s.npz", "s.h5"):
        p = helpers.run([*gen, "-n", "12", "--out", str(tmp_path / out)], timeout=120, what="generate.py " + out)
        assert p.returncode == 0, p.stderr
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    assert len(pngs) == 12
    z = np.load(tmp_path / "s.npz")
    assert z["x"].shape == (12, 1, 28, 28) and z["x"].dtype == np.uint8
    assert z["y"].tolist() == [i % 10 for i in range(12)]
    with h5py.File(tmp_path / "s.h5") as f:
        x = f["images"][:]
        assert x.shape == (12, 1, 28, 28) and f.attrs["family"] == "gan"
    np.testing.assert_array_equal(x, z["x"])  # same seed -> same images whatever the format
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(pngs[3])), z["x"][3, 0])
    # the images are G(z, y) of the final checkpoint's weights, z the first 12 N(0, 1) draws of seed 0, y = i % 10
    from gancore.registry import MODELS

    cfg = tiny("model.conditional=true")
    G = MODELS[cfg.model.arch](cfg.model, (1, 28, 28), 10)["G"]
    G.load_state_dict(ckpt.load(r.checkpoint)["networks"]["G"])
    with torch.no_grad():
        out = G.eval()(torch.randn(12, cfg.model.nz, generator=torch.Generator().manual_seed(0)),
                       torch.arange(12) % 10)
    want = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().astype(int)
    diff = np.abs(want - z["x"].astype(int))  # another process: a last-bit difference may round one pixel apart
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())



def test_train_cli_stop_and_resume(tmp_path):
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "data.subset=64", "optim.batch_size=32", "train.epochs=2", "train.progress=false", "track.enabled=false",
           "eval.n_samples=0", "eval.every=0", "--out", str(tmp_path / "r")]
    p = helpers.run([*cmd, "--stop-after", "1"], timeout=300, what="train.py --stop-after 1")
    assert p.returncode == 75, p.stderr
    assert "continue with --out" in p.stdout
    p = helpers.run([*cmd, "--resume", "auto"], timeout=300, what="train.py --resume auto")
    assert p.returncode == 0, p.stderr
    assert "done: 4 steps" in p.stdout


def test_train_cli_nan_loss_exits_3_with_one_line(tmp_path):
    """A real NaN from the config (D's learning rate 1e30 blows D up in its first update), through the CLI."""
    from gancore.errors import EXIT_NON_FINITE

    p = helpers.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                     str(ROOT / "configs" / "quickstart.yaml"), "data.subset=64", "optim.batch_size=32",
                     "train.epochs=2", "train.progress=false", "track.enabled=false", "optim.lr_d=1e30", "eval.n_samples=0", "eval.every=0",
                     "--out", str(tmp_path / "r")], timeout=200, what="a run with lr_d=1e30")
    assert p.returncode == EXIT_NON_FINITE == 3, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "lower the learning rate" in err[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() or ckpt.latest(tmp_path / "r") is None  # nothing bad saved


def test_cli_stop_and_resume_with_the_presets_evaluation_is_bit_identical(tmp_path):
    """The quickstart's own sample-quality evaluation on (LeNet FID/KID/IS every 20 steps), stopped twice and resumed
    in fresh processes: the final state equals an uninterrupted run's, tensor for tensor. Each resumed process builds
    its extractor at a different step than the uninterrupted one, so this fails if an evaluation (or a lazily built
    network) draws from the training's random streams."""
    over = ["data.subset=1280", "train.max_steps=60", "train.checkpoint_every=20", "eval.every=20",
            "eval.n_samples=200", "train.progress=false", "track.enabled=false"]
    base = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"), *over]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = helpers.run([*base, "--out", str(tmp_path / "full")], timeout=240, env=env, what="the uninterrupted run")
    assert p.returncode == 0, p.stdout + p.stderr
    for stop in (30, 45):
        p = helpers.run([*base, "--out", str(tmp_path / "part"), "--resume", "auto", "--stop-after", str(stop)],
                        timeout=240, env=env, what=f"the run stopped after step {stop}")
        assert p.returncode == 75, p.stdout + p.stderr
        assert ckpt.latest(tmp_path / "part").name == f"step_{stop:08d}.pt"
    p = helpers.run([*base, "--out", str(tmp_path / "part"), "--resume", "auto"], timeout=240, env=env,
                    what="the resumed run")
    assert p.returncode == 0, p.stdout + p.stderr
    a = ckpt.load(tmp_path / "full" / "checkpoints" / "step_00000060.pt")
    b = ckpt.load(tmp_path / "part" / "checkpoints" / "step_00000060.pt")
    for key in ("networks", "optimizers", "rng", "loader", "history", "best"):
        assert state_diffs(a[key], b[key]) == [], key
