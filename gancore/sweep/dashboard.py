"""optuna-dashboard on a sweep's study storage, on 127.0.0.1 (`make dashboard`, `jobs/sweep.py SWEEP --dashboard`).

The storage is the sweep's: its `storage:` section, --storage, else sqlite:///<sweep dir>/optuna.db. The study must
already be there (a dashboard on a path that holds no study would show nothing, and opening a missing SQLite file
would create an empty one). Each trial links to its MLflow run (user attr `mlflow.run_id`); each MLflow child run
links back (tags `optuna.study`, `optuna.trial`): see gancore/tracking/sweep_runs.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

from gancore.errors import SweepError
from gancore.sweep.spec import Sweep
from gancore.sweep.storage import describe_url, open_storage, open_study

HOST = "127.0.0.1"  # never another interface: the dashboard can edit the study (tell, user attrs, notes)
DEFAULT_PORT = 8080  # optuna-dashboard's own default; `make ui` (MLflow) has 5000


def _storage_file(url: str) -> Path | None:
    """The file a sqlite / journal storage lives in (None for a database server)."""
    if url.startswith("journal:"):
        return Path(url[len("journal:"):]).expanduser()
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        return Path(db).expanduser() if db and db != ":memory:" else None
    return None


def check_study(sweep: Sweep) -> None:
    """A SweepError unless the sweep's storage exists and holds its study; creates nothing."""
    url = sweep.storage_url
    path = _storage_file(url)
    if path is not None and not path.is_file():
        raise SweepError(f"no study storage at {path} (study {sweep.study!r}); run the sweep first "
                         f"(`python jobs/sweep.py {sweep.path or 'SWEEP.yaml'}`) or give its storage with --storage")
    open_study(sweep, open_storage(url))  # a missing study: a one-line SweepError that says how to start it


def _executable() -> str:
    """The optuna-dashboard script of this environment (beside this python), else the one on PATH."""
    exe = Path(sys.executable).parent / "optuna-dashboard"
    found = str(exe) if exe.is_file() and os.access(exe, os.X_OK) else shutil.which("optuna-dashboard")
    if found is None:
        raise SweepError("optuna-dashboard is not installed; pip install optuna-dashboard (or `make venv`)")
    return found


def _check_port(port: int) -> None:
    """A one-line SweepError when `port` is taken on HOST (instead of optuna-dashboard's traceback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a TIME_WAIT port is free
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise SweepError(f"cannot listen on {HOST}:{port} ({e.strerror or e}); pick another port with "
                             "PORT=... (make) or --port") from None


def dashboard_argv(sweep: Sweep, port: int = DEFAULT_PORT) -> list[str]:
    """optuna-dashboard's command line for the sweep's study storage (checked first: see check_study)."""
    if not 1 <= port <= 65535:
        raise SweepError(f"port {port}: expected 1..65535")
    check_study(sweep)
    url = sweep.storage_url
    # a journal file is a plain path to optuna-dashboard; the class hint keeps it from guessing
    storage = [str(_storage_file(url)), "--storage-class", "JournalFileStorage"] if url.startswith("journal:") \
        else [url]
    # wsgiref: one process (gunicorn, if installed, forks workers that a stopped parent could leave behind)
    return [_executable(), *storage, "--host", HOST, "--port", str(port), "--server", "wsgiref"]


def serve(sweep: Sweep, port: int = DEFAULT_PORT) -> NoReturn:
    """Replace this process by optuna-dashboard on the sweep's storage (Ctrl-C stops it)."""
    argv = dashboard_argv(sweep, port)
    _check_port(port)
    print(f"optuna-dashboard: study {sweep.study!r} in {describe_url(sweep.storage_url)} at "
          f"http://{HOST}:{port}/dashboard/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # an argv list, no shell: the storage URL is never interpreted
