"""Against a real Slurm (../shared/slurm/slurm-up.sh): sbatch and submitit runs, preemption and time-limit requeue.

Every job runs on this machine in the test's tmp dir, with its own SQLite MLflow store. A preempted / signalled job
must requeue, resume from its checkpoint into ONE MLflow run and end bit-identical to an uninterrupted run.
The time-limit warning is simulated with `scancel --batch --signal=USR1` (what Slurm sends at --signal=B:USR1@120).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import helpers
import pytest
import torch

from conftest import ROOT, launch_ranks, needs_mnist, state_diffs, wait_ranks
from gancore.train import state as ckpt
from gancore.cluster.resources import slurm_problem

_PROBLEM = slurm_problem()
_REQUIRED = os.environ.get("GANCORE_REQUIRE_SLURM") == "1"  # .ci/run started Slurm: a skip would hide a failure
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(600),  # above the suite's default: each test waits on real jobs (WAIT_S, then a clear error)
    needs_mnist,
    pytest.mark.skipif(_PROBLEM is not None and not _REQUIRED,
                       reason=f"no Slurm: {_PROBLEM}; start one with bash ../shared/slurm/slurm-up.sh"),
]


@pytest.fixture(autouse=True)
def _slurm_is_up():
    if _PROBLEM is not None:
        pytest.fail(f"GANCORE_REQUIRE_SLURM=1 but Slurm is not usable: {_PROBLEM}")

CONFIG = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["data.subset=128", "optim.batch_size=32", "train.progress=false", "train.snapshot_epochs=[1,2]",
        "train.loss_ranges=[[1,1],[2,2]]", "train.grid_size=16", "eval.n_samples=0", "eval.every=0"]  # 4 steps per epoch
SHORT = [*TINY, "train.epochs=2", "train.log_every=1", "track.image_every=4"]  # 8 steps
# Long enough to be interrupted after its first checkpoint (step 4): 48 steps.
LONG = [*TINY, "train.max_steps=48", "train.checkpoint_every=4", "train.log_every=4", "track.image_every=24"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
WAIT_S = 480  # generous (other jobs may share the 2 cores), and below the per-test timeout so the wait's own message shows


def _env() -> dict[str, str]:
    # one thread: the jobs and the reference run compute identically, and two jobs share 2 cores fairly
    return {**os.environ, "GANCORE_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _sh(*cmd: str, **kw) -> str:
    p = helpers.run(list(cmd), timeout=60, what=" ".join(cmd), **kw)
    assert p.returncode == 0, f"{' '.join(cmd)}: exit code {p.returncode}: {p.stdout}{p.stderr}"
    return p.stdout.strip()


def _cancel(ids: list[str]) -> None:
    for jid in ids:
        helpers.run(["scancel", jid], timeout=60, what=f"scancel {jid}")


@pytest.fixture
def jobs():
    """Job ids submitted by a test; whatever is still queued or running afterwards is cancelled."""
    ids: list[str] = []
    yield ids
    _cancel(ids)


@pytest.fixture
def sweep_arrays(monkeypatch):
    """The job ids of the Slurm arrays a sweep started in this process submits (recorded as gancore.cluster.array
    submits them); whatever is still queued or running afterwards is cancelled."""
    from gancore.cluster import array

    ids: list[str] = []
    make = array.make_executor

    def recording(*args, **kw):
        ex = make(*args, **kw)
        map_array = ex.map_array

        def submit(*a, **k):
            submitted = map_array(*a, **k)
            ids.extend(str(j.job_id) for j in submitted)
            return submitted

        ex.map_array = submit
        return ex

    monkeypatch.setattr(array, "make_executor", recording)
    yield ids
    _cancel(ids)


def sbatch(jobs: list[str], *args: str) -> str:
    Path("logs").mkdir(exist_ok=True)
    jid = _sh("sbatch", "--parsable", *args, env=_env()).split(";")[0]
    jobs.append(jid)
    return jid


def state(jid: str) -> str:
    """The job's current state: squeue while slurmctld knows it, else sacct (which lags a little)."""
    out = helpers.run(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%T"], timeout=60,
                      what=f"squeue -j {jid}").stdout.split()
    if out:
        return out[0]
    rows = helpers.run(["sacct", "-n", "-X", "-P", "-j", jid, "-o", "State"], timeout=60,
                       what=f"sacct -j {jid}").stdout.split("\n")
    rows = [r.split()[0] for r in rows if r.strip()]
    return rows[-1] if rows else "UNKNOWN"


