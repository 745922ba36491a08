"""The study's trials: the budget, which worker runs a trial, dead workers, interrupted trials and their re-queue.

Interrupted trials are never lost and never counted twice. A trial whose worker was stopped (SIGTERM / SIGUSR1 /
Ctrl-C: the trainer writes a checkpoint) or killed is marked FAIL with `gancore.interrupted` and re-queued once as a
WAITING copy with the same params (RetryFromCheckpoint); the copy resumes training from the interrupted trial's last
checkpoint in the same MLflow child run. Killed workers are found by their coordinator at once (its worker process
died: recover_dead), by any later coordinator on the same host (dead pid + start time) and, on RDB storage, by
Optuna's heartbeat (any host, `grace_period` after the last beat). Whoever marks the dead trial FAIL first (one row
update, locked) queues its only copy.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from gancore.sweep.spec import Sweep
from gancore.sweep.storage import PARENT_ATTR
from gancore.tracking.sweep_runs import close_child_runs

STATES_COUNTED = ("COMPLETE", "PRUNED", "FAIL")  # finished trials that use the budget (unless re-queued)


def _state(t: Any) -> str:
    return t.state.name


def retried_numbers(trials: list[Any]) -> set[int]:
    """Trials that were re-queued (a later trial's retry history names them): they do not use the budget."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_used(trials: list[Any]) -> dict[str, int]:
    """{"finished": COMPLETE + PRUNED + FAIL (re-queued ones excluded), "running": ..., "waiting": ...}."""
    retried = retried_numbers(trials)
    finished = sum(1 for t in trials if _state(t) in STATES_COUNTED and t.number not in retried)
    return {"finished": finished, "running": sum(_state(t) == "RUNNING" for t in trials),
            "waiting": sum(_state(t) == "WAITING" for t in trials)}


def trials_left(study: Any, n_trials: int | None) -> int | None:
    """Trials still to start (WAITING re-queued ones included); None = no trial budget (timeout only)."""
    if n_trials is None:
        return None
    u = budget_used(study.get_trials(deepcopy=False))
    return max(u["waiting"], n_trials - u["finished"] - u["running"])


class Budget:
    """Stop a worker when the study's trials (all workers, earlier runs) use `n_trials`.

    Optuna's MaxTrialsCallback counts trial states only: an interrupted trial (FAIL) and its re-queued copy would
    count twice, and RUNNING trials of other workers not at all (N workers overshoot by up to N-1); this counts
    both right. Checked after every trial and before a worker's first.
    """

    def __init__(self, n_trials: int | None):
        self.n_trials = n_trials

    def exhausted(self, study: Any) -> bool:
        left = trials_left(study, self.n_trials)
        return left is not None and left <= 0

    def __call__(self, study: Any, trial: Any) -> None:
        if self.exhausted(study):
            study.stop()


# ----------------------------------------------------------------------------------------------------------------
# Workers: who runs a trial, and is it still alive


def slurm_task() -> str | None:
    """ARRAYJOB_TASK of the Slurm job-array task this process runs in (else the Slurm job id, else None)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def worker_id() -> str:
    """host:pid:start-time of this process (the start time tells a live worker from a reused pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state first); [] where there is no /proc."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return []


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else "?"


def _here(worker: str | None) -> tuple[int, str] | None:
    """(pid, start time) when `worker` (worker_id()) ran on this host, else None."""
    if not worker or worker.count(":") < 2:
        return None
    host, pid, started = worker.rsplit(":", 2)
    return (int(pid), started) if host == socket.gethostname() and pid.isdigit() else None


def _alive_here(worker: str | None) -> bool:
    """True when `worker` is a live process on this host (the same pid and start time)."""
    return _here(worker) is not None and not _dead_here(worker)


def _dead_here(worker: str | None) -> bool:
    """True when `worker` (worker_id()) ran on this host and that process is gone."""
    if not worker or worker.count(":") < 2:
        return False
    host, pid, started = worker.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = _stat(int(pid))  # a zombie (not yet reaped by PID 1) or a reused pid is dead too
    return bool(fields) and (fields[0] in ("Z", "X") or (started != "?" and fields[19] != started))


# ----------------------------------------------------------------------------------------------------------------
# Interrupted trials


ATTEMPT_ATTRS = ("gancore.worker",)  # about one attempt: a re-queued copy does not inherit them


class RetryFromCheckpoint:
    """Queue a WAITING copy of a failed (interrupted or dead) trial, at most `max_retry` times per trial.

    Optuna's RetryHeartbeatStaleTrialCallback with the intermediate values, minus the attempt's worker id: the copy
    inherits the user attrs (gancore.run_dir: the checkpoints it resumes from; mlflow.run_id), and a copy popped by
    a live worker but still carrying the dead worker's id would look dead to a coordinator and be re-queued twice.
    Used by requeue() and, as the storage's heartbeat_stale_trial_callback, by Optuna's fail_stale_trials."""

    def __init__(self, max_retry: int | None):
        self.max_retry = max_retry

    def __call__(self, study: Any, trial: Any) -> None:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(self.max_retry, inherit_intermediate_values=True)(study, trial)


def _set_running_trial_attr(study: Any, number: int, key: str, value: Any) -> None:
    """Set a user attr of trial `number`, which another (dead or stopped) process is running.

    Optuna's only public way to set a trial's attrs is the Trial object of the process that runs it (building one,
    optuna.Trial(study, trial_id), would also call the sampler's before_trial); its own stale-trial code
    (optuna.storages.fail_stale_trials) uses the storage directly the same way. The one private access of the sweep.
    Raises optuna.exceptions.UpdateFinishedTrialError when the trial has finished meanwhile."""
    storage = study._storage
    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study._study_id, number), key, value)


