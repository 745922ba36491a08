#!/usr/bin/env python
"""GANomaly AUROC per normal digit: `python jobs/anomaly_table.py [--config PRESET] [--digits 0 1 ...] [key=value ...]`.

Trains one model per normal digit (each a run in OUT/digit_<d>, resumed if it holds checkpoints), prints the
AUROC table and writes OUT/table.csv and OUT/table.md (also an MLflow run's artifacts when tracking is on).
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal (rerun the same command to continue).
"""

from __future__ import annotations

import argparse

from _cli import quiet_third_party, run

from gancore.errors import EXIT_STOPPED


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mnist_ganomaly.yaml", help="GANomaly preset")
    ap.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="normal digits (default 0..9)")
    ap.add_argument("--out", help="output folder (default runs/<preset>-table-<timestamp>)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run, e.g. train.epochs=5")
    args = ap.parse_args()
    quiet_third_party()

    from rich.console import Console

    from gancore.experiments.anomaly_table import anomaly_table, rich_table

    rows, out, complete = anomaly_table(args.config, args.digits, args.overrides, args.out)
    Console().print(rich_table(rows))
    print(f"table: {out / 'table.csv'}, {out / 'table.md'}")
    if not complete:
        print(f"stopped before every digit finished; rerun with --out {out} to continue")
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    run(main)
