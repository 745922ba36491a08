"""Shared CLI glue: run a main function, map user errors to one line and an exit code (shared/STYLE.md #11)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout

from gancore.errors import GancoreError  # noqa: E402


def run(main: Callable[[], int | None]) -> None:
    """Call main(); a GancoreError prints `error: ...` on one line and exits with its code."""
    try:
        code = main()
    except GancoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def quiet_third_party() -> None:
    """Keep library chatter (MLflow, Accelerate) out of the user's terminal unless asked for."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
