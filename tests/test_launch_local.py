"""gancore.cluster without Slurm: the local executor returns results, checkpoint() resumes, run lists, CLI errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

from conftest import ROOT, needs_mnist
from gancore.cluster.job import TrainJob
from gancore.cluster.rendezvous import master_port, rendezvous_env
from gancore.cluster.resources import Resources, parse_mem_gb, parse_time_min
from gancore.cluster.runs import collect, expand_runs, parse_seeds, read_sets_file, result_lines, submit_runs
from gancore.errors import LaunchError
from gancore.train import state as ckpt

CONFIG = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["data.subset=64", "optim.batch_size=32", "train.epochs=1", "train.progress=false", "train.log_every=1",
        "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,1]]", "train.grid_size=16", "track.image_every=2", "eval.n_samples=0", "eval.every=0"]  # 2 steps
SUBMIT = [sys.executable, str(ROOT / "jobs" / "submit.py")]


def _finished(job, timeout: float = 240):
    """job.result() once the job is done; submitit's own wait has no deadline, so a stuck job would hang the test."""
    helpers.wait_for(job.done, timeout=timeout, what=f"local job {job.job_id} done", interval=0.5)
    return job.result()


@needs_mnist
def test_local_executor_runs_and_returns_the_result(tmp_path):
    store = tmp_path / "mlruns" / "mlflow.db"
    runs = expand_runs([*TINY, f"track.uri=sqlite:///{store}"])
    (sub,) = submit_runs("local", CONFIG, runs, Resources(time="20"), out="r", folder=tmp_path / "sub")
    assert sub.job_obj.out == str(tmp_path / "r") and sub.job_obj.resume is None
    result = _finished(sub.job)
    assert result.status == "finished" and result.step == result.total_steps == 2
    assert Path(result.run_dir) == tmp_path / "r" and ckpt.latest(tmp_path / "r").name == "step_00000002.pt"
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{store}").get_run(result.run_id).info.status == "FINISHED"
    assert result_lines(collect([sub]))[0].endswith(f"finished 2/2 steps; MLflow run {result.run_id}; run dir r")


@needs_mnist
def test_checkpoint_resubmits_the_same_run_with_resume_auto(tmp_path):
    import submitit

    from gancore.config import load_config
    from gancore.train.loop import fit

    job = TrainJob(CONFIG, tuple([*TINY, "train.epochs=2", "track.enabled=false"]), str(tmp_path / "r"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job
    assert (again.resume, again.out, again.overrides, again.config) == ("auto", job.out, job.overrides, job.config)
    assert delayed.args == () and delayed.kwargs == {}
    assert job.resume is None  # the original is unchanged
    # what submitit does after a preemption: the run stopped with a checkpoint, the requeued job resumes it
    stopped = fit(load_config(CONFIG, list(job.overrides)), out=job.out, stop_after=1)
    assert stopped.status == "stopped" and stopped.step == 1
    result = delayed.result()
    assert result.status == "finished" and result.step == 4 and Path(result.run_dir) == tmp_path / "r"


class SignalHandler:
    """Stands in for submitit's handler (matched by class name): records the requeue request."""

    def __init__(self):
        self.calls = []

    def checkpoint_and_try_requeue(self, signum, frame):
        self.calls.append(signum)


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR2, True), (signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_stopped_job_hands_over_to_submitit_except_on_sigterm(tmp_path, monkeypatch, sig, requeued):
    import gancore.train.loop
    from gancore.train.loop import RunResult

    stopped = RunResult(tmp_path, "rid", 3, 8, "stopped", tmp_path / "c.pt", stop_signal=sig)
    monkeypatch.setattr(gancore.train.loop, "fit", lambda cfg, out, resume: stopped)
    handler = SignalHandler()
    old = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        assert TrainJob(CONFIG, tuple(TINY), str(tmp_path / "r"))() is stopped
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert handler.calls == ([signal.SIGUSR2] if requeued else [])  # SIGTERM = scancel: requeueing would undo it


def test_run_lists_cross_sets_and_seeds(tmp_path):
    f = tmp_path / "sets.txt"
    f.write_text("# lr sweep\noptim.lr_g=1e-4 optim.lr_d=1e-4\n\noptim.lr_g=2e-4  # default\n")
    sets = read_sets_file(f)
    assert sets == [["optim.lr_g=1e-4", "optim.lr_d=1e-4"], ["optim.lr_g=2e-4"]]
    runs = expand_runs(["train.epochs=1"], sets, [0, 1])
    assert [r.overrides for r in runs] == [
        ("train.epochs=1", "optim.lr_g=1e-4", "optim.lr_d=1e-4", "train.seed=0"),
        ("train.epochs=1", "optim.lr_g=1e-4", "optim.lr_d=1e-4", "train.seed=1"),
        ("train.epochs=1", "optim.lr_g=2e-4", "train.seed=0"),
        ("train.epochs=1", "optim.lr_g=2e-4", "train.seed=1"),
    ]
    assert runs[3].label == "optim.lr_g=2e-4 train.seed=1"
    assert [r.overrides for r in expand_runs(["a=1"])] == [("a=1",)]
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(LaunchError, match="bad --seeds"):
        parse_seeds("0,x")


@pytest.mark.parametrize("text,minutes", [("90", 90), ("4:00:00", 240), ("1:30", 2), ("1-00:00:00", 1440), ("2-12", 3600)])
def test_parse_time(text, minutes):
    assert parse_time_min(text) == minutes


def test_parse_mem_and_bad_values():
    assert parse_mem_gb("16G") == 16 and parse_mem_gb("512M") == 0.5 and parse_mem_gb("2") == 2
    with pytest.raises(LaunchError, match="bad --mem"):
        parse_mem_gb("lots")
    with pytest.raises(LaunchError, match="bad --time"):
        parse_time_min("4h")


def test_master_port_from_job_id():
    assert master_port("123") == 20123 and master_port("45_3") == 20453 and master_port(None) == 20000


def test_rendezvous_env_two_nodes_of_four_tasks():
    hosts = ["node-a", "node-b"]
    envs = [rendezvous_env("4711", hosts, num_tasks=8, num_nodes=2, global_rank=r, local_rank=r % 4) for r in range(8)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(8)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] * 2
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {
        ("node-a", "24711", "8", "4")}


def test_rendezvous_cli_prints_what_train_sh_evals(capsys):
    from gancore.cluster import rendezvous

    assert rendezvous.main(["--job-id", "4711", "--tasks", "8", "--nodes", "2", "node-a", "node-b"]) == 0
    assert capsys.readouterr().out == "export MASTER_ADDR=node-a MASTER_PORT=24711 WORLD_SIZE=8 LOCAL_WORLD_SIZE=4\n"


@pytest.mark.parametrize("script", ["train.sh", "sweep.sh"])
def test_sbatch_headers_mirror_the_resource_defaults(script):
    text = (ROOT / "slurm" / script).read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.MULTILINE))
    res = Resources()
    assert (header["nodes"], header["cpus-per-task"], header["mem"]) == (str(res.nodes), str(res.cpus), res.mem)
    assert parse_time_min(header["time"]) == parse_time_min(res.time)


