"""Faults: kill -9 at any moment loses at most the steps since the last checkpoint (one MLflow run, no metric step
twice); a checkpoint write that fails half-way keeps the previous one; a torn newest checkpoint gives way to the one
before it. Every run here ends bit-identical to the same config trained without a fault."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from conftest import ROOT, needs_cifar, needs_mnist, state_diffs

from gancore.config import load_config
from gancore.errors import CheckpointError
from gancore.train import state as ckpt
from gancore.train.rundir import RunDir
from gancore.train.loop import fit

pytestmark = needs_mnist

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# 40 steps (256 images / batch 32 x 5 epochs) of a small DCGAN on 16x16 MNIST; a checkpoint every 5 steps
TINY = ["data.subset=256", "optim.batch_size=32", "model.arch=dcgan", "data.image_size=16", "model.nz=16",
        "model.ngf=8", "model.ndf=8", "train.checkpoint_every=5", "train.log_every=1", "train.progress=false",
        "track.image_every=10", "track.system_metrics=false",  # system/* metrics measure the machine
        "eval.every=10", "eval.n_samples=200"]  # the presets evaluate during training: so do the kills and resumes here
STEPS = 40
STATE_KEYS = ("step", "networks", "optimizers", "ema", "scaler", "rng", "loader", "history", "epoch_stats", "best")
TIMED = {"images_per_s"}  # metrics that measure the machine, not the run


def _assert_same_state(final: Path, reference: Path, steps: int = STEPS) -> None:
    """Every tensor and number of the training state (all but run id and config) equals the reference's."""
    a, b = ckpt.load(final), ckpt.load(reference)
    assert a["step"] == b["step"] == steps
    for key in STATE_KEYS:
        assert state_diffs(a[key], b[key]) == [], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config trained without a fault (tracking on, into its own store): its final checkpoint and run."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes below (OMP_NUM_THREADS=1): same kernels, same bits
    try:
        r = fit(load_config(QUICKSTART, [*TINY, f"track.uri=sqlite:///{root}/mlflow.db"]), out=root / "run")
    finally:
        torch.set_num_threads(threads)
    assert r.status == "finished" and r.step == STEPS and r.checkpoint.name == f"step_{STEPS:08d}.pt"
    return {"checkpoint": r.checkpoint, "uri": f"sqlite:///{root}/mlflow.db", "run_id": r.run_id}


# ----------------------------------------------------------------------------------------------------------------
# kill -9


def _step(p: Path | None) -> int:
    """The step of a step checkpoint, 0 for none yet."""
    return RunDir.step_of(p) if p is not None else 0


def _killed_session(cmd: list[str], env: dict, log: Path, until, what: str, extra: float = 0.0) -> None:
    """Start `cmd`, SIGKILL it `extra` seconds after `until()` holds (it must still be running then)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        helpers.wait_for(until, timeout=240, what=f"the moment of the '{what}' kill", proc=proc, log=log,
                         interval=0.002)
        time.sleep(extra)
        assert proc.poll() is None, f"training finished before the '{what}' kill:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        assert helpers.wait_exit(proc, timeout=30, what="the killed training", log=log) == -signal.SIGKILL
    finally:
        helpers.stop(proc, grace=0)


def _metric_steps(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


def _image_steps(client, run_id: str) -> list[tuple[str, int]]:
    """(key, step) of every logged image (MLflow names them images/<key>+step+<N>+timestamp+...png)."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    return sorted((n.split("+")[0], int(n.split("+")[2])) for n in names if n.endswith(".png"))


