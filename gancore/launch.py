"""submitit glue: executors for Slurm / local / debug, a checkpointable training job, batches of runs.

`jobs/submit.py` is the CLI over this module. The submitted object is `TrainJob`: a callable that runs
`trainer.fit` inside the job. Preemption and time limits work like slurm/train.sh's: Slurm sends submitit's signal
(SIGUSR2, `signal_delay_s` before the limit and at preemption), the trainer finishes its step, writes a checkpoint
and returns "stopped"; then submitit's own handler calls `TrainJob.checkpoint()` -- a copy of the job with
resume="auto" and the same run dir -- and requeues it, so the job continues from the checkpoint in the same MLflow
run. Several runs go out as one Slurm job array (`executor.batch()`).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from gancore.errors import ConfigError, GancoreError

CLUSTERS = ("slurm", "local", "debug")
DEFAULT_FOLDER = "logs/submitit"  # submitit's pickles and the jobs' logs: <folder>/<jobid>_<task>_log.{out,err}
POLL_S = 5.0  # --wait: seconds between status refreshes (one sacct call for all jobs)


class LaunchError(GancoreError):
    """No scheduler, bad resources or a bad run list."""


# ----------------------------------------------------------------------------------------------------------------
# Resources and the scheduler


@dataclass(frozen=True)
class Resources:
    """Per run. GPUs are per node and get one task (= one training process) each; CPUs and memory per task."""

    gpus: int = 0
    nodes: int = 1
    cpus: int | None = None
    mem: str | None = None  # Slurm spelling: 16G, 500M; a bare number is GB
    time: str = "4:00:00"  # Slurm spelling: minutes, H:MM:SS, D-HH[:MM[:SS]]
    partition: str | None = None
    account: str | None = None
    qos: str | None = None

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus)


def parse_time_min(text: str) -> int:
    """Slurm's --time spellings -> whole minutes (rounded up): 90, 1:30:00, 2-00, 1-12:00:00, 45:30 (min:s)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"bad --time {text!r}; use minutes (90), H:MM:SS (4:00:00) or D-HH:MM:SS (1-00:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise LaunchError(f"--time {text!r} is zero")
    return math.ceil(seconds / 60)


