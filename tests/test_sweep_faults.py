"""Sweep workers that die (issue #20): a worker SIGKILLed in the middle of a trial does not stop the sweep; its
trial is re-queued and resumes from its last checkpoint, in the same MLflow run; no trial is lost or run twice.

SQLite: the coordinator sees its worker process die and re-queues the trial at once (dead pid). PostgreSQL: a
worker of "another host" (a `jobs/sweep.py --worker` process whose hostname is faked) is killed; only Optuna's
heartbeat can tell, after `grace_period`."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import helpers
import optuna
import pytest
import yaml
from conftest import ROOT, needs_mnist, needs_pg, state_diffs
from mlflow.tracking import MlflowClient

from gancore import sweep as sw
from gancore.sweep import load_sweep
from gancore.train import state as ckpt

OBJ = "fid_lenet_200"
STEPS, EVERY = 20, 5  # steps per trial; checkpoint and log interval
SPACE = {
    "lr": {"keys": ["optim.lr_g", "optim.lr_d"], "type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
    "model.nz": {"type": "categorical", "choices": [16, 32]},
}
PG_URL = os.environ.get("GANCORE_TEST_PG_URL")


def sweep_file(tmp_path: Path, study: str, n_trials: int, storage: dict | None = None, eval_every: int = STEPS) -> Path:
    """A tiny MNIST sweep: STEPS steps of batch 32, a checkpoint every EVERY steps, domain FID every `eval_every`
    steps (at the end only by default)."""
    overrides = {
        "data.subset": 32 * STEPS, "optim.batch_size": 32, "model.ngf": 16, "model.ndf": 16,
        "train.max_steps": STEPS, "train.log_every": EVERY, "train.checkpoint_every": EVERY,
        "train.snapshot_epochs": [1], "train.loss_ranges": [[1, 1]], "train.grid_size": 16,
        "track.image_every": STEPS, "track.uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
        "track.experiment": "sweeps", "eval.every": eval_every, "eval.n_samples": 200, "eval.extractor": "lenet_mnist",
    }
    d = {"study": study, "base": str(ROOT / "configs" / "quickstart.yaml"), "overrides": overrides, "objective": OBJ,
         "space": SPACE, "budget": {"n_trials": n_trials}, "sampler": {"name": "tpe", "seed": 0},
         "pruner": {"name": "none"}, "out": str(tmp_path / "sweeps"), **({"storage": storage} if storage else {})}
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    # its own process group: a failed wait kills a coordinator's workers with it (tests/helpers.py)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def trials(sweep) -> list:
    try:
        return optuna.load_study(study_name=sweep.study, storage=sw.open_storage(sweep.storage_url)).get_trials()
    except KeyError:  # not created yet
        return []


def study_attrs(sweep) -> dict:
    try:
        return optuna.load_study(study_name=sweep.study, storage=sw.open_storage(sweep.storage_url)).user_attrs
    except KeyError:
        return {}


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_after_first_checkpoint(sweep, procs: list[subprocess.Popen], host: str | None = None,
                                parent: int | None = None) -> tuple[int, int, float]:
    """SIGKILL the worker process of a RUNNING trial (on `host`, a child of `parent`) once that trial wrote its first
    checkpoint and before its last. Returns (trial number, worker pid, time of the kill)."""
    first = f"step_{EVERY:08d}.pt"

    def victim():
        for t in trials(sweep):
            worker, run_dir = t.user_attrs.get("gancore.worker", ""), t.user_attrs.get("gancore.run_dir")
            if (t.state.name == "RUNNING" and run_dir and (Path(run_dir) / "checkpoints" / first).exists()
                    and (host is None or worker.startswith(f"{host}:"))
                    and not (Path(run_dir) / "checkpoints" / f"step_{STEPS:08d}.pt").exists()):
                return t
        return None

    t = helpers.wait_for(victim, timeout=300, what=f"a running trial{f' on {host}' if host else ''} between its "
                         f"first checkpoint ({first}) and its last", proc=procs, interval=0.2)
    pid = int(t.user_attrs["gancore.worker"].rsplit(":", 2)[1])
    assert parent is None or parent_pid(pid) == parent  # one of the coordinator's workers
    os.kill(pid, signal.SIGKILL)
    return t.number, pid, time.time()


def killed_sweep(sweep, tmp_path: Path, *args: str, timeout: float) -> tuple[str, int, int, float]:
    """Run the sweep, SIGKILL one of its workers (kill_after_first_checkpoint) and wait for the sweep to finish, which
    it must do with exit 0. Returns (its output, the killed trial, the worker pid, the time of the kill)."""
    p = popen([str(ROOT / "jobs" / "sweep.py"), str(sweep.path), *args], tmp_path)
    try:
        killed, pid, killed_at = kill_after_first_checkpoint(sweep, [p], parent=p.pid)
        out, _ = helpers.finish(p, timeout=timeout, what="the sweep after its worker was killed")
    finally:
        helpers.stop(p, grace=0)
    assert p.returncode == 0, out[-3000:]
    return out, killed, pid, killed_at


def assert_nothing_lost(sweep, n_trials: int, killed: int, killed_at: float) -> None:
    """Each trial of the budget ends COMPLETE exactly once; the killed one's copy resumed from its last checkpoint
    in the same MLflow run, which is the only child run of that trial."""
    t = trials(sweep)
    root = {x.number: x.system_attrs.get("retry_history", [x.number])[0] for x in t}
    complete = [x for x in t if x.state.name == "COMPLETE"]
    assert len(complete) == n_trials and sorted(root[x.number] for x in complete) == sorted(set(root.values()))
    assert [(x.number, x.state.name) for x in t if x.state.name != "COMPLETE"] == [(killed, "FAIL")]
    (copy,) = [x for x in t if x.system_attrs.get("retry_history") == [killed]]
    assert copy.state.name == "COMPLETE" and copy.params == t[killed].params
    assert copy.user_attrs["gancore.worker"] != t[killed].user_attrs["gancore.worker"]

    dead_dir = Path(t[killed].user_attrs["gancore.run_dir"])
    last = ckpt.latest(dead_dir)  # what the killed attempt left
    step = int(last.stem.split("_")[1])
    assert 0 < step < STEPS and copy.user_attrs["gancore.resume_step"] == step
    assert copy.user_attrs["gancore.resumes"] == str(dead_dir)

    client = MlflowClient(sweep.base.track.uri)
    study = optuna.load_study(study_name=sweep.study, storage=sweep.storage_url)
    parent = study.user_attrs[sw.PARENT_ATTR]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(x.number for x in complete)
    assert {(r.data.tags["optuna.state"], r.info.status) for r in children} == {("COMPLETE", "FINISHED")}
    run = next(r for r in children if r.data.tags["optuna.trial"] == str(copy.number))
    assert run.info.run_id == ckpt.load(last)["run_id"] == copy.user_attrs["mlflow.run_id"]  # the same run
    assert run.data.tags["gancore.resume_count"] == "1"
    assert run.data.metrics[OBJ] == pytest.approx(copy.value, rel=1e-12)
    hist = client.get_metric_history(run.info.run_id, "Loss/D")
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)) and max(steps) == STEPS  # nothing logged twice
    after = [m.step for m in hist if m.timestamp >= killed_at * 1000]
    assert after and min(after) > step  # the copy went on from the checkpoint, not from step 0


@needs_mnist
@pytest.mark.timeout(600)  # subprocesses that train: minutes on a loaded 2-core machine
def test_sqlite_sweep_survives_a_killed_worker(tmp_path):
    path = sweep_file(tmp_path, "killed", n_trials=3)
    sweep = load_sweep(path)
    out, killed, pid, killed_at = killed_sweep(sweep, tmp_path, "--workers", "2", timeout=400)
    assert f"(pid {pid}, killed by SIGKILL); the sweep goes on" in out
    assert f"re-queued trial(s) {killed} of dead worker(s)" in out and "started worker 2 in place of" in out
    assert "stopped by SIGTERM" not in out  # the other worker was left alone
    assert_nothing_lost(sweep, 3, killed, killed_at)


@needs_mnist
@pytest.mark.timeout(600)  # two sweeps of one 20-step trial, one of them killed and continued: minutes when loaded
def test_a_killed_trial_that_evaluates_continues_bit_identical_to_an_uninterrupted_one(tmp_path):
    """A trial with evaluations during training (the presets' way: FID every EVERY steps, reported to the pruner)
    SIGKILLed between its first and last checkpoint, re-queued and continued by a new worker (which builds its
    extractor at another step than the uninterrupted trial): the same reported values at every step, the same
    objective and the same final networks, every bit, as the same trial run without a kill."""
    ref_sweep = load_sweep(sweep_file(tmp_path, "whole", n_trials=1, eval_every=EVERY))
    out, _ = helpers.finish(popen([str(ROOT / "jobs" / "sweep.py"), str(ref_sweep.path)], tmp_path), timeout=300,
                            what="the uninterrupted sweep")
    (ref,) = trials(ref_sweep)
    assert ref.state.name == "COMPLETE", out[-3000:]
    assert sorted(ref.intermediate_values) == list(range(EVERY, STEPS + 1, EVERY))

    sweep = load_sweep(sweep_file(tmp_path, "killed1", n_trials=1, eval_every=EVERY))
    _, killed, _, killed_at = killed_sweep(sweep, tmp_path, timeout=300)
    assert_nothing_lost(sweep, 1, killed, killed_at)
    (copy,) = [t for t in trials(sweep) if t.state.name == "COMPLETE"]
    assert copy.params == ref.params  # the same seeded sampler: the same configuration
    assert copy.intermediate_values == ref.intermediate_values and copy.value == ref.value
    a = ckpt.load(ckpt.latest(Path(copy.user_attrs["gancore.run_dir"])))
    b = ckpt.load(ckpt.latest(Path(ref.user_attrs["gancore.run_dir"])))
    assert a["step"] == b["step"] == STEPS
    assert state_diffs(a["networks"], b["networks"]) == [] and state_diffs(a["optimizers"], b["optimizers"]) == []


REMOTE = """import runpy, socket, sys
socket.gethostname = lambda: "other-host"  # a worker on another machine: its pid means nothing here
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/sweep.py", sys.argv[2], "--worker"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_mnist
@pytest.mark.timeout(600)  # subprocesses that train: minutes on a loaded 2-core machine
@needs_pg
def test_postgresql_heartbeat_requeues_a_killed_remote_worker(tmp_path):
    study = f"killed-{uuid.uuid4().hex[:8]}"
    path = sweep_file(tmp_path, study, n_trials=2, storage={"url": PG_URL, "heartbeat_interval": 1, "grace_period": 4})
    sweep = load_sweep(path)
    jobs = str(ROOT / "jobs")
    coord = popen([f"{jobs}/sweep.py", str(path), "--workers", "1"], tmp_path)
    remote = None
    try:
        # prepared: another machine's worker may join
        helpers.wait_for(lambda: sw.PARENT_ATTR in study_attrs(sweep), timeout=120,
                         what=f"the study's {sw.PARENT_ATTR} attribute (the coordinator prepared)", proc=coord,
                         interval=0.2)
        remote = popen(["-c", REMOTE, jobs, str(path)], tmp_path)
        killed, pid, killed_at = kill_after_first_checkpoint(sweep, [remote, coord], host="other-host")
        assert pid == remote.pid
        helpers.finish(remote, timeout=30, what="the killed remote worker")
        out, _ = helpers.finish(coord, timeout=500, what="the coordinator after its remote worker was killed")
        assert coord.returncode == 0, out[-3000:]
        t = trials(sweep)
        assert t[killed].user_attrs["gancore.worker"].startswith("other-host:")
        # failed by Optuna's heartbeat (fail_stale_trials, which gives no reason), not by a pid check (gancore's
        # requeue() would have written gancore.interrupted)
        assert t[killed].state.name == "FAIL" and "gancore.interrupted" not in t[killed].user_attrs
        assert_nothing_lost(sweep, 2, killed, killed_at)
    finally:
        for p in (remote, coord):
            if p is not None:
                helpers.stop(p, grace=0)
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=study, storage=PG_URL)
