"""Stop signals during an evaluation: it ends within one extractor batch, every checkpoint is kept (the final one is
written before the final evaluation), and a resume runs the evaluation that was cut short."""

import os
import signal
import subprocess
import sys

import helpers
import torch

from gancore.config import load_config
from gancore.metrics import fidelity
from gancore.train import state as ckpt
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, state_diffs, tiny

pytestmark = needs_mnist

EVAL = ("eval.n_samples=500", "eval.extractor=lenet_mnist", "eval.metrics=[fid,kid]")


def _signal_during_generation(monkeypatch, after: int, on_first=None) -> dict:
    """Patch the generated-image batches of the metrics: after `after` extractor batches of the first evaluation,
    SIGTERM this process (what Slurm or `kill` sends); count the batches drawn after it."""
    seen = {"batches": 0, "after_signal": 0, "sent": False}
    original = fidelity.sampled_batches

    def batches(sample, n, batch):
        if on_first is not None and not seen["batches"]:
            on_first()
        for x in original(sample, n, batch):
            if seen["sent"]:
                seen["after_signal"] += 1
            seen["batches"] += 1
            if seen["batches"] == after and not seen["sent"]:  # arrives while this batch is being measured
                seen["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)
            yield x

    monkeypatch.setattr(fidelity, "sampled_batches", batches)
    return seen


def test_signal_during_a_mid_run_evaluation_stops_and_resume_runs_it(tmp_path, monkeypatch):
    cfg = tiny("eval.every=4", *EVAL)  # 8 steps, evaluations at 4 and 8
    full_evals, evals = [], []
    full = fit(cfg, out=tmp_path / "full", on_eval=lambda s, m, _images: full_evals.append((s, m)))
    seen = _signal_during_generation(monkeypatch, after=3)
    part = fit(cfg, out=tmp_path / "part", on_eval=lambda s, m, _images: evals.append((s, m)))
    monkeypatch.undo()
    # the evaluation at step 4 ended right after the batch during which the signal came (500 images = 20 batches)
    assert seen["sent"] and seen["batches"] == 3 and seen["after_signal"] == 0
    assert part.status == "stopped" and part.step == 4 and part.stop_signal == signal.SIGTERM and evals == []
    state = ckpt.load(part.checkpoint)
    assert part.checkpoint.name == "step_00000004.pt" and state["eval_pending"] is True
    resumed = fit(cfg, out=tmp_path / "part", resume="auto", on_eval=lambda s, m, _images: evals.append((s, m)))
    assert resumed.status == "finished" and [s for s, _ in evals] == [4, 8] == [s for s, _ in full_evals]
    assert evals == full_evals  # the same numbers at both steps as without the interruption
    a, b = ckpt.load(full.checkpoint), ckpt.load(resumed.checkpoint)
    for key in ("networks", "optimizers", "loader", "history", "rng", "best", "eval_pending"):
        assert state_diffs(a[key], b[key]) == [], key
    assert b["eval_pending"] is False


def test_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    cfg = tiny(*EVAL)  # one evaluation, at the end (step 8)
    final = tmp_path / "part" / "checkpoints" / "step_00000008.pt"
    before = []
    seen = _signal_during_generation(monkeypatch, after=2, on_first=lambda: before.append(final.is_file()))
    part = fit(cfg, out=tmp_path / "part")
    monkeypatch.undo()
    assert before == [True]  # the trained steps were safe before the first generated image
    assert part.status == "stopped" and part.step == part.total_steps == 8 and seen["after_signal"] == 0
    assert part.metrics == {} and ckpt.load(final)["eval_pending"] is True
    full = fit(cfg, out=tmp_path / "full")
    assert state_diffs(ckpt.load(final)["networks"], ckpt.load(full.checkpoint)["networks"]) == []
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")  # trains nothing, runs the final evaluation
    assert resumed.status == "finished" and resumed.steps_run == 0
    assert resumed.metrics["fid_lenet_500"] == full.metrics["fid_lenet_500"]
    assert ckpt.load(final)["eval_pending"] is False


def test_sigterm_during_a_long_final_evaluation_exits_75_and_resume_evaluates(tmp_path):
    """Through the CLI with a real signal from outside: an evaluation of a million images (hours on a CPU) stops, the
    job exits 75 with its checkpoint, and `--resume auto` with a smaller eval.n_samples (infrastructure, may change
    on resume) runs the missing evaluation."""
    out = tmp_path / "r"
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "data.subset=64", "optim.batch_size=32", "train.epochs=2", "train.progress=false", "track.enabled=false",
           "eval.every=0", "eval.extractor=lenet_mnist", "eval.metrics=[fid]", "--out", str(out)]
    # the folder the real statistics are cached in (this test's own $GANCORE_CACHE, which the child inherits)
    stats = fidelity.stats_path(load_config(None, []), "", "", torch.zeros(0, dtype=torch.uint8)).parent
    proc = subprocess.Popen([*cmd, "eval.n_samples=1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    final = out / "checkpoints" / "step_00000004.pt"
    try:
        helpers.wait_for(final.is_file, timeout=240, what=f"the final checkpoint {final.name}", proc=proc, interval=0.2)
        # well inside the evaluation: its real statistics are cached, 4000 generated batches (hours) are under way
        helpers.wait_for(lambda: any(stats.glob("*.npz")), timeout=240, what=f"the real statistics in {stats}",
                         proc=proc, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        # a hang guard, not a timing assertion: without the stop check this evaluation runs for hours
        stdout, stderr = helpers.finish(proc, timeout=120, what="the evaluation after SIGTERM")
    finally:
        helpers.stop(proc, grace=0)
    assert proc.returncode == 75, stderr
    assert "stopped at step 4/4" in stdout and "--resume auto" in stdout
    assert ckpt.load(final)["eval_pending"] is True
    p = helpers.run([*cmd, "eval.n_samples=200", "--resume", "auto"], timeout=240, what="the resume that evaluates")
    assert p.returncode == 0, p.stderr
    assert "done: 4 steps" in p.stdout and "fid_lenet_200 = " in p.stdout
    assert ckpt.load(final)["eval_pending"] is False
