"""Data-parallel training on this CPU (gloo, 2 processes): one run, disjoint data shards, an exact multi-process
resume, stop signals that reach one rank or all, and the launchers users type (torchrun, accelerate launch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from conftest import ROOT, launch_ranks, needs_mnist, state_diffs, wait_ranks

from gancore.config import load_config
from gancore.data import DeviceLoader
from gancore.metrics import fidelity
from gancore.train.rundir import RunDir
from gancore.train import state as ckpt

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# 60 steps of a small DCGAN on 16x16 MNIST, global batch 32 (16 per rank), 16 steps per epoch: the run crosses
# three epoch ends and stops mid-epoch, so per-rank epoch statistics matter too.
STEPS = 60
TINY = ["data.subset=512", "optim.batch_size=32", "model.arch=dcgan", "data.image_size=16", "model.nz=16",
        "model.ngf=8", "model.ndf=8", f"train.max_steps={STEPS}", "train.checkpoint_every=20", "train.log_every=5",
        "train.progress=false", "track.image_every=30", "track.system_metrics=false", "train.grid_size=16",
        "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,4]]", "eval.n_samples=0", "eval.every=0"]
STATE_KEYS = ("step", "world_size", "ranks", "networks", "optimizers", "ema", "scaler", "rng", "loader", "history",
              "epoch_stats", "best")
TIMEOUT = 240


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["--config", QUICKSTART, *TINY, *extra, "--out", str(out)]


def _assert_same_state(final: Path, reference: Path) -> None:
    a, b = ckpt.load(final), ckpt.load(reference)
    assert a["step"] == STEPS and a["world_size"] == 2 and len(a["ranks"]) == 2
    for key in STATE_KEYS:
        assert state_diffs(a[key], b[key]) == [], key


def _run(cmd: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return helpers.run(cmd, timeout=timeout, what=" ".join(cmd[:4]),
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def test_each_rank_draws_a_disjoint_share_of_the_global_batch():
    x = torch.arange(96, dtype=torch.uint8).view(96, 1, 1, 1)
    y = torch.zeros(96, dtype=torch.long)
    single = DeviceLoader(x, y, 32, seed=3, device=torch.device("cpu"))
    ranks = [DeviceLoader(x, y, 32, seed=3, device=torch.device("cpu"), rank=r, world=2) for r in range(2)]
    seen = []
    for _ in range(3 * single.steps_per_epoch + 1):  # across epoch ends
        whole = single.next()[0].flatten().tolist()
        parts = [r.next()[0].flatten().tolist() for r in ranks]
        assert [len(p) for p in parts] == [16, 16]
        assert not set(parts[0]) & set(parts[1])  # disjoint within the step
        assert sorted(parts[0] + parts[1]) == sorted(whole)  # together: the one-process batch
        seen += parts[0] + parts[1]
    assert sorted(seen[:96]) == list(range(96))  # and every image once per epoch
    with pytest.raises(Exception, match="not divisible by the 2 processes"):
        DeviceLoader(x, y, 33, seed=3, device=torch.device("cpu"), rank=0, world=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run (ranks started directly, as srun starts them): its final checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    procs = launch_ranks(_train_args(root / "run", "track.enabled=false"), root)
    assert wait_ranks(procs, root, TIMEOUT) == [0, 0], (root / "rank0.log").read_text()[-3000:]
    return ckpt.step_path(root / "run", STEPS)


@needs_mnist
def test_torchrun_is_one_data_parallel_run_with_one_mlflow_run(tmp_path, reference):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(ROOT / "jobs" / "train.py"), *_train_args(tmp_path / "run", f"track.uri={uri}")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("done: 60 steps") == 1  # rank 0 reports, the other rank is quiet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "store"]  # one run dir, nothing else written
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["gancore.world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "Loss/D")]
    # every log_every steps and at each epoch end, by rank 0 only: no step twice
    assert steps == sorted({*range(5, STEPS + 1, 5), 16, 32, 48})
    _assert_same_state(ckpt.step_path(tmp_path / "run", STEPS), reference)  # torchrun = the srun-style launch


@needs_mnist
def test_accelerate_launch_stop_and_resume_is_bit_identical(tmp_path, reference):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(ROOT / "jobs" / "train.py"), *_train_args(tmp_path / "run", "track.enabled=false")]
    r = _run([*launch, "--stop-after", "25"])
    assert "exitcode  : 75" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]  # stopped, checkpointed
    stopped = ckpt.latest(tmp_path / "run")
    assert stopped.name == "step_00000025.pt" and ckpt.load(stopped)["world_size"] == 2

    # another number of processes: refused in one line, nothing written
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    one = _run([sys.executable, str(ROOT / "jobs" / "train.py"), *_train_args(tmp_path / "run", "track.enabled=false"),
                "--resume", "auto"])
    assert one.returncode == 2, one.stderr
    lines = one.stderr.strip().splitlines()
    assert len(lines) == 1 and "2-process run" in lines[0] and "resume it with 2" in lines[0], one.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before

    r = _run([*launch, "--resume", "auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_same_state(ckpt.step_path(tmp_path / "run", STEPS), reference)


@needs_mnist
@pytest.mark.parametrize("sig, to_ranks", [(signal.SIGUSR1, [1]), (signal.SIGTERM, [0, 1])],
                         ids=["USR1-to-rank-1-only", "TERM-to-every-rank"])
def test_a_signal_stops_every_rank_at_one_step_and_the_resume_is_exact(tmp_path, reference, sig, to_ranks):
    run_dir = tmp_path / "run"
    # every rank waits at step 25 until a signal reaches any of them (GANCORE_TEST_HOLD_AT_STEP, gancore/train/
    # signals.py): however fast this machine, the run is mid-run when the signal lands
    procs = launch_ranks(_train_args(run_dir, "track.enabled=false", "--resume", "auto"), tmp_path,
                         env={"GANCORE_TEST_HOLD_AT_STEP": "25"})
    first = ckpt.step_path(run_dir, 20)
    logs = [tmp_path / f"rank{r}.log" for r in range(len(procs))]
    helpers.wait_for(first.exists, timeout=TIMEOUT, what=f"the checkpoint at step 20 ({first.name})", proc=procs,
                     log=logs)
    for r in to_ranks:
        os.kill(procs[r].pid, sig)
    # every rank stops, none is left in a collective; rank 0 carries the exit code (jobs/train.py says why)
    assert wait_ranks(procs, tmp_path, TIMEOUT) == [75, 0]
    stopped = ckpt.latest(run_dir)
    step = RunDir.step_of(stopped)
    assert step == 30, stopped  # the ranks agree on the step at their next agreement (every 10 steps)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == [first.name, stopped.name]
    log = (tmp_path / "rank0.log").read_text()
    assert f"stopped at step {step}/{STEPS}" in log, log

    procs = launch_ranks(_train_args(run_dir, "track.enabled=false", "--resume", "auto"), tmp_path)
    assert wait_ranks(procs, tmp_path, TIMEOUT) == [0, 0]
    _assert_same_state(ckpt.step_path(run_dir, STEPS), reference)


@needs_mnist
def test_a_signal_to_the_other_rank_ends_a_long_evaluation_on_rank_0(tmp_path):
    """Only rank 0 evaluates; the other rank waits in ticks with it, so USR1 that reaches rank 1 alone still ends
    rank 0's evaluation of a million images within a batch; both exit (75, 0) with the final checkpoint kept, and the
    resume (a smaller eval.n_samples: infrastructure) runs the missing evaluation on 2 processes again."""
    run_dir = tmp_path / "run"
    evals = ["eval.extractor=lenet_mnist", "eval.metrics=[fid]", "track.enabled=false", "--resume", "auto"]
    procs = launch_ranks(_train_args(run_dir, "eval.n_samples=1000000", *evals), tmp_path)
    final, logs = ckpt.step_path(run_dir, STEPS), [tmp_path / f"rank{r}.log" for r in range(len(procs))]
    # the final checkpoint comes before the final evaluation
    helpers.wait_for(final.exists, timeout=TIMEOUT, what=f"the final checkpoint {final.name}", proc=procs, log=logs)
    # inside the evaluation: its real statistics are cached (this test's $GANCORE_CACHE, which the ranks inherit),
    # the generated batches (hours) are under way
    stats = fidelity.stats_path(load_config(None, []), "", "", torch.zeros(0, dtype=torch.uint8)).parent
    helpers.wait_for(lambda: any(stats.glob("*.npz")), timeout=TIMEOUT, what=f"the real statistics in {stats}",
                     proc=procs, log=logs)
    os.kill(procs[1].pid, signal.SIGUSR1)
    assert wait_ranks(procs, tmp_path, TIMEOUT) == [75, 0]  # a hang guard: unstopped, it runs for hours
    assert ckpt.load(final)["eval_pending"] is True and ckpt.latest(run_dir) == final
    assert f"stopped at step {STEPS}/{STEPS}" in (tmp_path / "rank0.log").read_text()
    procs = launch_ranks(_train_args(run_dir, "eval.n_samples=200", *evals), tmp_path)
    assert wait_ranks(procs, tmp_path, TIMEOUT) == [0, 0]
    assert "fid_lenet_200 = " in (tmp_path / "rank0.log").read_text()
    assert ckpt.load(final)["eval_pending"] is False
