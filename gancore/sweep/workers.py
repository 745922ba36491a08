"""Workers: each runs `study.optimize` on the shared storage until the budget is used; local processes or the tasks
of a Slurm job array (gancore/cluster/array.py), as many as `workers` (auto: the measured best per device)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from gancore.errors import EXIT_STOPPED, GancoreError, NonFiniteLossError, SweepError
from gancore.sweep import devices
from gancore.sweep.objective import Objective, TrialInterrupted
from gancore.sweep.spec import Sweep
from gancore.sweep.storage import open_storage, open_study
from gancore.sweep.trials import Budget, recover_array, requeue, running_elsewhere, trials_left


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process needs (picklable: sent to spawned processes and Slurm jobs)."""

    sweep: Sweep
    parent_id: str | None
    index: int  # worker number in this run of the sweep
    stream: int  # sampler seed stream (distinct per worker and per run of the sweep)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for this worker (local multi-GPU machines)


def _print_trial(study: Any, t: Any) -> None:
    value = f"{t.value:.4g}" if t.value is not None else "-"
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    why = t.user_attrs.get("gancore.failure") or t.user_attrs.get("gancore.interrupted") or ""
    secs = f"{t.duration.total_seconds():.0f} s" if t.duration else ""
    print(f"sweep {study.study_name}: trial {t.number} {t.state.name:<8} {value:>9}  {params}  {secs}"
          + (f"  ({why})" if why else ""), flush=True)


def worker(ctx: WorkerContext) -> int:
    """Run trials of the study until its budget is used (or timeout); 0 done, EXIT_STOPPED interrupted."""
    return _work(ctx)[0]


def _work(ctx: WorkerContext) -> tuple[int, int | None]:
    """worker() plus the signal that interrupted it (None when it was not)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial (_print_trial), not tracebacks

    if ctx.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ctx.gpu
    if ctx.threads:
        import torch

        torch.set_num_threads(ctx.threads)
    sweep = ctx.sweep
    study = open_study(sweep, open_storage(sweep.storage_url, sweep), stream=ctx.stream)
    budget = Budget(sweep.n_trials)
    if budget.exhausted(study):
        return 0, None
    catch: tuple[type[Exception], ...] = (NonFiniteLossError,)
    with contextlib.suppress(ImportError, AttributeError):
        import torch

        catch += (torch.OutOfMemoryError,)  # a batch size too big for the GPU fails that trial only
    try:
        study.optimize(Objective(sweep, ctx.parent_id), n_trials=None, timeout=sweep.timeout_s, catch=catch,
                       callbacks=[budget, _print_trial], gc_after_trial=True)
    except TrialInterrupted as e:
        requeue(study, e.number, sweep, e.reason)
        t = study.get_trials(deepcopy=False)[e.number]
        _print_trial(study, t)
        if isinstance(e.original, (KeyboardInterrupt, SystemExit)):
            raise e.original from None
        return EXIT_STOPPED, e.signum
    return 0, None


# ----------------------------------------------------------------------------------------------------------------
# Local worker processes


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the coordinator dies (the trainer then checkpoints and stops)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _local_worker(ctx: WorkerContext) -> None:
    """Entry point of a local worker process: errors as one line, exit code as worker() says."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which sends SIGTERM
    _die_with_parent()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        code = worker(ctx)
    except GancoreError as e:
        print(f"error: sweep worker {ctx.index}: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.exit(code)


class _Stop(Exception):
    pass


def _stop_all(procs: list[Any]) -> None:
    """SIGTERM the live workers (each checkpoints its trial), then wait for them, killing a stuck one."""
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 120  # a step plus a checkpoint; then give up on it
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=10)  # SIGKILL cannot be ignored; the bound only guards against an unkillable (D-state) one