def test_the_hold_test_hook_waits_at_its_step_until_released(tmp_path, monkeypatch):
    """GANCORE_TEST_HOLD_AT_STEP (what the kills below and test_tracking_outage.py rely on): a run asks the stop flag
    at every step; at the held step the call returns only once the release file exists (or a stop signal came), and
    the release is not a stop."""
    import threading

    from gancore.train.signals import StopFlag

    release = tmp_path / "release"
    monkeypatch.setenv("GANCORE_TEST_HOLD_AT_STEP", "3")
    monkeypatch.setenv("GANCORE_TEST_HOLD_RELEASE", str(release))
    flag, answers = StopFlag(), []
    assert [flag.requested(s) for s in (1, 2)] == [False, False]  # not held before its step
    held = threading.Thread(target=lambda: answers.append(flag.requested(3)), daemon=True)
    held.start()
    held.join(0.5)
    assert held.is_alive() and answers == []  # still waiting at step 3
    release.touch()
    helpers.join(held, timeout=30, what="the held step after the release")
    assert answers == [False] and flag.requested(4) is False


@pytest.mark.timeout(900)  # six killed sessions and a last one: about a minute on 2 idle cores, 5 on a loaded one
def test_kill_9_at_any_moment_loses_nothing(tmp_path, reference):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/store/mlflow.db"
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(QUICKSTART), *TINY, f"track.uri={uri}",
           "--out", str(run_dir), "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ckpt_dir = run_dir / "checkpoints"
    rng = random.Random(20)  # seeded: the same kill points on every run of this test
    created = run_dir / "real_samples.png"  # written right after the MLflow run is created, before step 1

    def writing(step: int):  # checkpoint `step` is being written (its temp file) or has just been written
        return lambda: any(ckpt_dir.glob(f".step_{step:08d}.pt.*.tmp")) or ckpt.step_path(run_dir, step).exists()

    def startup(last: int):  # a random moment of the start-up (or the MLflow run's creation, if that comes first)
        start, seconds = time.monotonic(), rng.uniform(0.3, 2.0)
        return 1, lambda: time.monotonic() - start >= seconds or created.exists()

    # the evaluation of step `evaluated` (LeNet FID/KID/IS on 200 samples) is under way once that step's sample grid
    # is written (track.image_every = eval.every) and until its checkpoint is: no earlier session got that far
    evaluated = rng.choice([10, 20])
    grid = RunDir(run_dir).sample_grid(evaluated)

    def checkpoint_write(last: int):
        step = last + rng.choice([5, 10])
        return step + 1, writing(step)

    def between(last: int):  # once the next checkpoint is written, held a few steps before the one after it
        return last + 5 + rng.randint(1, 4), ckpt.step_path(run_dir, last + 5).exists

    # (what, session(newest checkpoint's step) -> (the step the session is held at, condition to kill at)). Held:
    # GANCORE_TEST_HOLD_AT_STEP (gancore/train/signals.py) makes the run wait at that step (for a stop signal that
    # never comes), so however fast this machine it cannot run past it before the kill. The last kill needs no hold:
    # the end-of-run evaluation and report come after the last checkpoint.
    kills = [
        ("start-up", startup),
        ("MLflow run created, no checkpoint yet", lambda last: (1, created.exists)),
        ("during an evaluation", lambda last: (evaluated + 1, grid.exists)),
        ("checkpoint write", checkpoint_write),
        ("between checkpoints", between),
        ("end-of-run report, after the last checkpoint", lambda last: (0, ckpt.step_path(run_dir, STEPS).exists)),
    ]
    seen = []
    for i, (what, session) in enumerate(kills):
        log = tmp_path / f"session{i}.log"
        before = _step(ckpt.latest(run_dir))
        hold, until = session(before)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**env, "GANCORE_TEST_HOLD_AT_STEP": str(hold)})
        try:
            helpers.wait_for(until, timeout=120, what=f"the moment of the '{what}' kill", proc=proc, log=log,
                             interval=0.002)
            assert proc.poll() is None, f"training finished before the '{what}' kill:\n{log.read_text()[-3000:]}"
            proc.send_signal(signal.SIGKILL)
            assert helpers.wait_exit(proc, timeout=30, what="the killed training", log=log) == -signal.SIGKILL
        finally:
            helpers.stop(proc, grace=0)
        seen.append((what, before, _step(ckpt.latest(run_dir))))
    assert seen[0][2] == 0 and seen[1][2] == 0, seen  # the first two kills came before any checkpoint
    assert seen[2][2] == evaluated - 5, seen  # killed after the step's grid, before its checkpoint: in its evaluation
    assert seen[4][2] == seen[4][1] + 5, seen  # between checkpoints: the next one written, not the one after
    assert seen[-1][2] == STEPS, seen

    p = helpers.run(cmd, env=env, timeout=240, what="the resume after the kills")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"done: {STEPS} steps" in p.stdout

    # the training state: bit for bit the uninterrupted run's
    final = ckpt.step_path(run_dir, STEPS)
    _assert_same_state(final, reference["checkpoint"])
    assert not list(ckpt_dir.glob("*.tmp")), "a killed writer's temp file was left behind"

    # MLflow: one run, FINISHED, every metric step logged once with the uninterrupted run's value
    client, ref_client = MlflowClient(uri), MlflowClient(reference["uri"])
    exp = client.get_experiment_by_name("gancore")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and ckpt.load(final)["run_id"] == run.info.run_id
    got, want = _metric_steps(client, run.info.run_id), _metric_steps(ref_client, reference["run_id"])
    assert set(got) == set(want)
    for key in want:
        steps = [s for s, _ in got[key]]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {steps}"
        assert steps == [s for s, _ in want[key]], key
        if key not in TIMED:
            assert got[key] == want[key], key
    assert got["Loss/D"][-1][0] == STEPS and len(got["Loss/D"]) == STEPS  # log_every=1: every step, once
    images = _image_steps(client, run.info.run_id)
    assert images == _image_steps(ref_client, reference["run_id"]) == [("samples", s) for s in (10, 20, 30, 40)]