def parse_mem_gb(text: str) -> float:
    """16G / 16GB / 500M / 1T / 16 (GB) -> GB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise LaunchError(f"bad --mem {text!r}; use e.g. 16G or 500M")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1.0}[m.group(2).upper()]
    return float(m.group(1)) * scale


def slurm_problem() -> str | None:
    """Why Slurm cannot be used here (None when `sbatch` exists and `sinfo` answers)."""
    if shutil.which("sbatch") is None:
        return "sbatch not found on PATH (no Slurm client here)"
    try:
        subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=True)
    except subprocess.CalledProcessError as e:
        why = " ".join((e.stderr or e.stdout or "").split())[:200] or f"exit code {e.returncode}"
        return f"sinfo failed: {why}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {type(e).__name__}: {e}"
    return None


def make_executor(cluster: str, folder: str | Path, res: Resources, name: str = "gancore") -> Any:
    """A submitit AutoExecutor for `cluster` with `res`; Slurm jobs requeue on preemption/timeout."""
    import submitit

    if cluster not in CLUSTERS:
        raise LaunchError(f"unknown cluster {cluster!r}; known: {', '.join(CLUSTERS)}")
    if cluster == "slurm":
        problem = slurm_problem()
        if problem:
            raise LaunchError(f"{problem}; use --cluster local to run on this machine")
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": parse_time_min(res.time),
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus,
        "gpus_per_node": res.gpus or None,  # --gpus-per-node=0 is refused where there are no GPUs
        "mem_gb": parse_mem_gb(res.mem) if res.mem else None,
        "slurm_partition": res.partition,
        "slurm_account": res.account,
        "slurm_qos": res.qos,
        "slurm_additional_parameters": {"requeue": True},
    }
    if res.cpus:  # srun >= 22.05 does not inherit --cpus-per-task from the batch allocation
        params["slurm_srun_args"] = ["--cpus-per-task", str(res.cpus)]
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None and (cluster == "slurm" or not k.startswith("slurm_"))})
    return executor


# ----------------------------------------------------------------------------------------------------------------
# The job


def master_port(job_id: str | int | None) -> int:
    """A rendezvous port from the job id (the same rule as slurm/train.sh): 20000 + id % 20000."""
    digits = re.sub(r"\D", "", str(job_id or "")) or "0"
    return 20000 + int(digits) % 20000


def _distributed_env() -> None:
    """torch.distributed variables (read by Accelerate) for a job of several submitit tasks; no-op for one task."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (called directly, debug executor)
        return
    if env.num_tasks <= 1:
        return
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(master_port(os.environ.get("SLURM_JOB_ID", env.job_id))))
    os.environ["RANK"] = str(env.global_rank)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    os.environ["WORLD_SIZE"] = str(env.num_tasks)
    os.environ["LOCAL_WORLD_SIZE"] = str(env.num_tasks // max(1, env.num_nodes))


def _requeue_signal() -> int:
    """submitit's preemption/timeout signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def _restarted() -> bool:
    """A job that Slurm restarted by itself (e.g. preempted before submitit could update its pickle)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


@dataclass
class TrainJob:
    """One training run as a submitit job: `job()` trains; `job.checkpoint()` is what submitit requeues."""

    config: str | None
    overrides: tuple[str, ...] = ()
    out: str = ""
    resume: str | None = None

    def __call__(self) -> Any:
        """Train (resuming when asked); on a stop signal let submitit checkpoint() and requeue this job."""
        from gancore.config import load_config
        from gancore.trainer import fit

        _distributed_env()
        cfg = load_config(self.config, list(self.overrides))
        resume = self.resume or ("auto" if _restarted() else None)
        result = fit(cfg, out=self.out, resume=resume)
        if result.status == "stopped":
            how = signal.Signals(result.stop_signal).name if result.stop_signal else "request"
            print(f"gancore: stopped at step {result.step}/{result.total_steps} on {how}; checkpoint {result.checkpoint}",
                  flush=True)
            # The trainer held the signal until its checkpoint was written; now run submitit's handler, which
            # calls self.checkpoint(), stores it, `scontrol requeue`s the job and exits (rank 0 only). Not after
            # SIGTERM (scancel, or the hard end): a requeue would bring a cancelled job back.
            handler = signal.getsignal(_requeue_signal())
            is_submitit = type(getattr(handler, "__self__", None)).__name__ == "SignalHandler"
            if callable(handler) and is_submitit and result.stop_signal != signal.SIGTERM:
                handler(_requeue_signal(), None)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The DelayedSubmission submitit requeues: the same run, resumed from its latest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(replace(self, resume="auto"))


# ----------------------------------------------------------------------------------------------------------------
# Run lists: base overrides x (sweep-file lines | --set groups) x seeds


@dataclass(frozen=True)
class RunSpec:
    overrides: tuple[str, ...]
    label: str  # what differs between the runs, for tables


def read_sweep_file(path: str | Path) -> list[list[str]]:
    """One override set per line (shell-quoted `k=v k2=v2`); blank lines and # comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"sweep file {str(p)!r} not found")
    sets = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise LaunchError(f"{p}:{n}: {e}") from None
        if words:
            sets.append(words)
    if not sets:
        raise LaunchError(f"sweep file {str(p)!r} holds no override sets (one 'k=v k2=v2' per line)")
    return sets


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LaunchError(f"bad --seeds {text!r}; use e.g. 0,1,2") from None
    if not seeds:
        raise LaunchError("--seeds is empty")
    return seeds


def expand_runs(base: Sequence[str], sets: Iterable[Sequence[str]] = (), seeds: Sequence[int] | None = None) -> list[RunSpec]:
    """Every (override set, seed) combination; one run with `base` alone when there are neither."""
    sets = [list(s) for s in sets] or [[]]
    runs = []
    for s in sets:
        for seed in seeds if seeds else [None]:
            extra = [*s, *([f"train.seed={seed}"] if seed is not None else [])]
            runs.append(RunSpec(tuple([*base, *extra]), " ".join(extra)))
    return runs


@dataclass
class Submitted:
    spec: RunSpec
    job_obj: TrainJob
    job: Any  # submitit Job

    @property
    def log(self) -> Path:
        return Path(self.job.paths.stdout)


def submit_runs(cluster: str, config: str | None, runs: list[RunSpec], res: Resources, out: str | None = None,
                folder: str | Path = DEFAULT_FOLDER, name: str | None = None) -> list[Submitted]:
    """Validate every run's config, then submit all of them at once (a Slurm job array for several)."""
    from gancore.config import load_config

    config = str(Path(config).resolve()) if config else None
    cfgs = []
    for i, spec in enumerate(runs):
        try:
            cfgs.append(load_config(config, list(spec.overrides)))
        except ConfigError as e:
            where = f"run {i + 1} ({spec.label}): " if len(runs) > 1 and spec.label else ""
            raise LaunchError(f"{where}{e}") from None
    base = Path(out) if out else Path("runs") / f"{cfgs[0].name}-{datetime.now():%Y%m%d-%H%M%S}"
    outs = [base] if len(runs) == 1 else [Path(f"{base}-{i:02d}") for i in range(len(runs))]
    jobs = [TrainJob(config, spec.overrides, str(o.resolve())) for spec, o in zip(runs, outs)]

    executor = make_executor(cluster, folder, res, name=name or f"gancore-{cfgs[0].name}")
    if len(jobs) == 1:
        handles = [executor.submit(jobs[0])]
    else:
        with executor.batch():
            handles = [executor.submit(j) for j in jobs]
    return [Submitted(s, j, h) for s, j, h in zip(runs, jobs, handles)]


# ----------------------------------------------------------------------------------------------------------------
# Waiting: a live status table, then the results


def job_states(subs: list[Submitted]) -> list[str]:
    """Current scheduler state per job (for Slurm: one forced sacct call for all jobs; sacct may lag a little)."""
    jobs = [s.job for s in subs]
    if type(jobs[0]).__name__ != "SlurmJob":
        return [j.state for j in jobs]
    jobs[0].watcher.update()
    states = []
    for j in jobs:
        state = j.watcher.get_state(j.job_id, mode="cache")
        if j.paths.result_pickle.exists() and state in ("UNKNOWN", "PENDING", "RUNNING", "REQUEUED"):
            state = "COMPLETING"  # the result is written; sacct has not caught up yet
        states.append(state)
    return states


def status_table(subs: list[Submitted], states: list[str], title: str = "jobs") -> Any:
    from rich.table import Table

    colour = {"RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "magenta", "COMPLETED": "green", "DONE": "green",
              "FINISHED": "green", "FAILED": "red", "CANCELLED": "red", "TIMEOUT": "red", "PREEMPTED": "magenta"}
    t = Table(title=title)
    for col in ("job", "state", "runs", "run dir", "log"):
        t.add_column(col, overflow="fold")
    for s, st in zip(subs, states):
        key = st.split()[0].upper() if st else ""
        t.add_row(str(s.job.job_id), f"[{colour.get(key, 'white')}]{st}[/]", s.spec.label or "-",
                  short_path(s.job_obj.out), short_path(s.log))
    return t


def wait(subs: list[Submitted], poll_s: float = POLL_S, console: Any = None) -> None:
    """Block until every job ended, showing a live state table."""
    from rich.live import Live

    if not subs or type(subs[0].job).__name__ == "DebugJob":
        return  # debug jobs run in this process when their result is asked for
    states = job_states(subs)
    with Live(status_table(subs, states), console=console, refresh_per_second=2) as live:
        while not all(s.job.done() for s in subs):
            time.sleep(poll_s)
            states = job_states(subs)
            live.update(status_table(subs, states))
        live.update(status_table(subs, job_states(subs)))
    if not live.console.is_terminal:
        live.console.line()  # rich leaves the last frame without a newline when writing to a file or pipe


@dataclass
class Outcome:
    sub: Submitted
    result: Any = None  # trainer.RunResult
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and getattr(self.result, "status", None) == "finished"


def collect(subs: list[Submitted]) -> list[Outcome]:
    """Each job's RunResult, or its error's last line (the full trace is in the job's log)."""
    outcomes = []
    for s in subs:
        try:
            outcomes.append(Outcome(s, s.job.result()))
        except Exception as e:  # a failed job: submitit re-raises with the trace
            lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith("-")]
            outcomes.append(Outcome(s, error=(lines[-1] if lines else type(e).__name__)[:300]))
    return outcomes


def result_lines(outcomes: list[Outcome]) -> list[str]:
    """One line per run: state, steps, MLflow run id, run dir, final metrics (or the error and the log to read)."""
    lines = []
    for o in outcomes:
        head = f"{o.sub.job.job_id}  {o.sub.spec.label or '(base config)'}:"
        if o.error is not None:
            lines.append(f"{head} FAILED: {o.error}  (log {short_path(o.sub.job.paths.stderr)})")
            continue
        r = o.result
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()))
        lines.append(f"{head} {r.status} {r.step}/{r.total_steps} steps; MLflow run {r.run_id or '-'}; "
                     f"run dir {short_path(r.run_dir)}" + (f"; {metrics}" if metrics else ""))
    return lines


def short_path(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
