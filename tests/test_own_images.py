"""README "Your own images", followed end to end: a generated folder of non-square images (one sub-folder per class)
-> train with configs/folder.yaml at 32 and 64 pixels -> the runs table -> generate -> eval."""

import os
import sys

import numpy as np
import helpers
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from gancore.train import state as ckpt
from conftest import ROOT, needs_mnist

pytestmark = needs_mnist  # the quick CPU check's extractor (lenet_mnist) is trained on MNIST when missing

N_PER_CLASS = 24


def _photos(d):
    """Two classes of 40x56 (height x width) colour images: a bright disc on a dark background at a random place,
    red for cats and blue for dogs; a few saved as JPEG."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :56]
    for k, (name, colour) in enumerate([("cats", (230, 40, 40)), ("dogs", (40, 40, 230))]):
        (d / name).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            cy, cx = rng.integers(10, 30), rng.integers(10, 46)
            img = np.full((40, 56, 3), 20, np.uint8)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = colour
            Image.fromarray(img).save(d / name / f"{i:03d}.{'jpg' if i % 6 == 0 else 'png'}")


def _run(args, cwd, env):
    p = helpers.run([sys.executable, *map(str, args)], cwd=cwd, env=env, timeout=600, what=" ".join(map(str, args)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.parametrize("size", [32, 64])
def test_your_own_images_end_to_end(tmp_path, size, monkeypatch):
    photos = tmp_path / "photos"
    _photos(photos)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "COLUMNS": "80", "MPLBACKEND": "Agg"}
    n_real = 2 * N_PER_CLASS

    # 1. train (the README's command, shortened: 4 steps, the quick CPU check's extractor)
    p = _run([ROOT / "jobs" / "train.py", "--config", ROOT / "configs" / "folder.yaml", "data.path=photos",
              f"data.image_size={size}", "train.max_steps=4", "optim.batch_size=16", "train.progress=false",
              "eval.n_samples=64", "eval.extractor=lenet_mnist"], tmp_path, env)
    assert "done: 4 steps" in p.stdout and "fid_lenet_64 = " in p.stdout and "kid_lenet_64 = " in p.stdout
    assert f"64 generated images against only {n_real} real ones" in p.stderr  # the one-line notice
    (run_dir,) = sorted((tmp_path / "runs").glob("folder-photos-*"))  # named after the data
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["image_shape"] == [3, size, size] and state["num_classes"] == 2  # two class sub-folders
    assert state["config"]["data"]["resize"] == "center_crop"
    grid = Image.open(run_dir / "real_samples.png")  # all 48 real images (a 64-image grid asked): 7x7, 2-px padding
    assert grid.size == (7 * (size + 2) + 2,) * 2
    # centre crop keeps every disc's colour: the real grid holds red and blue, never stretched ovals cut off
    px = np.asarray(grid.convert("RGB")).reshape(-1, 3)
    assert ((px[:, 0] > 200) & (px[:, 2] < 80)).any() and ((px[:, 2] > 200) & (px[:, 0] < 80)).any()

    # 2. the runs table: readable at 80 columns, the budget that was trained
    p = _run([ROOT / "jobs" / "runs.py"], tmp_path, env)
    lines = p.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in p.stdout, p.stdout
    (row,) = [line for line in lines if "folder-photos" in line]
    assert "FINISHED" in row and "4 steps" in row

    # 3. generate
    _run([ROOT / "jobs" / "generate.py", run_dir, "-n", "8", "--out", tmp_path / "samples"], tmp_path, env)
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) == 8 and Image.open(pngs[0]).size == (size, size) and Image.open(pngs[0]).mode == "RGB"

    # 4. eval: against the real images, logged into the run
    p = _run([ROOT / "jobs" / "eval.py", run_dir, "-n", str(n_real)], tmp_path, env)
    key = f"fid_lenet_{n_real}"
    assert key in p.stdout
    run = MlflowClient(uri).get_run(state["run_id"])
    assert run.info.run_name == "folder-photos"
    from recompute import checkpoint_eval

    monkeypatch.chdir(tmp_path)  # data.path=photos is relative to where the commands ran
    want = checkpoint_eval(ckpt.checkpoint_file(run_dir), n_real)[key]  # measured again here, without eval's cache
    assert run.data.metrics[key] == pytest.approx(want, rel=1e-6)