PLUS = ROOT / "configs" / "mnist_dcgan_plus.yaml"
# The plus preset's own evaluation (lenet_mnist FID/KID/IS of the EMA generator, the best-FID checkpoint) and EMA
# (0.999); shrunk, for cost only: data.subset (all -> 640), train.max_steps (5 epochs -> 30), eval.every (937 -> 10),
# eval.n_samples (10k -> 500), train.checkpoint_every (-> 5), batch (64 -> 32), model.ngf/ndf (64 -> 16).
# track.image_every = eval.every: a step's sample grid, written just before its evaluation, tells that it is under way.
PLUS_TINY = ["data.subset=640", "optim.batch_size=32", "model.ngf=16", "model.ndf=16", "train.max_steps=30",
             "train.checkpoint_every=5", "eval.every=10", "eval.n_samples=500", "track.image_every=10",
             "train.progress=false", "track.enabled=false"]


@pytest.mark.timeout(900)  # four fresh training processes: about 2 minutes on a loaded core
def test_plus_preset_stopped_and_killed_resumes_bit_identical(tmp_path):
    """mnist_dcgan_plus stopped cleanly, SIGKILLed during an evaluation and at a random moment after a checkpoint,
    each time continued with --resume auto in a fresh process (which builds its extractor at another step than the
    uninterrupted run): the final state equals the uninterrupted run's, every tensor."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes below (OMP_NUM_THREADS=1)
    try:
        ref = fit(load_config(PLUS, PLUS_TINY), out=tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    assert ref.status == "finished" and ref.step == 30 and ref.metrics["best_fid_lenet_500"] > 0
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(PLUS), *PLUS_TINY, "--out", str(run_dir),
           "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(25)  # seeded: the same stop step and kill moments on every run of this test

    stop = rng.choice([11, 12, 13, 14])  # a clean stop between the evaluations of steps 10 and 20
    p = subprocess.run([*cmd, "--stop-after", str(stop)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 75 and _step(ckpt.latest(run_dir)) == stop, p.stdout + p.stderr
    grid = RunDir(run_dir).sample_grid(20)
    _killed_session(cmd, env, tmp_path / "eval.log", grid.exists, "the step-20 evaluation", rng.uniform(0.0, 0.03))
    assert _step(ckpt.latest(run_dir)) == 15  # after step 20's grid, before its checkpoint: during its evaluation
    _killed_session(cmd, env, tmp_path / "after.log", ckpt.step_path(run_dir, 25).exists, "after step 25",
                    rng.uniform(0.0, 0.5))
    assert 25 <= _step(ckpt.latest(run_dir)) < 30
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "done: 30 steps" in p.stdout, p.stdout + p.stderr
    _assert_same_state(ckpt.step_path(run_dir, 30), ref.checkpoint, steps=30)
    a, b = ckpt.load(RunDir(run_dir).best), ckpt.load(RunDir(ref.run_dir).best)  # the best-FID checkpoint too
    assert a["step"] == b["step"] and state_diffs(a["networks"], b["networks"]) == state_diffs(a["ema"], b["ema"]) == []


CGAN_PLUS = ROOT / "configs" / "cifar10_cgan_plus.yaml"
# The class-conditional plus preset's own evaluation (eval.extractor auto: Inception where its weights are installed,
# as in CI; FID/KID/IS of the EMA generator over sampled classes; the best-FID checkpoint), EMA 0.999, projection D,
# class-conditional BatchNorm, two D steps per G step; shrunk, for cost only: data.subset, batch, widths, 30 steps,
# eval.every 5000 -> 15, eval.n_samples 10k -> 32 (each evaluation is 32 Inception forward passes on the CPU).
CGAN_PLUS_TINY = ["data.subset=320", "optim.batch_size=16", "model.ngf=16", "model.ndf=16", "train.max_steps=30",
                  "train.checkpoint_every=5", "eval.every=15", "eval.n_samples=32", "track.image_every=15",
                  "train.progress=false", "track.enabled=false", "train.snapshot_epochs=[]"]


@needs_cifar
@pytest.mark.timeout(900)
def test_conditional_plus_preset_stopped_twice_resumes_bit_identical(tmp_path, monkeypatch):
    """cifar10_cgan_plus stopped before its first evaluation and right after it, each time resumed (a fresh fit, which
    builds its extractor and samples its evaluation classes at another step than the uninterrupted run): the final
    state and the best-FID checkpoint equal the uninterrupted run's, every tensor. The end-of-run report's per-class
    accuracy (which would train the CIFAR-10 domain classifier) and its t-SNE figure (Inception features of real and
    generated images: 40 s of a 230 s test, twice) come after the last checkpoint and are left out."""
    import gancore.metrics

    monkeypatch.setattr(gancore.metrics, "class_accuracy", lambda *a, **k: {})
    monkeypatch.setattr(gancore.metrics, "tsne_plot", lambda cfg, sampler, device, path, **k: path)  # not written
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(CGAN_PLUS, CGAN_PLUS_TINY)
        assert cfg.model.conditional and cfg.train.ema_decay == 0.999 and cfg.optim.d_iters == 2
        ref = fit(cfg, out=tmp_path / "ref")
        run_dir = tmp_path / "run"
        stops = [fit(cfg, out=run_dir, stop_after=8), fit(cfg, out=run_dir, resume="auto", stop_after=15)]
        assert [r.status for r in stops] == ["stopped", "stopped"] and [r.step for r in stops] == [8, 15]
        done = fit(cfg, out=run_dir, resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert ref.status == done.status == "finished" and done.step == 30
    key = next(k for k in ref.metrics if k.startswith("best_fid_"))
    assert done.metrics[key] == ref.metrics[key]
    _assert_same_state(done.checkpoint, ref.checkpoint, steps=30)
    a, b = ckpt.load(RunDir(run_dir).best), ckpt.load(RunDir(ref.run_dir).best)
    assert a["step"] == b["step"] and state_diffs(a["networks"], b["networks"]) == state_diffs(a["ema"], b["ema"]) == []


# ----------------------------------------------------------------------------------------------------------------
# a checkpoint write that fails half-way; a torn newest checkpoint


class _FullDisk(io.FileIO):
    """A file whose writes fail (ENOSPC) once 50 kB are written: the disk fills up during the checkpoint."""

    room = 50_000

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return super().write(data)


@pytest.mark.parametrize("how", ["save-raises", "disk-full"])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, reference, monkeypatch, how):
    """The step-10 checkpoint write fails half-way: torch.save writes some bytes and raises, or the disk fills up
    under torch.save (which reports that as a RuntimeError). The run stops with one line; step 5 is kept."""
    import gancore.io

    cfg = load_config(QUICKSTART, [*TINY, "track.enabled=false"])
    run_dir = tmp_path / "run"
    real_save = torch.save

    def save_fails_at_step_10(obj, f, *args, **kwargs):
        if ".step_00000010.pt." not in str(getattr(getattr(f, "fh", f), "name", "")):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + bytes(4096))  # half a zip, then the failure
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full_at_step_10(path, mode="r", *args, **kwargs):
        if ".step_00000010.pt." in str(path):
            return _FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m, pytest.raises(CheckpointError) as err:
            if how == "save-raises":
                m.setattr(ckpt.torch, "save", save_fails_at_step_10)
            else:
                m.setattr(gancore.io, "open", open_full_at_step_10, raising=False)  # atomic_write's open
            fit(cfg, out=run_dir)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"checkpoint {ckpt.step_path(run_dir, 10)} not written (OSError: No space left on device)")
        assert f"the last good one is {ckpt.step_path(run_dir, 5)}" in msg and "--resume auto" in msg
        # no temp file left; best.pt is the step-10 evaluation's best-FID checkpoint (outside the step rotation)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "step_00000005.pt"]
        assert ckpt.load(ckpt.step_path(run_dir, 5))["step"] == 5
        resumed = fit(cfg, out=run_dir, resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert resumed.status == "finished" and resumed.steps_run == STEPS - 5  # from the step-5 checkpoint
    _assert_same_state(resumed.checkpoint, reference["checkpoint"])


def test_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, caplog):
    cfg = load_config(QUICKSTART, [*TINY, "track.enabled=false"])
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        part = fit(cfg, out=run_dir, stop_after=12)  # checkpoints at 5, 10 and the stop at 12; the newest two kept
        assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000010.pt", "step_00000012.pt"]
        torn = ckpt.step_path(run_dir, 12)
        data = torn.read_bytes()
        torn.write_bytes(data[: len(data) // 2])  # a crash after the rename, before the data reached the disk
        with caplog.at_level(logging.WARNING, logger="gancore.train.state"):
            resumed = fit(cfg, out=run_dir, resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert part.status == "stopped"
    warnings = [r.getMessage() for r in caplog.records if r.name == "gancore.train.state"]
    assert warnings == [(f"checkpoint {torn} torn or corrupt (renamed step_00000012.pt.corrupt); resuming from the "
                         f"earlier {ckpt.step_path(run_dir, 10)} (step 10)")]
    assert resumed.status == "finished" and resumed.steps_run == STEPS - 10
    assert (run_dir / "checkpoints" / "step_00000012.pt.corrupt").read_bytes() == data[: len(data) // 2]
    _assert_same_state(resumed.checkpoint, reference["checkpoint"])

    # every step checkpoint unreadable: the one-line error of the newest, nothing renamed
    for p in ckpt.list_checkpoints(run_dir):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"step_00000040.pt' is corrupt or not a gancore checkpoint"):
        fit(cfg, out=run_dir, resume="auto")
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000035.pt", "step_00000040.pt"]
