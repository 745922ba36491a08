"""Clusters: the only package that imports submitit or knows Slurm. One concern per module:

- resources.py   `Resources` (what a run asks for; the one place the Slurm resource defaults live), `CLUSTERS`,
                 Slurm's --time / --mem spellings, `slurm_problem()` (is Slurm usable here?)
- executors.py   `make_executor`: a submitit executor for slurm / local / debug, requeueing on preemption and timeout
- rendezvous.py  the torch.distributed variables of a multi-process job (MASTER_ADDR/PORT, RANK, WORLD_SIZE, ...)
                 from one pure function; `master_port(job_id)`; `python -m gancore.cluster.rendezvous` (slurm/train.sh)
- job.py         `TrainJob`, the checkpointable submitit job; `hand_over_to_submitit` (a checkpointed stop -> submitit's
                 checkpoint() + requeue, never after SIGTERM) and `requeue_signal` (SUBMITIT_PREEMPT_SIGNAL)
- runs.py        batches of runs: run lists (sets files, --set, --seeds), `submit_runs` (one job array), `wait`
                 with a live table, `collect` and `result_lines` (jobs/submit.py is the CLI over it)
- array.py       Optuna sweep workers as a Slurm job array (used by gancore/sweep)

slurm/train.sh and slurm/sweep.sh are the sbatch equivalents; slurm/common.sh holds what they share.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Re-exported names -> their module, imported on first use, so `python -m gancore.cluster.rendezvous` (run by
# slurm/train.sh) starts without loading the rest (and without runpy's "found in sys.modules" warning).
_EXPORTS = {
    "CLUSTERS": "resources", "Resources": "resources", "parse_mem_gb": "resources", "parse_time_min": "resources",
    "slurm_problem": "resources",
    "make_executor": "executors",
    "master_port": "rendezvous", "rendezvous_env": "rendezvous",
    "TrainJob": "job", "hand_over_to_submitit": "job", "requeue_signal": "job",
    "RunSpec": "runs", "Submitted": "runs", "Outcome": "runs", "read_sets_file": "runs", "parse_seeds": "runs",
    "expand_runs": "runs", "submit_runs": "runs", "wait": "runs", "collect": "runs", "result_lines": "runs",
    "short_path": "runs",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ below imports the same names
    from gancore.cluster.executors import make_executor
    from gancore.cluster.job import TrainJob, hand_over_to_submitit, requeue_signal
    from gancore.cluster.rendezvous import master_port, rendezvous_env
    from gancore.cluster.resources import CLUSTERS, Resources, parse_mem_gb, parse_time_min, slurm_problem
    from gancore.cluster.runs import (Outcome, RunSpec, Submitted, collect, expand_runs, parse_seeds,
                                      read_sets_file, result_lines, short_path, submit_runs, wait)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"gancore.cluster.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gancore.cluster' has no attribute {name!r}")
