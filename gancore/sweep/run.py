"""The coordinator: run_sweep = prepare (study, parent MLflow run, stale trials, metric caches) -> N workers (local
processes or Slurm array tasks) -> report (rich table, best.yaml, Optuna figures on the parent run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gancore.errors import SweepError
from gancore.sweep.report import report
from gancore.sweep.spec import Sweep, definition
from gancore.sweep.storage import DEFINITION_ATTR, PARENT_ATTR, describe_url, open_storage, open_study
from gancore.sweep.trials import recover_dead, trials_left
from gancore.sweep.workers import WorkerContext, auto_workers, launch_local, launch_slurm, local_contexts, worker
from gancore.tracking.sweep_runs import parent_run


def _check_objective(sweep: Sweep) -> tuple[str, Any]:
    """(extractor name, real images) once the objective is checked to be the metric the trials will report; reads
    the data, writes nothing."""
    from gancore.metrics import extractors, metric_key
    from gancore.metrics.fidelity import real_images

    cfg = sweep.base
    x_real = real_images(cfg, cfg.eval.n_samples)
    name = extractors.resolve(cfg, None, channels=x_real.shape[1])
    expected = metric_key("fid", name, cfg.eval.n_samples)
    if expected != sweep.objective:
        raise SweepError(f"objective {sweep.objective} is not what the trials report: {expected} (extractor {name}, "
                         f"eval.n_samples={cfg.eval.n_samples}); fix `objective` or the eval overrides")
    return name, x_real


def _warm_metrics(sweep: Sweep, name: str, x_real: Any) -> None:
    """Train the domain extractor / compute real statistics once, before N workers would race to."""
    import torch

    from gancore.metrics import extractors
    from gancore.metrics.fidelity import real_statistics

    cfg = sweep.base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fe, fe_id = extractors.load(name, cfg, device)
    real_statistics(cfg, name, fe, fe_id, x_real, device)


def _check_definition(sweep: Sweep, study: Any) -> None:
    """A new study records the sweep's definition; a resumed one must have been made with the same."""
    mine, theirs = json.loads(json.dumps(definition(sweep), default=str)), study.user_attrs.get(DEFINITION_ATTR)
    if theirs is None:
        study.set_user_attr(DEFINITION_ATTR, mine)
        return
    diffs = [f"{sec}.{k}" for sec in ("base", "space") for k in sorted(set(mine[sec]) | set(theirs[sec]))
             if mine[sec].get(k) != theirs[sec].get(k)]
    diffs += ["objective"] if mine["objective"] != theirs["objective"] else []
    if diffs:
        raise SweepError(f"study {sweep.study!r} in {describe_url(sweep.storage_url)} was made with another "
                         f"definition (differs: {', '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}); "
                         "use a new study name")


def _parent_run(sweep: Sweep, study: Any) -> str | None:
    """The sweep's parent MLflow run: created once, its id kept as a study attr so a resumed sweep reuses it."""
    if not sweep.base.track.enabled:
        return None
    known = study.user_attrs.get(PARENT_ATTR)
    run_id = parent_run(sweep, known, describe_url(sweep.storage_url))
    if run_id != known:
        study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _would_create(url: str) -> list[Path]:
    """The file a sqlite / journal storage lives in and the folders above it that do not exist yet (outermost
    first): what opening the storage creates on disk. None for a database server."""
    db = Path(url[len("journal:"):]).expanduser() if url.startswith("journal:") else \
        Path(url.split("///", 1)[1].split("?", 1)[0]) if url.startswith("sqlite") and "///" in url else None
    if db is None or str(db) in ("", ":memory:") or db.exists():
        return []
    new = [db]
    parent = db.parent
    while not parent.exists():
        new.insert(0, parent)
        parent = parent.parent
    return new


def _remove_created(paths: list[Path]) -> None:
    """Undo `_would_create`'s paths that now exist (with SQLite's -journal / -wal / -shm companions)."""
    for p in reversed(paths):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            for q in (p, *(p.with_name(p.name + s) for s in ("-journal", "-wal", "-shm"))):
                q.unlink(missing_ok=True)


