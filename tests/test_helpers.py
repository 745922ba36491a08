"""tests/helpers.py: each bounded wait fails when its deadline passes, naming what it waited for, with the child's
output. (Short deadlines here are fine: these tests assert the failure, not how fast anything is.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import helpers

# prints a line, then stays silent (until killed)
_SILENT = "import sys, time; print('hello from the child', flush=True); time.sleep(600)"


def _child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SILENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_wait_for_fails_at_its_deadline_naming_what_it_waited_for():
    with pytest.raises(AssertionError, match=r"^the moon turning to cheese: not yet, after 0.5 s$"):
        helpers.wait_for(lambda: False, timeout=0.5, what="the moon turning to cheese")
    n = iter(range(10))
    assert helpers.wait_for(lambda: next(n) == 3 and "done", timeout=60, what="three polls", interval=0) == "done"


def test_wait_for_fails_when_the_process_it_waits_on_ends_first():
    proc = subprocess.Popen([sys.executable, "-c", "print('bye'); raise SystemExit(4)"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with pytest.raises(AssertionError, match=r"(?s)a checkpoint: `.*` ended \(exit code 4\) first.*bye"):
        helpers.wait_for(lambda: False, timeout=60, what="a checkpoint", proc=proc)


def test_readline_fails_at_its_deadline_and_kills_the_silent_child():
    proc = _child()
    assert helpers.readline(proc, timeout=60, what="the greeting") == "hello from the child"
    with pytest.raises(AssertionError, match=r"^the second line: no line from the process, after 0.5 s"):
        helpers.readline(proc, timeout=0.5, what="the second line")
    assert proc.poll() == -9  # killed: nothing is left running


def test_run_and_finish_fail_at_their_deadline_with_the_output_so_far():
    with pytest.raises(AssertionError, match=r"(?s)^the sleeper: still running, after 1 s.*hello from the child"):
        helpers.run([sys.executable, "-c", _SILENT], timeout=1, what="the sleeper")
    proc = _child()
    with pytest.raises(AssertionError, match=r"(?s)^the sleeper: still running, after 1 s.*hello from the child"):
        helpers.finish(proc, timeout=1, what="the sleeper")
    assert proc.poll() == -9


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: dead
    except FileNotFoundError:
        return True


def test_a_failed_wait_kills_a_group_leaders_whole_group():
    """A child in its own session (a sweep and its workers): the wait that gives up kills its grandchildren too."""
    code = ("import subprocess, sys; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(g.pid, flush=True); g.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    grandchild = int(helpers.readline(proc, timeout=60, what="the grandchild's pid"))
    with pytest.raises(AssertionError, match=r"^the group: still running, after 0.5 s"):
        helpers.finish(proc, timeout=0.5, what="the group")
    assert proc.poll() == -9
    helpers.wait_for(lambda: _gone(grandchild), timeout=30, what=f"grandchild {grandchild} gone")


def test_join_fails_at_its_deadline():
    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    with pytest.raises(AssertionError, match=r"^the coordinator: still running, after 0.5 s$"):
        helpers.join(t, timeout=0.5, what="the coordinator")
    release.set()
    helpers.join(t, timeout=60, what="the released thread")


def test_a_wait_ends_before_the_tests_own_pytest_timeout(monkeypatch):
    """A wait asked for longer than the test has left is cut to what is left, and says so."""
    assert helpers._test_deadline is not None  # conftest.py set it from this test's 300 s pytest-timeout
    monkeypatch.setattr(helpers, "_test_deadline", time.monotonic() + 0.5)  # as if 0.5 s + MARGIN_S were left
    with pytest.raises(AssertionError, match=r"^a slow job: not yet, 1[56] s were left of the test's pytest-timeout$"):
        helpers.wait_for(lambda: False, timeout=200, what="a slow job")


@pytest.mark.timeout(123)
def test_the_wait_budget_follows_the_tests_timeout_marker():
    left = helpers._test_deadline - time.monotonic()
    assert 0 < left <= 123 - helpers.MARGIN_S  # the marker's 123 s, not pyproject's 300 s