def wait_done(jid: str, timeout: float = WAIT_S) -> str:
    """The job's final state, once it has one."""
    return helpers.wait_for(lambda: (s := state(jid)) in TERMINAL and s, timeout=timeout, interval=2,
                            what=lambda: f"job {jid} in a final state (now {state(jid)})")


def wait_for_checkpoint(run_dir: Path, jid: str, timeout: float = WAIT_S) -> None:
    """Until the job wrote its first step checkpoint (it is mid-run then: an interruption has something to resume)."""
    def written() -> bool:
        if ckpt.latest(run_dir) is not None:
            return True
        assert (s := state(jid)) not in TERMINAL, f"job {jid} ended ({s}) before writing a checkpoint"
        return False

    helpers.wait_for(written, timeout=timeout, interval=0.5,
                     what=lambda: f"job {jid}'s first checkpoint in {run_dir} (job {state(jid)})")


def _sacct_states(jid: str, *args: str) -> list[tuple[str, str]]:
    """(JobID, State) rows of `sacct -j jid ARGS`."""
    rows = _sh("sacct", "-n", "-P", "-j", jid, *args, "-o", "JobID,State").split("\n")
    return [(r.split("|")[0], r.split("|")[1].split()[0]) for r in rows if r.strip()]


def runs_of(jid: str) -> list[str]:
    """Every run of the job in order (`sacct -D` lists each requeued run), polled until the last one is final
    (sacct lags the controller a little)."""
    def final() -> list[str] | None:
        states = [st for _, st in _sacct_states(jid, "-X", "-D")]
        return states if states and states[-1] in TERMINAL else None

    return helpers.wait_for(final, timeout=60, interval=1, what=lambda: f"sacct -D listing job {jid}'s last run as "
                            f"final (it lists {[st for _, st in _sacct_states(jid, '-X', '-D')]})")


def mlflow_runs(store: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


def preempt_all_cpus(jobs: list[str]) -> str:
    """A short job on the high-priority partition that needs every CPU: it preempts the jobs on `debug`."""
    return sbatch(jobs, "-p", "urgent", "--exclusive", "--time=5", "-o", "logs/urgent-%j.out", "--wrap", "sleep 1")


def _pending_signals(pid: int) -> int:
    """The signals pending on a process (thread + process-wide masks from /proc), as a bit mask; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def preempt_while_frozen(jobs: list[str], jid: str, timeout: float = 120) -> str:
    """Preempt job `jid` while it is certainly mid-run: its processes are stopped (SIGSTOP) before the urgent job
    is submitted and continued only once Slurm's preemption signal (USR1 for sbatch, USR2 for submitit) is pending
    on one of them. Without the freeze a fast machine could finish the remaining steps before the signal came."""
    import signal

    assert state(jid) == "RUNNING", state(jid)
    rows = _sh("scontrol", "listpids", jid).splitlines()[1:]  # PID JOBID STEPID LOCALID GLOBALID
    pids = [int(r.split()[0]) for r in rows if r.split() and r.split()[0].isdigit()]
    assert pids, f"scontrol listpids {jid} found no processes"
    wanted = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGUSR2 - 1))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        urgent = preempt_all_cpus(jobs)
        helpers.wait_for(lambda: any(_pending_signals(pid) & wanted for pid in pids), timeout=timeout, interval=0.2,
                         what=f"Slurm's preemption signal (USR1 or USR2) pending on job {jid}")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return urgent


def assert_same_networks(a: Path, b: Path) -> None:
    """The two checkpoints' networks and optimiser states are bit-identical."""
    sa, sb = ckpt.load(a), ckpt.load(b)
    assert sa["step"] == sb["step"]
    for group in ("networks", "optimizers"):
        assert _differences(sa[group], sb[group], group) == [], f"differs from the uninterrupted run"


def _differences(a, b, path: str) -> list[str]:
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    same = torch.equal(a, b) if torch.is_tensor(a) else a == b
    return [] if same else [path]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted LONG run (outside Slurm, same thread count); started once, in the background."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", CONFIG, *LONG,
                             "track.enabled=false", "--out", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def final_checkpoint() -> Path:
        text, _ = helpers.finish(proc, timeout=WAIT_S, what="the uninterrupted reference run")
        assert proc.returncode == 0, text
        return ckpt.latest(out)

    yield final_checkpoint
    helpers.stop(proc, grace=0)


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory):
    """The uninterrupted LONG run as 2 processes (ranks started as srun starts them, outside Slurm)."""
    root = tmp_path_factory.mktemp("reference2")
    procs = launch_ranks(["--config", CONFIG, *LONG, "track.enabled=false", "--out", str(root / "run")], root)

    def final_checkpoint() -> Path:
        assert wait_ranks(procs, root, WAIT_S) == [0, 0], (root / "rank0.log").read_text()[-3000:]
        return ckpt.latest(root / "run")

    yield final_checkpoint
    for p in procs:
        helpers.stop(p, grace=0)


