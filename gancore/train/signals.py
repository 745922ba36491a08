"""Stop requests: SIGUSR1 (Slurm's warning before the time limit / preemption), SIGUSR2 (submitit's) or SIGTERM.

The loop checks `StopFlag.requested(step)` once per step, finishes that step, writes a checkpoint and returns
"stopped" (the CLIs exit with gancore.errors.EXIT_STOPPED; a requeued job resumes from the checkpoint). An
evaluation asks `evaluating()` before every extractor batch and ends within one batch; every rank then asks
`evaluation_done()` (the same answer everywhere).

Who else handles these signals (checked for torch 2.14 / Accelerate 1.15): Accelerate installs no handler; the
torchrun agent (`accelerate launch` on several processes, `torch.distributed.run`) handles SIGTERM, SIGINT,
SIGHUP and SIGQUIT by sending the same signal to every worker (then SIGKILL after 30 s), and dies on SIGUSR1;
NCCL 2.12-2.13 caught SIGUSR1 in its proxy thread (why submitit moved to USR2), later NCCL only when
NCCL_PROXY_DUMP_SIGNAL asks for it. So every rank handles all three itself, a signal that reaches any one rank
stops them all (the ranks agree every SYNC_EVERY steps), and a warning names an NCCL setting that would take one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGUSR1, SIGUSR2 or SIGTERM while installed.

    With several processes every rank must stop at the same step (a rank that stops alone leaves the others blocked
    in a collective), so there the ranks agree with one tiny all-reduce every SYNC_EVERY steps instead of a host
    sync per step.
    """

    SYNC_EVERY = 10
    HOLD_S = 120.0

    def __init__(self, accelerator: Any = None) -> None:
        self.signal: int | None = None
        # test hook (tests/test_slurm.py, test_faults.py, test_tracking_outage.py, test_distributed.py): the run waits
        # at this step until a stop signal arrives (on any rank) or the file GANCORE_TEST_HOLD_RELEASE names exists
        # (at most HOLD_S), so a test can act on a run that is certainly mid-run without racing it to its end,
        # however fast the machine. One process stops at the held step; several agree on the stop as usual.
        self.hold_at = int(os.environ.get("GANCORE_TEST_HOLD_AT_STEP") or 0)
        self.release = os.environ.get("GANCORE_TEST_HOLD_RELEASE") or None
        self._old: dict[int, Any] = {}
        self._acc = accelerator if accelerator is not None and accelerator.num_processes > 1 else None

    def install(self) -> None:
        taken = os.environ.get("NCCL_PROXY_DUMP_SIGNAL", "-1").strip()
        if hasattr(signal, "SIGUSR1") and taken in (str(int(signal.SIGUSR1)), str(int(signal.SIGUSR2))):
            log.warning("NCCL_PROXY_DUMP_SIGNAL=%s: NCCL takes signal %s, so it no longer stops the run with a "
                        "checkpoint; unset it (SIGTERM still works)", taken, signal.Signals(int(taken)).name)
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, step: int) -> bool:
        if self._acc is None:
            if step == self.hold_at:
                self._hold()
            return self.signal is not None
        if step == self.hold_at:
            self._hold_together()
        if step % self.SYNC_EVERY:
            return False
        return self.agree()

    def agree(self) -> bool:
        """Whether any rank has a stop request, now (with several processes a collective every rank calls)."""
        return self._tick(0.0)[0] if self._acc is not None else self.signal is not None

    # An evaluation runs on the main process only. Before each extractor batch it asks `evaluating()`; with several
    # processes that is one tiny all-reduce ("tick") with the other ranks, which meanwhile answer ticks in
    # `evaluation_done` until the main process's last tick says it is done. So a signal that reaches any one rank
    # ends the evaluation within one batch, and every rank leaves it agreeing whether to stop.

    def evaluating(self) -> bool:
        """Main process, before each extractor batch of an evaluation: whether a stop was requested on any rank."""
        return self.agree()

    def evaluation_done(self, is_main: bool, completed: bool) -> tuple[bool, bool]:
        """Every rank, when the main process's evaluation is over: (stop now, the main process's evaluation
        `completed`), the same answers on every rank (`completed` is read from the main process only)."""
        if self._acc is None:
            return self.signal is not None, completed
        if is_main:
            stop, code = self._tick(2.0 if completed else 1.0)
            return stop, code > 1.5
        while True:
            stop, code = self._tick(0.0)
            if code > 0:
                return stop, code > 1.5

    def _tick(self, done: float) -> tuple[bool, float]:
        """(any rank has a stop request, the main process's `done` code: 0 evaluating, 1 stopped, 2 completed):
        one all-reduce of two numbers (the other ranks send 0)."""
        t = torch.tensor([float(self.signal is not None), done], device=self._acc.device)
        total = self._acc.reduce(t, "sum")
        return bool(total[0].item() > 0), float(total[1].item())

    def _released(self) -> bool:
        return bool(self.release) and os.path.exists(self.release)

    def _hold(self) -> None:
        end = time.monotonic() + self.HOLD_S
        while self.signal is None and time.monotonic() < end and not self._released():
            time.sleep(0.05)

    def _hold_together(self) -> None:
        """Every rank, at the held step: wait until any rank has a stop signal, is released or has waited HOLD_S.
        One all-reduce per poll, so the ranks leave in the same poll (none is left alone in a collective)."""
        end = time.monotonic() + self.HOLD_S
        while True:
            mine = [float(self.signal is not None), float(time.monotonic() >= end or self._released())]
            if self._acc.reduce(torch.tensor(mine, device=self._acc.device), "sum").sum().item() > 0:
                return
            time.sleep(0.05)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
