"""Shared CLI glue: run a main function, map user errors to one line and an exit code."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/x.py` from a checkout

from gancore.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, GancoreError  # noqa: E402


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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what> (see <prog> --help)` and exit code 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def deprecated_alias(new: str) -> type[argparse.Action]:
    """argparse action for an old option name that still works: stores into the new option's dest, warns in one line."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001 - argparse's
            print(f"warning: {option_string} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Alias


def positive_int(v: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line usage error, exit code 2)."""
    return _int_at_least(v, 1, "a positive integer")


def non_negative_int(v: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(v, 0, "an integer >= 0")


def _int_at_least(v: str, lo: int, what: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
    return n


def positive_float(v: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v!r}")
    return x


def out_dir(v: str) -> str:
    """argparse type: a folder to write into (existing or creatable), checked before anything runs."""
    return _writable(v, folder=True)


def out_file(v: str) -> str:
    """argparse type: a file to write (new or replaced), checked before anything runs."""
    return _writable(v, folder=False)


def _writable(v: str, folder: bool) -> str:
    p = Path(v).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{v!r} is an existing file; expected a folder (new or existing)")
    if not folder and p.is_dir():
        raise argparse.ArgumentTypeError(f"{v!r} is a folder; expected a file path")
    parent = p if folder else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {v!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {v!r}: no write permission in {str(parent)!r}")
    return v


def quiet_third_party() -> None:
    """Keep library chatter (MLflow, Accelerate) out of the user's terminal unless asked for."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
