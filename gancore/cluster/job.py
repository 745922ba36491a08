"""The checkpointable submitit job (`TrainJob`) and how it hands a stopped run back to submitit for requeueing.

Preemption and time limits work like slurm/train.sh's: Slurm sends submitit's signal (SIGUSR2, `signal_delay_s`
before the limit and at preemption), the trainer finishes its step, writes a checkpoint and returns "stopped"; then
submitit's own handler calls `TrainJob.checkpoint()` -- a copy of the job with resume="auto" and the same run dir --
and requeues it, so the job continues from the checkpoint in the same MLflow run.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, replace
from typing import Any

from gancore.cluster import rendezvous


def _distributed_env() -> None:
    """torch.distributed variables (read by Accelerate) for a job of several submitit tasks; no-op for one task."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (called directly, debug executor)
        return
    if env.num_tasks <= 1:
        return
    rendezvous.apply(rendezvous.rendezvous_env(os.environ.get("SLURM_JOB_ID", env.job_id), env.hostnames,
                                               env.num_tasks, env.num_nodes, env.global_rank, env.local_rank))


def requeue_signal() -> int:
    """submitit's preemption/timeout signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def hand_over_to_submitit(stop_signal: int | None) -> bool:
    """After a checkpointed stop, run submitit's signal handler: it stores the job's checkpoint(), `scontrol
    requeue`s the job and exits (rank 0 only). Not after SIGTERM (scancel, or the hard end): a requeue would bring
    a cancelled job back. False (nothing done) outside a submitit job or after SIGTERM."""
    if stop_signal == signal.SIGTERM:
        return False
    handler = signal.getsignal(requeue_signal())
    if not callable(handler) or type(getattr(handler, "__self__", None)).__name__ != "SignalHandler":
        return False  # not submitit's (not inside a submitit job)
    handler(requeue_signal(), None)
    return True


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
        from gancore.train.loop import fit

        _distributed_env()
        cfg = load_config(self.config, list(self.overrides))
        resume = self.resume or ("auto" if _restarted() else None)
        result = fit(cfg, out=self.out, resume=resume)
        if result.status == "stopped":
            how = signal.Signals(result.stop_signal).name if result.stop_signal else "request"
            print(f"gancore: stopped at step {result.step}/{result.total_steps} on {how}; checkpoint {result.checkpoint}",
                  flush=True)
            # the trainer held the signal until its checkpoint was written: now submitit stores checkpoint(), requeues
            hand_over_to_submitit(result.stop_signal)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The DelayedSubmission submitit requeues: the same run, resumed from its latest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(replace(self, resume="auto"))