def _signal_name(code: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(-code).name
    return f"signal {-code}"


class _Pool:
    """The coordinator's local worker processes: started, watched, replaced when killed.

    A worker killed by a signal (SIGKILL, the OOM killer) does not stop the sweep: its trial is re-queued at once
    (recover_dead: the pid is gone) and resumes from its last checkpoint in the next worker that asks for a trial;
    a replacement worker starts while the budget has trials left (at most `spare`, so a worker that keeps dying
    cannot loop forever). Every `tick` s the storage's heartbeats are checked too (trials of dead workers on other
    hosts); when the local workers are done, trials still RUNNING elsewhere are given `grace_period` (plus two
    beats) to finish or be found dead, and a re-queued one gets a worker."""

    def __init__(self, ctxs: list[WorkerContext]):
        import multiprocessing as mp

        self.spawn = mp.get_context("spawn")
        self.template, self.sweep = ctxs[0], ctxs[0].sweep
        self.procs: list[tuple[WorkerContext, Any]] = []
        self.killed: set[int] = set()  # pids of workers killed by a signal (handled: not an error)
        self.seen: set[int] = set()  # pids whose exit was handled
        self.spare = len(ctxs) + (self.sweep.n_trials or 10 * len(ctxs))
        self.tick = max(1.0, min(float(self.sweep.heartbeat_interval), 10.0))
        self.t0 = time.monotonic()
        self._study: Any = None

    @property
    def study(self) -> Any:
        if self._study is None:  # with the heartbeat settings: fail_stale_trials re-queues through them
            self._study = open_study(self.sweep, open_storage(self.sweep.storage_url, self.sweep))
        return self._study

    def start(self, ctx: WorkerContext) -> None:
        self.procs.append((ctx, self.spawn.Process(target=_local_worker, args=(ctx,), name=f"sweep-worker-{ctx.index}")))
        self.procs[-1][1].start()

    def live(self) -> list[Any]:
        return [p for _, p in self.procs if p.is_alive()]

    def replace(self, why: str) -> None:
        """Start one more worker (a fresh seed stream) if the budget and the timeout allow it."""
        timeout = self.sweep.timeout_s
        if timeout is not None and time.monotonic() - self.t0 >= timeout:
            return
        left = trials_left(self.study, self.sweep.n_trials)  # the re-queued copy included
        if left is not None and left <= 0:
            return
        if self.spare <= 0:
            print(f"sweep: no replacement for {why}: {len(self.procs)} workers started already", flush=True)
            return
        self.spare -= 1
        i = max(c.index for c, _ in self.procs) + 1
        ctx = dataclasses.replace(self.template, index=i, stream=self.template.stream + i)
        self.start(ctx)
        print(f"sweep: started worker {i} in place of {why}", flush=True)

    def recover(self) -> list[int]:
        from gancore.sweep.trials import recover_dead

        done = recover_dead(self.study, self.sweep)
        if done:
            print(f"sweep: re-queued trial(s) {', '.join(map(str, done))} of dead worker(s); they resume from their "
                  "last checkpoints", flush=True)
        return done

    def watch(self) -> None:
        """Until the workers are done: replace killed ones, re-queue dead workers' trials. Returns at the first
        worker that exits with an error (the caller stops the others)."""
        next_check, settle_until = time.monotonic() + self.tick, None
        while True:
            live = self.live()
            for p in live:
                p.join(timeout=0.5 / len(live))
            killed = []
            for c, p in self.procs:
                if p.exitcode is None or p.pid in self.seen:
                    continue
                self.seen.add(p.pid)
                if p.exitcode < 0:  # a signal that was not ours: SIGKILL, the OOM killer
                    self.killed.add(p.pid)
                    killed.append(f"worker {c.index} (pid {p.pid}, killed by {_signal_name(p.exitcode)})")
                elif p.exitcode not in (0, EXIT_STOPPED):
                    return  # an error: stop the others (they checkpoint) and report it
            now = time.monotonic()
            if not killed and now < next_check and self.live():
                continue
            next_check = now + self.tick
            for who in killed:
                print(f"sweep: {who}; the sweep goes on", flush=True)
            requeued = self.recover()
            for who in killed:
                self.replace(who)
            if requeued and not self.live():
                self.replace("the finished ones (trials were re-queued)")
            if self.live():
                settle_until = None
                continue
            # the local workers are done: trials RUNNING elsewhere finish, or their heartbeat stops and they are
            # re-queued (then a worker starts above); a dead worker's trial is never left RUNNING
            elsewhere = running_elsewhere(self.study, self.sweep)
            if not elsewhere:
                return
            if settle_until is None:
                settle_until = now + self.sweep.grace_period + 2 * self.sweep.heartbeat_interval
                print(f"sweep: waiting up to {settle_until - now:.0f} s for trial(s) {', '.join(map(str, elsewhere))} "
                      "of other workers (heartbeat: a dead one is re-queued)", flush=True)
            elif now >= settle_until:
                return
            time.sleep(min(self.tick, max(0.0, settle_until - now)))


def launch_local(ctxs: list[WorkerContext]) -> int:
    """N worker processes (spawned: no CUDA/fork surprises), watched by _Pool: a killed worker is replaced and its
    trial re-queued; Ctrl-C / SIGTERM stop them all gracefully; a worker's error stops the others and the sweep."""

    def _term(signum: int, frame: Any) -> None:
        raise _Stop()

    old = signal.signal(signal.SIGTERM, _term)
    stopped = False
    pool = _Pool(ctxs)
    procs = pool.procs  # started ones
    try:
        for c in ctxs:
            pool.start(c)
        pool.watch()
    except (KeyboardInterrupt, _Stop):
        stopped = True
        print("sweep: stopping workers (each checkpoints its trial; run the sweep again to continue)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
        _stop_all([p for _, p in procs])
    failed = [(c.index, p.exitcode) for c, p in procs
              if p.exitcode not in (0, EXIT_STOPPED, -signal.SIGTERM) and p.pid not in pool.killed]
    if failed and not stopped:
        i, code = failed[0]
        raise SweepError(f"sweep worker {i} failed (exit code {code}); its error is printed above")
    return EXIT_STOPPED if stopped or any(p.exitcode == EXIT_STOPPED for _, p in procs) else 0


def local_contexts(sweep: Sweep, parent: str | None, n: int, stream: int) -> list[WorkerContext]:
    """n local workers: torch threads split between them on a CPU, one GPU each on a multi-GPU machine."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 0 if torch.cuda.is_available() else max(1, cores // n)  # the cores this process may use (taskset)
    gpus = torch.cuda.device_count()
    return [WorkerContext(sweep, parent, i, stream + i, threads, str(i % gpus) if gpus > 1 else None)
            for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# A Slurm job array


def _array_task(ctx: WorkerContext, index: int) -> tuple[int, int | None]:
    """Task `index` of the job array: a worker with its own seed stream."""
    return _work(dataclasses.replace(ctx, index=index, stream=ctx.stream + index))


def launch_slurm(sweep: Sweep, ctx: WorkerContext, n: int) -> int:
    """A Slurm job array of n workers through submitit (gancore.cluster's executor); waits for them."""
    from gancore.cluster import Resources
    from gancore.cluster.array import run_array

    s = sweep.slurm
    res = Resources(gpus=s["gpus"], cpus=s["cpus"], mem=None if s["mem"] is None else str(s["mem"]),
                    time=str(s["time"]), partition=s["partition"], account=s["account"], qos=s["qos"])
    for attempt in (1, 2):
        code, array = run_array(functools.partial(_array_task, ctx), n, sweep.dir / "slurm", res,
                                name=f"sweep-{sweep.study}", parallelism=s["array_parallelism"])
        if code in (0, EXIT_STOPPED):
            return code
        # a task died (killed, out of memory, a node lost): its trial is still RUNNING in the study. Every task of
        # the array has ended now, so such trials are re-queued here and a second array finishes them (each from
        # its last checkpoint, in its MLflow run)
        study = open_study(sweep, open_storage(sweep.storage_url))
        requeued = recover_array(study, sweep, array)
        left = trials_left(study, sweep.n_trials)
        if left == 0:  # the other workers used the budget: nothing is lost
            print(f"sweep: Slurm worker(s) of array {array} failed, but every trial finished; see "
                  f"{sweep.dir / 'slurm'}", file=sys.stderr, flush=True)
            return 0
        if attempt == 1:
            print(f"sweep: Slurm worker(s) of array {array} died; trial(s) {requeued or 'none'} re-queued; a second "
                  "array finishes the study", flush=True)
            n = n if left is None else max(1, min(n, left))
    raise SweepError(f"Slurm workers failed in two arrays; see {sweep.dir / 'slurm'}; run the sweep again to "
                     "continue the re-queued trials")


def auto_workers(sweep: Sweep, launcher: str) -> tuple[int, str]:
    """`workers: auto`: local workers = the measured best trials per device (gancore/sweep/devices.py, bench/
    trials_per_device.py) x the GPUs here (one CPU device without GPUs). Slurm arrays: the default count."""
    if launcher == "slurm":
        return devices.DEFAULT_TRIALS_PER_DEVICE, "the default for a Slurm job array; pass --workers N"
    import torch

    k, source = devices.trials_per_device(sweep.base.train.compile)
    gpus = torch.cuda.device_count()
    per = f"{k} per GPU x {gpus} GPUs" if gpus else f"{k} on the CPU"
    return k * max(1, gpus), f"auto: {per}, {source}"