def requeue(study: Any, number: int, sweep: Sweep, reason: str) -> bool:
    """Mark trial `number` FAIL (interrupted: `reason`) and queue a WAITING copy with its params, once.

    The copy inherits the intermediate values and user attrs (so it knows the interrupted trial's run dir and
    resumes from its checkpoint). Returns False when the trial had already finished (another process won)."""
    import optuna
    from optuna.trial import TrialState

    frozen = study.get_trials(deepcopy=False)[number]
    if frozen.state == TrialState.RUNNING:
        try:
            _set_running_trial_attr(study, number, "gancore.interrupted", reason)
            study.tell(number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # tell: "Cannot tell a COMPLETE trial"
            return False
    elif (frozen.state != TrialState.FAIL or not frozen.user_attrs.get("gancore.interrupted")
          or number in retried_numbers(study.get_trials(deepcopy=False))):
        return False
    RetryFromCheckpoint(sweep.max_retry)(study, study.get_trials(deepcopy=False)[number])
    return True


def recover_stale(study: Any, sweep: Sweep) -> list[int]:
    """Re-queue trials left RUNNING by workers that died on this host, and interrupted FAIL trials not yet
    re-queued (unless their worker is alive here: it is queueing the copy itself). Trials of live workers and of
    other hosts are left alone (RDB heartbeats cover other hosts)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    done = []
    for t in trials:
        worker = t.user_attrs.get("gancore.worker")
        stale = _state(t) == "RUNNING" and _dead_here(worker)
        unqueued = (_state(t) == "FAIL" and t.user_attrs.get("gancore.interrupted") and t.number not in retried
                    and not _alive_here(worker))
        if stale or unqueued:
            reason = t.user_attrs.get("gancore.interrupted") or f"worker {t.user_attrs['gancore.worker']} died"
            if requeue(study, t.number, sweep, reason):
                done.append(t.number)
                close_child_runs(sweep, t, study.user_attrs.get(PARENT_ATTR))
    return done


def recover_dead(study: Any, sweep: Sweep) -> list[int]:
    """Re-queue the trials of dead workers now: on this host by pid (recover_stale), from any host by Optuna's
    heartbeat (RDB storage: no beat for `grace_period` s). Their MLflow runs end KILLED until a copy resumes them.
    Returns the re-queued trial numbers."""
    import optuna

    done = recover_stale(study, sweep)
    if not has_heartbeat(sweep):
        return done
    before = retried_numbers(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # FAIL + the storage's RetryFromCheckpoint, once per trial
    trials = study.get_trials(deepcopy=False)
    for n in sorted(retried_numbers(trials) - before):
        close_child_runs(sweep, trials[n], study.user_attrs.get(PARENT_ATTR))
        done.append(n)
    return done


def recover_array(study: Any, sweep: Sweep, array_job: str) -> list[int]:
    """Re-queue the trials left RUNNING by tasks of Slurm job array `array_job` once the whole array has ended: its
    tasks are gone, so such a trial's worker died (killed, node failure), whatever the storage (the journal has no
    heartbeat). Returns the re-queued trial numbers."""
    done = []
    for t in study.get_trials(deepcopy=False):
        task = t.user_attrs.get("gancore.slurm_task") or ""
        if _state(t) == "RUNNING" and task.startswith(f"{array_job}_"):
            if requeue(study, t.number, sweep, f"Slurm worker {task} died"):
                done.append(t.number)
                close_child_runs(sweep, t, study.user_attrs.get(PARENT_ATTR))
    return done


def has_heartbeat(sweep: Sweep) -> bool:
    """RDB storages beat (gancore.sweep.storage.open_storage); Optuna's journal storage does not."""
    return not sweep.storage_url.startswith("journal:")


def running_elsewhere(study: Any, sweep: Sweep) -> list[int]:
    """RUNNING trials not run by a live process of this host: live workers elsewhere, or dead ones that only a
    heartbeat can tell (the coordinator waits `grace_period` for them before it ends). [] without heartbeats."""
    if not has_heartbeat(sweep):
        return []
    return [t.number for t in study.get_trials(deepcopy=False)
            if _state(t) == "RUNNING" and not _alive_here(t.user_attrs.get("gancore.worker"))]
