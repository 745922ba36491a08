"""Optuna sweeps (issue #7): the sweep file, parallel workers on sqlite / journal / PostgreSQL storage (as a Slurm
job array: tests/test_slurm.py), MLflow parent and child runs, kill + resume without lost or duplicated trials, pruning, diverged trials,
unreachable storage."""

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from queue import Empty

import helpers
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from gancore import sweep as sw
from gancore.config import load_config
from gancore.sweep import SweepError, load_sweep
from gancore.sweep import devices as sweep_devices
from gancore.sweep import run as sweep_run
from gancore.sweep import spec as sweep_spec
from gancore.sweep import storage as sweep_storage
from gancore.sweep import workers as sweep_workers
from gancore.sweep.objective import Objective
from gancore.tracking.sweep_runs import ChildRun
from conftest import ROOT, needs_mnist, needs_pg

OBJ = "fid_lenet_200"
SPACE = {
    "lr": {"keys": ["optim.lr_g", "optim.lr_d"], "type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
    "model.nz": {"type": "categorical", "choices": [16, 32]},
    "optim.d_iters": {"type": "int", "low": 1, "high": 2},
}


def sweep_file(tmp_path: Path, study: str = "tiny", n_trials: int = 4, steps: int = 4, tracked: bool = True,
               space: dict | None = None, **top) -> Path:
    """A few-step MNIST sweep: `steps` batches of 32 images (at least one epoch whatever d_iters), `steps` steps,
    domain FID on 200 samples every 2 steps."""
    overrides = {
        "data.subset": 32 * steps, "optim.batch_size": 32, "model.ngf": 16, "model.ndf": 16, "train.max_steps": steps,
        "train.log_every": 2, "train.checkpoint_every": 2, "train.snapshot_epochs": [1],
        "train.loss_ranges": [[1, 1]], "train.grid_size": 16, "track.image_every": steps, "track.enabled": tracked,
        "track.uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "track.experiment": "sweeps",
        "eval.every": 2, "eval.n_samples": 200, "eval.extractor": "lenet_mnist",
    }
    d = {"study": study, "base": str(ROOT / "configs" / "quickstart.yaml"), "overrides": overrides, "objective": OBJ,
         "space": space or SPACE, "budget": {"n_trials": n_trials}, "sampler": {"name": "tpe", "seed": 0},
         "pruner": {"name": "none"}, "out": str(tmp_path / "sweeps"), **top}
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def cli(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    kw.setdefault("start_new_session", True)  # its own process group: a failed wait kills its workers with it
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = helpers.finish(p, timeout=timeout, what=f"{' '.join(p.args[2:])} (jobs/sweep.py)")
    assert p.returncode == 0, out[-3000:]
    return out


def trials(sweep) -> list:
    return optuna.load_study(study_name=sweep.study, storage=sw.open_storage(sweep.storage_url)).get_trials()


def child_runs(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


# ----------------------------------------------------------------------------------------------------------------
# The sweep file


@pytest.mark.parametrize("change, message", [
    ({"budjet": {"n_trials": 2}}, "unknown key 'budjet'; did you mean 'budget'?"),
    ({"budget": {"n_trial": 2}}, "budget: unknown key 'n_trial'; did you mean 'n_trials'?"),
    ({"space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "'optim.lr' is not a config key"),
    ({"space": {"train.log_every": {"type": "int", "low": 1, "high": 4}}}, "'train.log_every' is infrastructure"),
    ({"space": {"model.nz": {"type": "categorical", "choices": [16], "lo": 1}}}, "space.model.nz: unknown key 'lo'"),
    ({"space": {"loss.name": {"type": "categorical", "choices": ["hinge", "hnge"]}}}, "unknown loss 'hnge'"),
    ({"space": {"optim.d_iters": {"type": "float", "low": 1, "high": 2.5}}}, "value 2.5 does not fit optim.d_iters"),
    ({"objective": "is_lenet_200"}, "expected an fid_* metric"),
    ({"pruner": {"name": "median"}, "overrides": {"eval.n_samples": 200, "eval.every": 0}},
     "pruner median needs intermediate FIDs"),
    ({"sampler": {"name": "grid"}}, "sampler.name: 'grid' is not one of tpe, random"),
    ({"budget": {}}, "give n_trials and/or timeout_s"),
])
def test_sweep_file_is_validated_strictly(tmp_path, change, message):
    d = yaml.safe_load(sweep_file(tmp_path).read_text())
    d.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_trial_config_applies_a_tied_parameter_to_every_key(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    cfg = sweep_spec.trial_config(sweep, {"lr": 3e-4, "model.nz": 32, "optim.d_iters": 2}, 7)
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.model.nz, cfg.optim.d_iters) == (3e-4, 3e-4, 32, 2)
    assert cfg.name == "tiny-trial0007" and cfg.train.max_steps == 4 and not cfg.train.progress
    assert sweep_spec.trial_config(sweep, {"lr": 3e-4, "model.nz": 32, "optim.d_iters": 2}).name == "tiny-best"
    assert sweep.storage_url == f"sqlite:///{tmp_path / 'sweeps' / 'tiny' / 'optuna.db'}"


# ----------------------------------------------------------------------------------------------------------------
# Pruning


def test_median_pruner_prunes_a_worse_report_at_the_same_step(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, pruner={"name": "median", "n_startup_trials": 1}))
    study = optuna.create_study(direction="minimize", pruner=sweep_storage._pruner(sweep))
    obj = Objective(sweep, parent_id=None)

    def hook(trial):  # what the trainer calls after each evaluation
        return obj.on_eval(trial, ChildRun(sweep, None, trial, tmp_path, {}))

    t0 = study.ask()
    hook(t0)(2, {OBJ: 100.0, "is_lenet_200": 1.0})
    hook(t0)(4, {OBJ: 90.0})
    study.tell(t0, 90.0)
    hook(study.ask())(2, {OBJ: 99.0})  # better than trial 0 at step 2: goes on
    with pytest.raises(optuna.TrialPruned, match="fid_lenet_200 150 at step 2"):
        hook(study.ask())(2, {OBJ: 150.0})  # worse at the same step: pruned
    hook(study.ask())(4, {OBJ: 500.0})  # the last evaluation (train.max_steps) completes the trial instead
    with pytest.raises(SweepError, match="objective fid_lenet_200 is not among the reported metrics"):
        hook(study.ask())(2, {"fid_lenet_500": 1.0})


class PruneTrial(optuna.pruners.BasePruner):
    def __init__(self, number: int):
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


@needs_mnist
def test_diverged_trial_fails_pruned_trial_stops_early_and_the_study_goes_on(tmp_path, monkeypatch):
    space = {**SPACE, "lr": {**SPACE["lr"], "high": 1.0e31}}
    sweep = load_sweep(sweep_file(tmp_path, study="wiring", n_trials=3, space=space))
    study, parent = sweep_run.prepare(sweep)
    study.enqueue_trial({"lr": 1e30, "model.nz": 16, "optim.d_iters": 1})  # Adam at lr 1e30: NaN at step 1
    study.enqueue_trial({"lr": 2e-4, "model.nz": 16, "optim.d_iters": 1})  # pruned at its first evaluation
    study.enqueue_trial({"lr": 3e-4, "model.nz": 32, "optim.d_iters": 1})
    monkeypatch.setattr(sweep_storage, "_pruner", lambda s: PruneTrial(1))
    assert sw.worker(sw.WorkerContext(sweep, parent, index=0, stream=0)) == 0

    t = trials(sweep)
    assert [x.state.name for x in t] == ["FAIL", "PRUNED", "COMPLETE"]  # budget 3 used: the worker stopped
    assert "non-finite" in t[0].user_attrs["gancore.failure"]
    assert list(t[1].intermediate_values) == [2]  # stopped at step 2 of 4
    assert not (sweep.dir / "trial_0001" / "checkpoints" / "step_00000004.pt").exists()
    assert list(t[2].intermediate_values) == [2, 4] and t[2].value == t[2].intermediate_values[4]

    client = MlflowClient(sweep.base.track.uri)
    runs = {r.data.tags["optuna.trial"]: r for r in child_runs(client, parent)}
    assert {k: (r.data.tags["optuna.state"], r.info.status) for k, r in runs.items()} == {
        "0": ("FAIL", "FAILED"), "1": ("PRUNED", "KILLED"), "2": ("COMPLETE", "FINISHED")}
    assert runs["2"].data.metrics[OBJ] == t[2].value


# ----------------------------------------------------------------------------------------------------------------
# A real sweep: 2 workers, extended, killed, resumed


@needs_mnist
def test_sweep_runs_in_parallel_survives_a_kill_and_resumes_without_lost_or_duplicated_trials(tmp_path):
    path = sweep_file(tmp_path, n_trials=4)
    sweep = load_sweep(path)
    out = finish(cli(str(path), "--workers", "2", "--n-trials", "2", cwd=tmp_path))
    assert "best trial" in out
    first = trials(sweep)
    assert [x.state.name for x in first] == ["COMPLETE", "COMPLETE"]
    assert len({x.user_attrs["gancore.worker"] for x in first}) == 2  # two worker processes

    # extend the budget to 4, then kill everything (SIGKILL, as a crash) once a new trial has a checkpoint
    p = cli(str(path), "--workers", "2", cwd=tmp_path)
    try:
        helpers.wait_for(lambda: [x for x in trials(sweep) if x.state.name == "RUNNING" and "gancore.run_dir" in
                                  x.user_attrs and (Path(x.user_attrs["gancore.run_dir"]) / "checkpoints" /
                                                    "step_00000002.pt").exists()],
                         timeout=300, what="a running trial with its first checkpoint (step 2)", proc=p, interval=0.5)
    finally:
        if p.poll() is None:  # (not once it has ended and been reaped: its pid may be another's by then)
            os.killpg(p.pid, signal.SIGKILL)
        helpers.finish(p, timeout=30, what="the killed sweep")
    killed = {x.number for x in trials(sweep) if x.state.name == "RUNNING"}
    assert killed and min(killed) >= 2

    out = finish(cli(str(path), "--workers", "2", cwd=tmp_path))
    assert "re-queued interrupted trial(s)" in out
    t = trials(sweep)
    complete = [x for x in t if x.state.name == "COMPLETE"]
    assert len(complete) == 4 and {x.state.name for x in t} == {"COMPLETE", "FAIL"}
    for f in (x for x in t if x.state.name == "FAIL"):  # each killed trial failed once and was re-run once
        assert f.number in killed and "died" in f.user_attrs["gancore.interrupted"]
        retries = [x for x in t if x.system_attrs.get("retry_history", [None])[-1] == f.number]
        assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == f.params
    assert len({tuple(sorted(x.params.items())) for x in complete}) == 4  # no duplicated trial

    # MLflow: one parent (reused by all three runs of the sweep); one finished child per completed trial
    study = optuna.load_study(study_name=sweep.study, storage=sweep.storage_url)
    parent = study.user_attrs[sw.PARENT_ATTR]
    client = MlflowClient(sweep.base.track.uri)
    exp = client.get_run(parent).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([exp], "tags.`gancore.sweep` = 'parent'")] == [parent]
    children = child_runs(client, parent)
    done = {r.data.tags["optuna.trial"]: r for r in children if r.data.tags.get("optuna.state") == "COMPLETE"}
    assert sorted(map(int, done)) == [x.number for x in complete]
    for x in complete:
        run = done[str(x.number)]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.study"] == sweep.study
        assert run.data.params["optuna.lr"] == str(x.params["lr"])
        assert float(run.data.params["optim.lr_g"]) == float(run.data.params["optim.lr_d"]) == x.params["lr"]
        assert int(run.data.params["model.nz"]) == x.params["model.nz"]
        assert int(run.data.params["optim.d_iters"]) == x.params["optim.d_iters"]
        assert run.data.metrics[OBJ] == pytest.approx(x.value, rel=1e-12)
    resumed = [r for r in done.values() if int(r.data.tags.get("gancore.resume_count", "0")) > 0]
    assert resumed, "a re-run trial should continue the killed trial's checkpoint and MLflow run"
    assert all(r.data.tags.get("optuna.state") in ("COMPLETE", "INTERRUPTED") for r in children)

    # the report: best value/params and Optuna's figures on the parent; best.yaml retrains the best trial
    best = min(complete, key=lambda x: x.value)
    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED" and prun.data.tags["best.trial"] == str(best.number)
    assert prun.data.metrics[f"best_{OBJ}"] == pytest.approx(best.value)
    arts = {a.path for a in client.list_artifacts(parent, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png",
            "optuna/parallel_coordinate.png"} <= arts
    cfg = load_config(sweep.dir / "best.yaml")
    assert (cfg.optim.lr_g, cfg.model.nz, cfg.optim.d_iters) == (
        best.params["lr"], best.params["model.nz"], best.params["optim.d_iters"])


# ----------------------------------------------------------------------------------------------------------------
# Other storages


def _two_workers_on(tmp_path, storage: str, study: str) -> list:
    sweep = load_sweep(sweep_file(tmp_path, study=study, n_trials=2, steps=2, tracked=False), storage=storage)
    assert sw.run_sweep(sweep, workers=2) == 0
    t = trials(sweep)
    assert [x.state.name for x in t] == ["COMPLETE", "COMPLETE"]
    assert len({x.user_attrs["gancore.worker"] for x in t}) == 2  # one trial per worker process
    return t


@needs_mnist
def test_journal_storage_with_two_workers(tmp_path):
    _two_workers_on(tmp_path, f"journal:{tmp_path / 'study.log'}", "journal")
    assert (tmp_path / "study.log").stat().st_size > 0


PG_URL = os.environ.get("GANCORE_TEST_PG_URL")


@needs_mnist
@needs_pg
def test_postgresql_storage_with_two_workers_and_heartbeats(tmp_path):
    study = f"pg-{uuid.uuid4().hex[:8]}"
    try:
        _two_workers_on(tmp_path, PG_URL, study)
        sweep = load_sweep(sweep_file(tmp_path, study=study, n_trials=2, tracked=False), storage=PG_URL)
        storage = sw.open_storage(PG_URL, sweep)
        assert storage.get_heartbeat_interval() == sweep.heartbeat_interval
    finally:
        optuna.delete_study(study_name=study, storage=PG_URL)


def test_unreachable_storage_is_one_line_and_exit_2(tmp_path):
    p = cli(str(sweep_file(tmp_path)), "--storage", "postgresql://gancore:secret@127.0.0.1:1/x", cwd=tmp_path)
    out, _ = helpers.finish(p, timeout=60, what="a sweep on an unreachable storage")
    lines = [x for x in out.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, out
    assert lines[0].startswith("error: cannot open study storage postgresql://gancore:***@127.0.0.1:1/x")
    assert "refused" in lines[0] and "secret" not in out


# ----------------------------------------------------------------------------------------------------------------
# Several trials per device: `workers: auto` takes the best K that bench/trials_per_device.py measured here


def test_auto_workers_use_the_measured_best_k(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("GANCORE_CACHE", str(tmp_path / "cache"))
    sweep = load_sweep(sweep_file(tmp_path, workers="auto"))
    assert sweep.workers == "auto"
    devices = max(1, torch.cuda.device_count())
    n, why = sweep_workers.auto_workers(sweep, "local")
    assert n == sweep_devices.DEFAULT_TRIALS_PER_DEVICE * devices and "measure with bench/trials_per_device.py" in why
    best, path = sweep_devices.record_trials_per_device("none", {1: 100.0, 2: 180.0, 4: 240.0, 8: 230.0})
    assert best == 4 and path == tmp_path / "cache" / "trials_per_device.json"
    n, why = sweep_workers.auto_workers(sweep, "local")
    assert n == 4 * devices and "measured on" in why
    # a measurement under another train.compile mode on this device is the next best guess
    assert sweep_devices.trials_per_device("cudagraph")[0] == 4
    assert sweep_workers.auto_workers(sweep, "slurm")[0] == sweep_devices.DEFAULT_TRIALS_PER_DEVICE
    path.write_text("{not json")
    assert sweep_devices.trials_per_device("none") == (sweep_devices.DEFAULT_TRIALS_PER_DEVICE,
                                                       "default; measure with bench/trials_per_device.py --save")
    with pytest.raises(SweepError, match="workers: expected a positive integer or auto, got 'many'"):
        load_sweep(sweep_file(tmp_path, study="bad", workers="many"))


def test_sweep_cli_rejects_bad_workers(tmp_path):
    p = helpers.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), str(sweep_file(tmp_path)), "--workers", "0"],
                    cwd=tmp_path, timeout=120, what="sweep.py --workers 0")
    assert p.returncode == 2 and "expected a positive integer or auto, got '0'" in p.stderr


def _pop_all(url: str, queue, barrier) -> None:
    study = optuna.load_study(study_name="race", storage=sw.open_storage(url))
    barrier.wait(timeout=60)  # all three started (else BrokenBarrierError, and the test's queue.get fails)
    got = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:  # what study.optimize does for queued trials
        got.append(trial_id)
    queue.put(got)


def test_sqlite_workers_never_pop_the_same_queued_trial(tmp_path):
    """Three processes pop 60 queued trials at once: each trial exactly once (before BEGIN IMMEDIATE, this ran
    70 pops for 60 trials here: re-queued trials were trained twice)."""
    import multiprocessing as mp

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=sw.open_storage(url))
    for i in range(60):
        study.enqueue_trial({"x": i}, skip_if_exists=False)
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_pop_all, args=(url, queue, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        popped = []
        for _ in procs:
            try:
                popped += queue.get(timeout=120)
            except Empty:
                raise AssertionError("a popping process's trial ids: none after 120 s") from None
        for p in procs:
            helpers.join(p, timeout=60, what=f"popping process {p.pid}")
    finally:
        for p in procs:
            p.kill()
    assert sorted(popped) == sorted(t._trial_id for t in study.get_trials())


@needs_mnist
def test_a_sweep_that_fails_its_checks_leaves_nothing_behind(tmp_path, monkeypatch):
    """A wrong objective is found before anything is written; a check that fails after the storage was opened (here
    the metric caches) removes the study file and the folders it made; an existing study's file is never removed."""
    from gancore.errors import MetricsError

    bad = load_sweep(sweep_file(tmp_path, objective="fid_lenet_100"))  # the trials report fid_lenet_200
    with pytest.raises(SweepError, match="objective fid_lenet_100 is not what the trials report: fid_lenet_200"):
        sweep_run.run_sweep(bad, workers=1)
    assert not (tmp_path / "sweeps").exists()

    def fails(*a, **k):
        raise MetricsError("no extractor weights (simulated)")

    good = load_sweep(sweep_file(tmp_path))
    monkeypatch.setattr(sweep_run, "_warm_metrics", fails)
    with pytest.raises(MetricsError, match="simulated"):
        sweep_run.prepare(good)
    assert not (tmp_path / "sweeps").exists()
    monkeypatch.undo()
    study, _ = sweep_run.prepare(good)  # a real study now
    db = tmp_path / "sweeps" / "tiny" / "optuna.db"
    assert db.is_file()
    monkeypatch.setattr(sweep_run, "_warm_metrics", fails)
    with pytest.raises(MetricsError):
        sweep_run.prepare(good)
    assert db.is_file() and optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").study_name == "tiny"
