"""Batches of training runs through submitit: run lists, submission (one Slurm job array), waiting, results.

`jobs/submit.py` is the CLI over this module. A run list is base overrides x (sets-file lines | --set groups) x
seeds; every run's config is validated before anything is submitted.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from gancore.cluster.executors import make_executor
from gancore.cluster.job import TrainJob
from gancore.cluster.resources import Resources
from gancore.errors import ConfigError, LaunchError

DEFAULT_FOLDER = "logs/submitit"  # submitit's pickles and the jobs' logs: <folder>/<jobid>_<task>_log.{out,err}
POLL_S = 5.0  # --wait: seconds between status refreshes (one sacct call for all jobs)


# ----------------------------------------------------------------------------------------------------------------
# Run lists: base overrides x (sets-file lines | --set groups) x seeds


@dataclass(frozen=True)
class RunSpec:
    overrides: tuple[str, ...]
    label: str  # what differs between the runs, for tables


def read_sets_file(path: str | Path) -> list[list[str]]:
    """A sets file (jobs/submit.py --sets-file; not a sweep's Optuna YAML): one override set per line (shell-quoted
    `k=v k2=v2`); blank lines and # comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"sets file {str(p)!r} not found")
    sets = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise LaunchError(f"{p}:{n}: {e}") from None
        if words:
            sets.append(words)
    if not sets:
        raise LaunchError(f"sets file {str(p)!r} holds no override sets (one 'k=v k2=v2' per line)")
    return sets


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]."""
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


# ----------------------------------------------------------------------------------------------------------------
# Submission


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
    """A rich table: job id, coloured state, runs label, run dir, log."""
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
    result: Any = None  # gancore.train.loop.RunResult
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
