#!/usr/bin/env python
"""Send a run's kept tracking data to MLflow: `python jobs/sync.py RUN_DIR [--uri URI]`.

A run whose tracking server was away at its end keeps what it could not send in RUN_DIR/tracking_outbox; this
delivers it (idempotent: what the run already holds is not logged twice). Exit codes: 0 synced (or nothing left),
2 no outbox in RUN_DIR, server unreachable, or run not in the store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # _cli sits beside this file (also when loaded by path)
    sys.path.append(str(Path(__file__).resolve().parent))

from _cli import call, quiet_third_party, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="the run directory (holds tracking_outbox/)")
    p.add_argument("--uri", default=None, help="tracking URI, when the server moved (default: the one the run used)")
    args = p.parse_args(argv)
    quiet_third_party()

    def sync() -> int:
        from gancore.tracking import sync_run_dir

        print(sync_run_dir(args.run_dir, uri=args.uri))
        return 0

    return call(sync)


if __name__ == "__main__":
    run(main)
