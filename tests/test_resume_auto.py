"""`--resume auto` says what it does: a new run where it finds no checkpoint (the Slurm first start), a one-line
refusal for a directory that is not a run's (a sweep's, or unrelated files), nothing written there."""

import logging
import sys

import helpers
import pytest

from gancore.errors import CheckpointError
from gancore.train import state as ckpt
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, tiny

pytestmark = needs_mnist


def _listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gancore.train.state")
    out = tmp_path / "runs" / "folder23"  # e.g. a typo for an existing run
    r = fit(tiny("train.epochs=1"), out=out, resume="auto", stop_after=2)
    said = [m for m in caplog.messages if m.startswith("--resume auto")]
    assert said == [f"--resume auto: {out} does not exist yet; starting a new run there (from step 0)"]
    assert r.status == "stopped" and r.step == 2
    caplog.clear()
    r = fit(tiny("train.epochs=1"), out=out, resume="auto")  # the requeued job: continues, silently
    assert r.status == "finished" and r.steps_run == r.total_steps - 2 == 2
    assert not [m for m in caplog.messages if m.startswith("--resume auto")]


@pytest.mark.parametrize("left", [[], ["tracking_run.json"]], ids=["empty", "killed-before-first-checkpoint"])
def test_slurm_first_start_in_an_existing_run_dir_is_accepted(tmp_path, caplog, left):
    """slurm/train.sh always passes --resume auto: a first start into an empty folder, or one whose first session
    was killed before its first checkpoint, is a new run there."""
    caplog.set_level(logging.WARNING, logger="gancore.train.state")
    out = tmp_path / "slurm-17"
    out.mkdir()
    for name in left:
        (out / name).write_text("{}")
    r = fit(tiny("train.epochs=1"), out=out, resume="auto")
    assert r.status == "finished" and r.step == 4 and ckpt.latest(out) is not None
    assert f"--resume auto: {out} holds no checkpoint yet; starting a new run there (from step 0)" in caplog.messages


def test_no_run_of_the_preset_says_where_the_new_run_goes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gancore.train.state")
    r = fit(tiny("train.epochs=1"), resume="auto", stop_after=1)
    (msg,) = [m for m in caplog.messages if m.startswith("--resume auto")]
    assert msg == (f"--resume auto: no runs/quickstart-*/ holds a checkpoint; starting a new run in "
                   f"{r.run_dir} (from step 0)") and not r.run_dir.is_absolute()


def test_a_sweep_directory_is_refused_with_or_without_resume(tmp_path):
    sweep = tmp_path / "runs" / "sweeps" / "tiny"
    (sweep / "trial_0000").mkdir(parents=True)
    (sweep / "optuna.db").write_bytes(b"SQLite format 3\0")
    before = _listing(sweep)
    for resume in ("auto", None):
        with pytest.raises(CheckpointError, match=r"tiny is a sweep's directory \(it holds optuna.db, trial_0000\); "
                           r"pass --out with a run directory of its own, e.g. --out .*tiny/retrain$"):
            fit(tiny(), out=sweep, resume=resume)
    assert _listing(sweep) == before


def test_a_folder_of_unrelated_files_is_refused_by_resume_auto(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    for name in ("a.txt", "b.csv", "c.png", "d.json"):
        (d / name).write_text("x")
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "track.enabled=false", "--out", str(d), "--resume", "auto"]
    p = helpers.run(cmd, timeout=120, what="train.py --out on a foreign directory")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: {d} is not a run directory (it holds a.txt, b.csv, c.png and 1 more and no checkpoints/ or "
        "config.yaml); pass --out with an existing run's directory, a new one or an empty one"]
    assert _listing(d) == ["a.txt", "b.csv", "c.png", "d.json"]
