"""Bounded waits for tests (issue #25): every wait on a subprocess, a pipe, a thread or a condition goes through
here, has a deadline and fails with what it waited for (and the tail of the child's output).

Each deadline is also cut to end MARGIN_S before the running test's pytest-timeout (conftest.py sets
`_test_deadline` when a test starts), so a stuck wait fails with its own message, and the test's fixtures still
clean up, instead of pytest-timeout's bare stack dump.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

MARGIN_S = 15.0  # what a failed wait leaves of the test's pytest-timeout: killing the child, the report, teardown
TAIL = 3000  # characters of a child's output in a failure message

_test_deadline: float | None = None  # time.monotonic() at which the running test's wait budget ends (conftest.py)


def budget(timeout: float) -> tuple[float, str]:
    """(seconds a wait of `timeout` may take, why it may take no longer) -- `timeout`, or less when the test's own
    pytest-timeout comes first."""
    timeout = max(timeout, 0.0)
    if _test_deadline is not None:
        left = _test_deadline - time.monotonic()
        if left < timeout:
            return max(left, 0.0), f"{left + MARGIN_S:.0f} s were left of the test's pytest-timeout"
    return timeout, f"after {timeout:g} s"


def tail(out: str | bytes | Path | list[Path] | None, n: int = TAIL) -> str:
    """The last `n` characters of a child's output (text, bytes, a log file; of each, for several log files)."""
    if isinstance(out, list):
        return "\n".join(f"--- {p.name} ---\n{tail(p, n)}" for p in out)
    if isinstance(out, Path):
        out = out.read_text(errors="replace") if out.is_file() else f"({out} does not exist)"
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return (out or "")[-n:]


def _failure(what: str, why: str, out: str | bytes | Path | None = None) -> AssertionError:
    text = tail(out)
    return AssertionError(f"{what}: {why}" + (f"\n--- output (last {TAIL} characters) ---\n{text}" if text else ""))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, with its process group when it leads one (start_new_session=True: a sweep and its workers)."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
            return
    except ProcessLookupError:  # gone (its group too)
        return
    proc.kill()


def _drain(proc: subprocess.Popen) -> str:
    """Kill `proc` if it still runs and return what its pipes held (stdout, then stderr)."""
    if proc.poll() is None:
        _kill(proc)
    try:
        out, err = proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):  # a grandchild holds the pipe open / a pipe already read
        return ""
    return "".join(tail(s) for s in (out, err) if s)


def run(cmd: list[str], *, timeout: float, what: str, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) that fails after `timeout` s (killed, with its output)."""
    limit, why = budget(timeout)
    kw.setdefault("text", True)
    if "stdout" not in kw and "stderr" not in kw:
        kw["capture_output"] = True
    try:
        return subprocess.run(cmd, timeout=limit, **kw)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        raise _failure(what, f"still running, {why}", (tail(e.stdout) + tail(e.stderr))) from None


def finish(proc: subprocess.Popen, *, timeout: float, what: str, log: Path | list[Path] | None = None) -> tuple:
    """proc.communicate() with a deadline: (stdout, stderr); killed, with its output, when it does not end."""
    limit, why = budget(timeout)
    try:
        return proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        raise _failure(what, f"still running, {why}", log or _drain(proc)) from None


def wait_exit(proc: subprocess.Popen, *, timeout: float, what: str, log: Path | list[Path] | None = None) -> int:
    """proc.wait() with a deadline (for a child whose output goes to a file, or is read elsewhere): its exit code."""
    limit, why = budget(timeout)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        raise _failure(what, f"still running, {why}", log or _drain(proc)) from None


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a child the test started (teardown): SIGTERM, then SIGKILL after `grace` s (0: SIGKILL at once); the
    SIGKILL takes the child's process group with it when it leads one (start_new_session=True: a sweep's workers)."""
    if proc.poll() is not None:  # reaped: its pid may belong to someone else by now, so nothing is signalled
        return
    if grace > 0:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    _kill(proc)
    proc.wait(timeout=10)  # SIGKILL cannot be caught: only an uninterruptible kernel wait outlasts this


def wait_for(until: Callable[[], object], *, timeout: float, what: str | Callable[[], str],
             proc: subprocess.Popen | list[subprocess.Popen] | None = None, log: Path | list[Path] | None = None,
             interval: float = 0.05):
    """Poll `until()` every `interval` s until it is true and return its value. Fails after `timeout` s, or at once
    when `proc` (the child, or one of the children, that should make it true) has exited, with its output (`log`,
    or its pipes). `what` may be a function, for a message that says how things stand when the wait fails."""
    limit, why = budget(timeout)
    end, procs = time.monotonic() + limit, proc if isinstance(proc, list) else [proc] if proc is not None else []
    while not (value := until()):
        for p in procs:
            if p.poll() is not None:
                raise _failure(_text(what), f"{_name(p)} ended (exit code {p.returncode}) first", log or _drain(p))
        if time.monotonic() >= end:
            raise _failure(_text(what), f"not yet, {why}", log or "".join(_drain(p) for p in procs) or None)
        time.sleep(interval)
    return value


def _text(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _name(proc: subprocess.Popen) -> str:
    return "the process" if not isinstance(proc.args, list) else f"`{' '.join(map(str, proc.args))[-200:]}`"


def readline(proc: subprocess.Popen, *, timeout: float, what: str) -> str:
    """proc.stdout.readline() with a deadline (the child is killed when no line comes), the line stripped."""
    limit, why = budget(timeout)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(limit)
    if reader.is_alive():
        proc.kill()  # closes the pipe: the reader's readline returns
        reader.join(10)
        raise _failure(what, f"no line from the process, {why}", _drain(proc))
    if not got[0]:
        raise _failure(what, f"the process closed its output (exit code {proc.wait(timeout=10)})", _drain(proc))
    return got[0].strip()


def join(worker, *, timeout: float, what: str | Callable[[], str]) -> None:
    """worker.join() with a deadline, for a threading.Thread or a multiprocessing.Process."""
    limit, why = budget(timeout)
    worker.join(limit)
    if worker.is_alive():
        raise _failure(_text(what), f"still running, {why}")