def prepare(sweep: Sweep) -> tuple[Any, str | None]:
    """Check the objective (before anything is written), open the storage (fails fast), warm the metric caches,
    create or load the study (a resumed one must have the same definition), re-queue trials of dead workers (gone
    pids on this host, heartbeats older than grace_period from any host), make the parent MLflow run.
    A check that fails up to the study's creation leaves nothing behind: a storage file (and folders) this call
    made are removed again. Returns (study, parent run id)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, x_real = _check_objective(sweep)
    created = _would_create(sweep.storage_url)
    try:
        storage = open_storage(sweep.storage_url, sweep)
        _warm_metrics(sweep, name, x_real)
        study = open_study(sweep, storage, create=True)
        _check_definition(sweep, study)
    except BaseException:
        _remove_created(created)
        raise
    recovered = recover_dead(study, sweep)  # dead pids here; silent heartbeats from any host
    if recovered:
        print(f"sweep: re-queued interrupted trial(s) {', '.join(map(str, recovered))}; they resume from their "
              "checkpoints", flush=True)
    return study, _parent_run(sweep, study)


def run_sweep(sweep: Sweep, workers: int | None = None, launcher: str = "local", report_only: bool = False,
              prepare_only: bool = False) -> int:
    """Prepare, run the workers, report. Returns 0 (budget used / timeout) or EXIT_STOPPED (interrupted)."""
    workers = workers or sweep.workers
    why = ""
    if workers == "auto":
        workers, why = auto_workers(sweep, launcher)
        why = f" ({why})"
    if launcher not in ("local", "slurm"):
        raise SweepError(f"launcher {launcher!r}: expected local or slurm")
    if launcher == "slurm" and sweep.storage_url.startswith("sqlite"):
        raise SweepError("Slurm workers on several nodes need a shared storage that locks over the network: give "
                         "--storage postgresql://... (or journal:/shared/path/study.log); not SQLite on NFS")
    if report_only:
        study = open_study(sweep, open_storage(sweep.storage_url))
        return report(sweep, study, study.user_attrs.get(PARENT_ATTR), final=None)
    study, parent = prepare(sweep)
    left = trials_left(study, sweep.n_trials)
    n = workers if left is None else min(workers, left)
    plan = ("prepared: start workers (e.g. sbatch --array=0-N slurm/sweep.sh)" if prepare_only else
            "budget used" if n == 0 else f"{n} {launcher} worker(s){why}")
    print(f"sweep {sweep.study}: storage {describe_url(sweep.storage_url)}; "
          f"{len(study.get_trials(deepcopy=False))} trial(s) so far; {plan}; dir {sweep.dir}", flush=True)
    if prepare_only:
        return 0
    stream = len(study.get_trials(deepcopy=False)) * 1009  # later runs of the sweep draw new start-up params
    code = 0
    if n > 0 and launcher == "local":
        code = launch_local(local_contexts(sweep, parent, n, stream))
    elif n > 0:
        code = launch_slurm(sweep, WorkerContext(sweep, parent, 0, stream), n)
    study = open_study(sweep, open_storage(sweep.storage_url))
    report(sweep, study, parent, final=code == 0)
    return code


def run_worker(sweep: Sweep) -> int:
    """One worker of an already prepared sweep, in this process (`jobs/sweep.py --worker`; slurm/sweep.sh's array
    tasks: task $SLURM_ARRAY_TASK_ID); its seed stream follows the study's trials so far."""
    if os.environ.get("SLURM_JOB_ID") and sweep.storage_url.startswith("sqlite"):
        raise SweepError("Slurm workers need --storage postgresql://... or journal:/shared/path (SQLite's file "
                         "locking is unreliable on network file systems)")
    study = open_study(sweep, open_storage(sweep.storage_url))
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    return worker(WorkerContext(sweep, study.user_attrs.get(PARENT_ATTR), task,
                                stream=len(study.get_trials(deepcopy=False)) * 1009 + task))
