"""Numbers with their scale: a degenerate IS (at its floor of 1.0) is flagged in the end-of-run block."""

import sys

import helpers

from gancore.metrics import degenerate
from conftest import ROOT, needs_mnist


def test_degenerate_is_rule():
    assert degenerate("is_lenet_1k", 1.0) and degenerate("is_inception_10k", 1.04)
    assert degenerate("is_lenet_1k", 3.83) is None  # the quickstart after 200 steps
    assert degenerate("fid_lenet_1k", 1.0) is None and degenerate("kid_lenet_1k", 0.5) is None  # only IS has a floor
    assert "degenerate: IS 1 is at its floor 1.0" in degenerate("is_lenet_1k", 1.0)


@needs_mnist
def test_end_of_run_block_flags_an_is_at_its_floor(tmp_path):
    """A generator that has not learnt (one step at a learning rate of 1e-12: the DCGAN init's near-uniform grey
    images) gets the same class mix for every image from the classifier: IS ~1.0, flagged on its line."""
    p = helpers.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                     "data.subset=64", "optim.batch_size=32", "train.max_steps=1", "optim.lr_g=1e-12",
                     "train.progress=false", "track.enabled=false", "eval.every=0", "eval.n_samples=500",
                     "eval.metrics=[fid,is]", "--out", str(tmp_path / "r")], timeout=300,
                    what="train.py with FID and IS on 500 samples")
    assert p.returncode == 0, p.stderr
    (line,) = [x for x in p.stdout.splitlines() if x.strip().startswith("is_lenet_500 = ")]
    value = float(line.split("=")[1].split()[0])
    assert value < 1.05 and "<- degenerate: IS" in line and "look at the sample grids" in line, p.stdout
    (fid,) = [x for x in p.stdout.splitlines() if x.strip().startswith("fid_lenet_500 = ")]
    assert "degenerate" not in fid
    assert "compare a value only with the same key" in p.stdout
