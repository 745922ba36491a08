"""A run directory's layout has one owner (gancore/train/rundir.py RunDir): names built and read back there."""

from __future__ import annotations

import pytest
import torch

from gancore.errors import CheckpointError
from gancore.train.rundir import RunDir, checkpoint_file


def test_step_names_and_their_step_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    p = run.step_path(40)
    assert p == tmp_path / "r" / "checkpoints" / "step_00000040.pt"
    assert RunDir.step_of(p) == 40 and RunDir.step_of(run.step_path(123456789)) == 123456789
    assert RunDir.step_of(run.best) is None and RunDir.step_of(tmp_path / "step_7.pt.corrupt") is None
    assert RunDir.of_checkpoint(p) == run and RunDir.of_checkpoint(tmp_path / "x.pt") is None
    assert run.snapshot_weights("G", 3).name == "G_epoch_003.pt" and run.sample_grid(5).name == "step_00000005.png"


def _write(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 0}, path)
    return path


def test_which_checkpoint_a_run_dir_means(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.latest() is None and run.meant() is None
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        checkpoint_file(_write(tmp_path / "r" / "config.pt").parent)
    for step in (10, 2, 30):  # by step, not by name order
        _write(run.step_path(step))
    assert run.step_checkpoints() == [run.step_path(s) for s in (2, 10, 30)]
    assert run.latest() == run.meant() == checkpoint_file(run.path) == run.step_path(30)
    _write(run.best)  # best.pt when present: what eval, generate and slim read; a resume still takes the latest
    assert run.meant() == checkpoint_file(run.path) == run.best and run.latest() == run.step_path(30)
    run.prune(2)
    assert run.step_checkpoints() == [run.step_path(10), run.step_path(30)] and run.best.is_file()


def test_save_snapshot_is_atomic_and_loads(tmp_path):
    run = RunDir(tmp_path / "r")
    path = run.save_snapshot("G", 1, {"w": torch.ones(2)})
    assert path == run.snapshots_dir / "G_epoch_001.pt" and list(run.snapshots_dir.iterdir()) == [path]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
