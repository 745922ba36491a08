"""List tracked runs: `python jobs/runs.py [--experiment NAME] [--sort METRIC] [--limit N] [--uri URI]`."""

from __future__ import annotations

import argparse
import sys

from gancore.errors import GancoreError


def main(argv: list[str] | None = None) -> int:
    """Parse, print the runs table, map user errors to one line and exit code 2."""
    p = argparse.ArgumentParser(description="Runs of an MLflow experiment: key params, last losses, best FID.")
    p.add_argument("--experiment", default="gancore", help="MLflow experiment name (default: gancore)")
    p.add_argument("--sort", default=None, help="order by a metric's last value, ascending; --sort=-NAME descends")
    p.add_argument("--limit", type=int, default=20, help="at most this many runs (default: 20)")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    args = p.parse_args(argv)

    from rich.console import Console

    from gancore.tracking import runs_table

    try:
        table = runs_table(args.experiment, sort=args.sort, limit=args.limit, uri=args.uri)
    except GancoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
