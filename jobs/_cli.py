"""Shared CLI glue: run a main function, map user errors to one line and an exit code (shared/STYLE.md #11)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout

from gancore.errors import EXIT_INTERRUPTED, EXIT_OK, GancoreError  # noqa: E402


def call(main: Callable[[], int | None]) -> int:
    """Call main() and return its exit code; a GancoreError prints `error: ...` on one line and gives its code."""
    try:
        return main() or EXIT_OK
    except GancoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(main: Callable[[], int | None]) -> None:
    """The jobs' entry point: exit with `call(main)`'s code."""
    sys.exit(call(main))


def quiet_third_party() -> None:
    """Keep library chatter (MLflow, Accelerate) out of the user's terminal unless asked for."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
