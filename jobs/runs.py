#!/usr/bin/env python
"""List tracked runs: `python jobs/runs.py [--experiment NAME] [--sort METRIC] [--limit N] [--columns KEYS] [--uri URI]`;
compare two: `python jobs/runs.py --compare RUN_A RUN_B [--uri URI]`."""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _cli sits beside this file (also when loaded by path)
    sys.path.append(str(Path(__file__).resolve().parent))

from _cli import Parser, call, positive_int, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse, print the runs table; returns the exit code (`_cli.call` maps a user error to one line and code 2)."""
    p = Parser(description="Runs of an MLflow experiment: key params, headline statistics, best FID.")
    p.add_argument("--experiment", default="gancore", help="MLflow experiment name (default: gancore)")
    p.add_argument("--sort", default=None, help="order by a metric's last value, ascending; --sort=-NAME descends")
    p.add_argument("--limit", type=positive_int, default=20, help="at most this many runs (default: 20)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="two run ids (or unique prefixes, e.g. the table's 8 characters): the params that differ "
                   "and every metric's last value, side by side")
    p.add_argument("--columns", default="", metavar="KEYS",
                   help="more columns, comma-separated: param keys (optim.lr_g), metric names (their last value), "
                   "or 'all' (family, model.arch and the params that differ between the runs); the default fits 80 "
                   "columns")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    args = p.parse_args(argv)

    def show() -> int:
        from rich.console import Console

        from gancore.tracking import compare_table, runs_table

        if args.compare:
            Console().print(compare_table(*args.compare, uri=args.uri))
        else:
            cols = tuple(c.strip() for c in args.columns.split(",") if c.strip())
            Console().print(runs_table(args.experiment, sort=args.sort, limit=args.limit, uri=args.uri, columns=cols))
        return 0

    return call(show)


if __name__ == "__main__":
    run(main)