def check_resumed_job(jid: str, run_dir: Path, store: Path, reference_ckpt: Path) -> list[str]:
    """One requeue (sacct -D), one FINISHED MLflow run tagged with the job id, weights equal to the reference."""
    runs = runs_of(jid)
    assert len(runs) >= 2 and runs[0] in ("REQUEUED", "PREEMPTED") and runs[-1] == "COMPLETED", runs
    client, found = mlflow_runs(store)
    assert len(found) == 1, [r.info.run_id for r in found]
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["gancore.slurm_job_id"] == jid
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "Loss/D")]
    assert steps == sorted(set(steps)) and steps[-1] == 48, steps  # no step logged twice across the requeue
    final = ckpt.latest(run_dir)
    assert final.name == "step_00000048.pt"
    assert ckpt.load(final)["run_id"] == run.info.run_id
    assert_same_networks(final, reference_ckpt)
    return runs


# ----------------------------------------------------------------------------------------------------------------


def test_sbatch_tiny_run_finishes_into_mlflow(tmp_path, jobs):
    store = tmp_path / "mlruns" / "mlflow.db"
    jid = sbatch(jobs, "--cpus-per-task=1", "--mem=2G", "--time=20", str(ROOT / "slurm" / "train.sh"),
                 "--config", CONFIG, *SHORT, f"track.uri=sqlite:///{store}")
    assert wait_done(jid) == "COMPLETED", (tmp_path / f"logs/gancore-{jid}.out").read_text()
    log = (tmp_path / "logs" / f"gancore-{jid}.out").read_text()
    assert f"done: 8 steps; run dir runs/slurm-{jid}" in log
    assert ckpt.latest(tmp_path / "runs" / f"slurm-{jid}").name == "step_00000008.pt"
    client, found = mlflow_runs(store)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["gancore.slurm_job_id"] == jid
    assert {"Loss/D", "Loss/G", "D/real", "D/fake"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "Loss/D")] == list(range(1, 9))


def test_submit_cli_slurm_wait_returns_results(tmp_path, jobs):
    store = tmp_path / "mlruns" / "mlflow.db"
    out, err = tmp_path / "submit.out", tmp_path / "submit.err"
    with out.open("w") as o, err.open("w") as e:  # files, not pipes: what was submitted is known even on a timeout
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "submit.py"), "--cluster", "slurm", "--config",
                                 CONFIG, *SHORT, "train.epochs=1", "train.snapshot_epochs=[1]",
                                 "train.loss_ranges=[[1,1]]", f"track.uri=sqlite:///{store}", "--seeds", "0,1",
                                 "--cpus", "1", "--mem", "2G", "--time", "20", "--wait", "--poll", "2"],
                                stdout=o, stderr=e, text=True, env=_env())
    try:
        code = helpers.wait_exit(proc, timeout=WAIT_S, what="submit.py --cluster slurm --wait", log=[out, err])
    finally:
        helpers.stop(proc)
        submitted = [ln.split()[1] for ln in out.read_text().splitlines() if ln.startswith("submitted ")]
        jobs.extend(j.split("_")[0] for j in submitted)
    p = subprocess.CompletedProcess(proc.args, code, out.read_text(), err.read_text())
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(submitted) == 2 and submitted[0].endswith("_0") and submitted[1].endswith("_1")  # one job array
    assert "log logs/submitit/" in p.stdout
    done = [ln for ln in p.stdout.splitlines() if ": finished 4/4 steps; MLflow run " in ln]
    assert len(done) == 2, p.stdout
    _, found = mlflow_runs(store)
    assert sorted(r.data.params["train.seed"] for r in found) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in found)
    array_id = submitted[0].split("_")[0]
    assert {r.data.tags.get("gancore.slurm_array_job_id") for r in found} == {array_id}
    assert sorted(r.data.tags.get("gancore.slurm_array_task_id") for r in found) == ["0", "1"]
    assert all(r.data.tags.get("gancore.slurm_job_id") for r in found)


