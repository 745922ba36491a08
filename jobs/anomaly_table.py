#!/usr/bin/env python
"""GANomaly AUROC per normal digit: `python jobs/anomaly_table.py [--config PRESET] [--digits 0-9|3,5,7|4] [key=value ...]`.

Trains one model per normal digit (each a run in OUT/digit_<d>, resumed if it holds checkpoints), prints the
AUROC table and writes OUT/table.csv and OUT/table.md (also an MLflow run's artifacts when tracking is on).
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal (rerun the same command to continue).
"""

from __future__ import annotations

import argparse

from _cli import Parser, out_dir, quiet_third_party, run

from gancore.errors import EXIT_STOPPED


def digits(spec: str) -> list[int]:
    """`0-9` (a range), `3,5,7` (a list), `4`, or a mix (`0-2,7`) -> the digits in that order."""
    out: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected digits like 0-9, 3,5,7 or 4, got {spec!r}") from None
        if not 0 <= a <= b <= 9:
            raise argparse.ArgumentTypeError(f"digits go from 0 to 9 (a range low-high, low <= high), got {spec!r}")
        out += [d for d in range(a, b + 1) if d not in out]
    return out


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mnist_ganomaly.yaml", help="GANomaly preset")
    ap.add_argument("--digits", nargs="+", default=["0-9"], metavar="DIGITS",
                    help="normal digits: 0-9 (default), 3,5,7, 4, or several: --digits 0 1 2")
    ap.add_argument("--out", type=out_dir, help="output folder (default runs/<preset>-table-<timestamp>)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run, e.g. train.epochs=5")
    args = ap.parse_args()
    # `--digits 0-9 train.epochs=5`: nargs="+" also takes the overrides that follow; hand them back
    overrides = [*args.overrides, *(t for t in args.digits if "=" in t)]
    try:
        normal = list(dict.fromkeys(d for t in args.digits if "=" not in t for d in digits(t)))  # in order, each once
    except argparse.ArgumentTypeError as e:
        ap.error(f"argument --digits: {e}")
    if not normal:
        ap.error("argument --digits: expected digits like 0-9, 3,5,7 or 4")
    quiet_third_party()
    from gancore.config import load_config

    load_config(args.config, overrides)  # before the heavy imports: a bad config fails in a blink

    from rich.console import Console

    from gancore.experiments.anomaly_table import anomaly_table, rich_table

    rows, out, complete = anomaly_table(args.config, normal, overrides, args.out)
    Console().print(rich_table(rows))
    print(f"table: {out / 'table.csv'}, {out / 'table.md'}")
    if not complete:
        print(f"stopped before every digit finished; rerun with --out {out} to continue")
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    run(main)