@needs_mnist
def test_submit_cli_local_wait(tmp_path):
    p = helpers.run([*SUBMIT, "--cluster", "local", "--config", CONFIG, *TINY, "track.enabled=false",
                     "--set", "optim.lr_g=1e-4", "--set", "optim.lr_g=3e-4", "--time", "20", "--wait", "--poll", "1"],
                    timeout=240, what="submit.py --cluster local --wait")
    assert p.returncode == 0, p.stdout + p.stderr
    submitted = [ln for ln in p.stdout.splitlines() if ln.startswith("submitted ")]
    assert len(submitted) == 2 and all(" log logs/submitit/" in ln for ln in submitted)
    finished = [ln for ln in p.stdout.splitlines() if ": finished 2/2 steps;" in ln]
    assert len(finished) == 2 and "optim.lr_g=1e-4" in finished[0] and "optim.lr_g=3e-4" in finished[1]
    assert sorted(d.name[-3:] for d in (tmp_path / "runs").iterdir()) == ["-00", "-01"]


def _cli_error(*args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **({"PATH": env_path} if env_path is not None else {})}
    return helpers.run([*SUBMIT, *args], timeout=240, env=env, what=f"submit.py {' '.join(args)}")


def test_submit_cli_without_slurm_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    p = _cli_error("--cluster", "slurm", "--config", CONFIG, env_path=str(empty))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: sbatch not found on PATH (no Slurm client here); "
                                             "use --cluster local to run on this machine"]
    # sbatch present but the controller does not answer
    for name, body in (("sbatch", "exit 0"), ("sinfo", "echo 'sinfo: error: Unable to contact slurm controller' >&2; exit 1")):
        (empty / name).write_text(f"#!/bin/sh\n{body}\n")
        (empty / name).chmod(0o755)
    p = _cli_error("--cluster", "slurm", "--config", CONFIG, env_path=f"{empty}:/usr/bin:/bin")
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: sinfo failed: sinfo: error: Unable to contact slurm controller; "
                                "use --cluster local to run on this machine")


def test_submit_cli_bad_input_is_exit_2(tmp_path):
    p = _cli_error("--cluster", "local", "--config", CONFIG, "--set", "optim.lr_gg=1")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "optim.lr_gg" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _cli_error("--cluster", "local", "--config", CONFIG, "--time", "soon")
    assert p.returncode == 2 and "bad --time 'soon'" in p.stderr
    p = _cli_error("--cluster", "local", "--sweep-file", "missing.txt")  # the deprecated name still works
    assert p.returncode == 2 and "sets file 'missing.txt' not found" in p.stderr
    assert "warning: --sweep-file is deprecated; use --sets-file" in p.stderr
    p = _cli_error("--cluster", "local", "--sets-file", "missing.txt")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: sets file 'missing.txt' not found"]