def test_preempted_sbatch_job_requeues_and_resumes_bit_identical(tmp_path, jobs, reference):
    store = tmp_path / "mlruns" / "mlflow.db"
    jid = sbatch(jobs, "-p", "debug", "--cpus-per-task=1", "--mem=2G", "--time=20", str(ROOT / "slurm" / "train.sh"),
                 "--config", CONFIG, *LONG, f"track.uri=sqlite:///{store}", "--out", "victim")
    wait_for_checkpoint(tmp_path / "victim", jid)
    urgent = preempt_while_frozen(jobs, jid)
    assert wait_done(jid) == "COMPLETED"
    assert wait_done(urgent) == "COMPLETED"
    log = (tmp_path / "logs" / f"gancore-{jid}.out").read_text()
    assert "got SIGUSR1" in log and "stopped at step" in log and "(restart 1)" in log, log
    check_resumed_job(jid, tmp_path / "victim", store, reference())


def test_two_task_sbatch_job_preempted_resumes_bit_identical_to_two_processes(tmp_path, jobs, reference_2):
    # sbatch --ntasks-per-node=2: two ranks (gloo) through srun and gancore.cluster.rendezvous; the preemption
    # signal reaches both (srun forwards it), they agree on the stop step and rank 0 writes every rank's state
    store = tmp_path / "mlruns" / "mlflow.db"
    jid = sbatch(jobs, "-p", "debug", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=3G", "--time=20",
                 str(ROOT / "slurm" / "train.sh"), "--config", CONFIG, *LONG, f"track.uri=sqlite:///{store}",
                 "--out", "victim")
    wait_for_checkpoint(tmp_path / "victim", jid)
    urgent = preempt_while_frozen(jobs, jid)
    assert wait_done(jid) == "COMPLETED"
    assert wait_done(urgent) == "COMPLETED"
    log = (tmp_path / "logs" / f"gancore-{jid}.out").read_text()
    assert "2 task(s)" in log and "got SIGUSR1" in log and "stopped at step" in log and "(restart 1)" in log, log
    # rank 0 carried 75 and no rank was killed by srun's --kill-on-bad-exit ("task N: Terminated"); the shell's
    # own "Terminated" afterwards is Slurm ending the batch step of a requeued job
    assert "step ended with exit code 75; requeueing" in log and ": Terminated" not in log, log
    check_resumed_job(jid, tmp_path / "victim", store, reference_2())
    final, ref = ckpt.load(ckpt.latest(tmp_path / "victim")), ckpt.load(reference_2())
    client, (run,) = mlflow_runs(store)
    assert run.data.tags["gancore.world_size"] == "2"
    for key in ("world_size", "ranks", "ema", "rng", "loader", "history", "epoch_stats"):  # beyond the weights
        assert state_diffs(final[key], ref[key]) == [], key


def test_time_limit_warning_checkpoints_and_requeues(tmp_path, jobs, reference):
    # Simulated: the signal Slurm sends 120 s before the time limit (--signal=B:USR1@120), sent now.
    store = tmp_path / "mlruns" / "mlflow.db"
    jid = sbatch(jobs, "--cpus-per-task=1", "--mem=2G", "--time=20", str(ROOT / "slurm" / "train.sh"),
                 "--config", CONFIG, *LONG, f"track.uri=sqlite:///{store}")
    run_dir = tmp_path / "runs" / f"slurm-{jid}"
    wait_for_checkpoint(run_dir, jid)
    _sh("scancel", "--batch", "--signal=USR1", jid)
    assert wait_done(jid) == "COMPLETED"
    log = (tmp_path / "logs" / f"gancore-{jid}.out").read_text()
    assert "got SIGUSR1" in log and "stopped at step" in log and "requeueing job" in log and "(restart 1)" in log, log
    runs = check_resumed_job(jid, run_dir, store, reference())
    assert runs == ["REQUEUED", "COMPLETED"]


