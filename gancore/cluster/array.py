"""A sweep's workers as one Slurm job array through submitit (gancore/sweep/workers.py says what a worker does).

Preemption / time limit (submitit's SIGUSR2): the trainer checkpoints and stops, the sweep re-queues the trial in
the study, then submitit's handler requeues this worker job (hand_over_to_submitit, as for TrainJob), which pulls
the re-queued trial again. Not after SIGTERM (scancel): a cancelled job must stay cancelled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gancore.cluster import Resources, hand_over_to_submitit, make_executor
from gancore.errors import EXIT_STOPPED


class ArrayWorker:
    """A submitit-callable task of the job array: `work(index)` -> (exit code, the signal that stopped it or None).

    `work` must be picklable (a module-level function or a functools.partial of one)."""

    def __init__(self, work: Callable[[int], tuple[int, int | None]]):
        self.work = work

    def __call__(self, index: int) -> int:
        code, signum = self.work(index)
        if code == EXIT_STOPPED and signum is not None:
            hand_over_to_submitit(signum)  # stores checkpoint(), `scontrol requeue`, exits; never after SIGTERM
        return code

    def checkpoint(self, index: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, index)


def run_array(work: Callable[[int], tuple[int, int | None]], n: int, folder: Path, res: Resources, name: str,
              parallelism: int | None = None) -> tuple[int, str]:
    """`work(0..n-1)` as a Slurm job array (at most `parallelism` at once, default all); waits for the tasks.
    Returns (the highest exit code (1 for a task that failed), EXIT_STOPPED after Ctrl-C (tasks cancelled);
    the array's job id)."""
    ex = make_executor("slurm", folder, res, name=name)
    ex.update_parameters(slurm_array_parallelism=parallelism or n)
    jobs = ex.map_array(ArrayWorker(work), list(range(n)))
    array = jobs[0].job_id.split("_")[0]
    print(f"sweep: {n} Slurm worker(s) in job array {array}; logs in {folder}", flush=True)
    code = 0
    try:
        for j in jobs:
            try:
                code = max(code, int(j.result() or 0))
            except Exception as e:
                print(f"sweep: Slurm worker {j.job_id} failed: {' '.join(str(e).split())[:300]}", file=sys.stderr)
                code = max(code, 1)
    except KeyboardInterrupt:
        for j in jobs:
            j.cancel(check=False)  # SIGTERM: each worker checkpoints and re-queues its trial
        return EXIT_STOPPED, array
    return code, array
