"""Hyper-parameter sweeps: an Optuna study whose trials are gancore training runs (sweeps/README.md).

    spec.py       the sweep file: Param, Sweep, load_sweep (strict validation), trial_config, definition
    storage.py    the study's storage (sqlite with BEGIN IMMEDIATE, journal file, RDB), sampler, pruner, open_study;
                  the study attrs PARENT_ATTR / DEFINITION_ATTR
    trials.py     the budget (Budget, trials_left), worker ids and dead workers, requeue / recover_stale of
                  interrupted trials
    objective.py  one trial: Objective (params -> config -> gancore.train.loop.fit -> the objective), TrialInterrupted
    workers.py    WorkerContext, worker(), the local process pool, the Slurm job array, auto_workers
    devices.py    the measured best trials per device (bench/trials_per_device.py) that `workers: auto` uses
    report.py     the table, best.yaml, trials.csv, Optuna's figures, best_trial, report()
    run.py        the coordinator: prepare -> workers -> report (run_sweep), and run_worker (jobs/sweep.py --worker)

MLflow runs of a sweep (parent run, child runs) live in gancore/tracking/sweep_runs.py; the submitit side of the
job array in gancore/cluster/array.py.
"""

from gancore.errors import SweepError  # noqa: F401
from gancore.sweep.run import run_sweep, run_worker  # noqa: F401
from gancore.sweep.spec import Sweep, load_sweep  # noqa: F401
from gancore.sweep.storage import PARENT_ATTR, open_storage, open_study  # noqa: F401
from gancore.sweep.workers import WorkerContext, worker  # noqa: F401
