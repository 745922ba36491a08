"""train/state.py: the checkpoint file as a format (a torn or truncated file, a sampling-only export and what it
refuses). Resume as behaviour is in test_train.py (bit-identical), test_faults.py (kill -9, failed writes, torn
newest) and test_resume_auto.py; which file a run directory means is in test_rundir.py."""

import sys

import helpers
import numpy as np
import pytest

from gancore.errors import CheckpointError
from gancore.train import state as ckpt
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, tiny

pytestmark = needs_mnist


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    fit(tiny(), out=tmp_path / "r", stop_after=2)
    p = tmp_path / "r/checkpoints/step_00000002.pt"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(tiny(), out=tmp_path / "r", resume="auto")


def test_sampling_only_checkpoint_samples_the_same_and_cannot_be_resumed(tmp_path):
    """jobs/slim.py: generator + EMA only (a fraction of the size), the same images as the full checkpoint, a clear
    refusal to resume from it, and bad input that writes nothing."""
    from gancore.generate import generate

    r = fit(tiny("train.ema_decay=0.9"), out=tmp_path / "r")
    full = ckpt.latest(r.run_dir)
    slim = tmp_path / "slim.pt"
    cmd = [sys.executable, str(ROOT / "jobs" / "slim.py")]
    p = helpers.run([*cmd, str(r.run_dir), str(slim)], timeout=120, what="export of a sampling-only generator")
    assert p.returncode == 0, p.stderr
    s = ckpt.load(slim)
    assert s["sampling_only"] and set(s["networks"]) == {"G"} and "optimizers" not in s and s["ema"] is not None
    assert s["step"] == ckpt.load(full)["step"] and slim.stat().st_size < full.stat().st_size / 2
    a = np.load(generate(str(full), 20, tmp_path / "a.npz", seed=3, device="cpu"))["x"]
    b = np.load(generate(str(slim), 20, tmp_path / "b.npz", seed=3, device="cpu"))["x"]
    np.testing.assert_array_equal(a, b)  # the EMA generator, bit for bit
    with pytest.raises(CheckpointError, match="sampling-only checkpoint .* cannot be resumed"):
        fit(tiny("train.ema_decay=0.9"), out=tmp_path / "r2", resume=str(slim))
    before = slim.read_bytes()
    for args, msg in [([str(r.run_dir), str(slim)], "already exists"),
                      ([str(r.run_dir), str(tmp_path / "a.npz" / "x.pt")], "is a file, not a folder"),
                      ([str(tmp_path / "a.npz"), str(tmp_path / "c.pt")], "not a gancore checkpoint")]:
        p = helpers.run([*cmd, *args], timeout=120, what=" ".join(args))
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert slim.read_bytes() == before and not (tmp_path / "c.pt").exists()