def test_preempted_submitit_job_checkpoints_and_resumes(tmp_path, jobs, reference, monkeypatch):
    from gancore.cluster.resources import Resources
    from gancore.cluster.runs import expand_runs, submit_runs

    store = tmp_path / "mlruns" / "mlflow.db"
    res = Resources(cpus=1, mem="2G", time="20", partition="debug")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # sbatch (called by submitit) passes this environment on
    # race-free: the trainer waits at step 6 (after its first checkpoint) until a stop signal arrives (at most
    # 120 s), so the preemption certainly finds it mid-run (SIGSTOP did not work here: submitit's USR2 never
    # showed as pending). The requeued job resumes from step 6 and does not wait again.
    monkeypatch.setenv("GANCORE_TEST_HOLD_AT_STEP", "6")
    (sub,) = submit_runs("slurm", CONFIG, expand_runs([*LONG, f"track.uri=sqlite:///{store}"]),
                         res, out="victim", folder=tmp_path / "submitit")
    jid = str(sub.job.job_id)
    jobs.append(jid)
    wait_for_checkpoint(tmp_path / "victim", jid)
    preempt_all_cpus(jobs)
    wait_done(jid)  # bounded; submitit's result() below has no timeout of its own
    result = sub.job.result()
    assert result.status == "finished" and result.step == 48
    out = sub.log.read_text()
    assert "gancore: stopped at step 6/48" in out and "Calling checkpoint method" in out, out
    check_resumed_job(jid, tmp_path / "victim", store, reference())
    assert result.run_id == mlflow_runs(store)[1][0].info.run_id


def test_scancel_is_final_even_after_a_checkpointed_stop(tmp_path, jobs):
    # scancel sends SIGTERM: the trainer may still checkpoint, but nothing may requeue the job (that would undo it)
    jid = sbatch(jobs, "--cpus-per-task=1", "--mem=2G", "--time=20", str(ROOT / "slurm" / "train.sh"),
                 "--config", CONFIG, *LONG, "track.enabled=false")
    wait_for_checkpoint(tmp_path / "runs" / f"slurm-{jid}", jid)
    _sh("scancel", jid)
    assert wait_done(jid) == "CANCELLED"
    # once the batch step (train.sh) has ended, nothing can requeue the job any more: a `scontrol requeue` from it
    # would have made the job pending again and added a run to sacct -D
    helpers.wait_for(lambda: any(i == f"{jid}.batch" and st in TERMINAL for i, st in _sacct_states(jid)),
                     timeout=120, interval=1,
                     what=lambda: f"job {jid}'s batch step ending (sacct: {_sacct_states(jid)})")
    assert state(jid) == "CANCELLED" and runs_of(jid) == ["CANCELLED"]
    assert "requeueing" not in (tmp_path / "logs" / f"gancore-{jid}.out").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Sweeps (issue #7): workers as a Slurm job array on journal storage (here, not in test_sweep.py: all Slurm tests
# share one file, so parallel test workers never submit to the one-node cluster at the same time)


def _sweep_in_thread(sweep) -> tuple[threading.Thread, dict]:
    """run_sweep(sweep, workers=2, launcher="slurm") in a thread (its waits on the array have no deadline of their
    own); the result dict gets its exit code, or the error it raised."""
    from gancore import sweep as sw

    result: dict = {}

    def coordinate() -> None:
        try:
            result["code"] = sw.run_sweep(sweep, workers=2, launcher="slurm")
        except BaseException as e:  # shown by the test's assert
            result["error"] = repr(e)

    coordinator = threading.Thread(target=coordinate, daemon=True)
    coordinator.start()
    return coordinator, result


def test_sweep_workers_as_a_slurm_job_array_on_journal_storage(tmp_path, sweep_arrays):
    import optuna
    from mlflow.tracking import MlflowClient

    from gancore import sweep as sw
    from gancore.sweep import SweepError, load_sweep
    from test_sweep import child_runs, sweep_file, trials

    slurm = {"cpus": 1, "mem": "2G", "time": "0:15:00"}
    path = sweep_file(tmp_path, study="slurm", n_trials=2, steps=2, slurm=slurm)
    with pytest.raises(SweepError, match="not SQLite"):
        sw.run_sweep(load_sweep(path), workers=2, launcher="slurm")
    sweep = load_sweep(path, storage=f"journal:{tmp_path / 'study.log'}")
    coordinator, result = _sweep_in_thread(sweep)
    helpers.join(coordinator, timeout=WAIT_S, what=lambda: f"the sweep on Slurm array(s) {sweep_arrays}")
    assert result == {"code": 0}, result
    t = trials(sweep)
    assert [x.state.name for x in t] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(sweep.base.track.uri)
    study = optuna.load_study(study_name="slurm", storage=sw.open_storage(sweep.storage_url))
    runs = child_runs(client, study.user_attrs[sw.PARENT_ATTR])
    assert len(runs) == 2 and all(r.data.tags.get("gancore.slurm_array_job_id") for r in runs)  # ran as array tasks


def test_a_killed_slurm_array_worker_loses_no_trial(tmp_path, sweep_arrays):
    """kill -9 of one array task mid-trial: the array ends with a failed task, the coordinator re-queues the dead
    task's trial (journal storage: no heartbeat; the array's end is what tells) and a second array finishes it from
    its checkpoint, in the same MLflow run; the sweep ends 0 with every trial complete."""
    import signal

    import optuna
    import yaml
    from mlflow.tracking import MlflowClient

    from gancore import sweep as sw
    from gancore.sweep import load_sweep
    from test_sweep import child_runs, sweep_file, trials

    path = sweep_file(tmp_path, study="killed", n_trials=3, steps=24, slurm={"cpus": 1, "mem": "2G", "time": "0:15:00"})
    d = yaml.safe_load(path.read_text())
    d["overrides"].update({"eval.every": 8, "train.checkpoint_every": 4})
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    sweep = load_sweep(path, storage=f"journal:{tmp_path / 'study.log'}")
    coordinator, result = _sweep_in_thread(sweep)

    def checkpointed_trial():  # a running trial of an array task with its first checkpoint written
        assert coordinator.is_alive(), f"the sweep ended ({result}) before a trial reached a checkpoint"
        try:
            running = trials(sweep)
        except KeyError:  # the coordinator has not created the study in the journal yet
            return None
        for t in running:
            run_dir = t.user_attrs.get("gancore.run_dir")
            if t.state.name == "RUNNING" and t.user_attrs.get("gancore.slurm_task") and run_dir and \
                    ckpt.latest(Path(run_dir)) is not None:
                return t
        return None

    victim = helpers.wait_for(checkpointed_trial, timeout=WAIT_S, interval=0.2,
                              what=lambda: f"a trial of Slurm array(s) {sweep_arrays} with its first checkpoint")
    pid = int(victim.user_attrs["gancore.worker"].rsplit(":", 2)[1])
    os.kill(pid, signal.SIGKILL)
    helpers.join(coordinator, timeout=WAIT_S, what=lambda: f"the sweep after its worker {pid} was killed (arrays "
                 f"{sweep_arrays})")
    assert result == {"code": 0}, result
    t = trials(sweep)
    states = [x.state.name for x in t]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1, states
    (retry,) = [x for x in t if x.user_attrs.get("gancore.resumes") == victim.user_attrs["gancore.run_dir"]]
    assert retry.state.name == "COMPLETE" and int(retry.user_attrs["gancore.resume_step"]) > 0  # from its checkpoint
    assert "died" in t[victim.number].user_attrs["gancore.interrupted"]
    client = MlflowClient(sweep.base.track.uri)
    study = optuna.load_study(study_name="killed", storage=sw.open_storage(sweep.storage_url))
    runs = child_runs(client, study.user_attrs[sw.PARENT_ATTR])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the killed trial's run continued
