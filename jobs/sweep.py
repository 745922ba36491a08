#!/usr/bin/env python
"""Run an Optuna sweep: `python jobs/sweep.py sweeps/mnist_dcgan.yaml [--workers N] [--launcher local|slurm]
[--storage URL] [--n-trials N]`.

The same study name on the same storage continues the study (n_trials is the study's total). Storage: SQLite under
the sweep dir by default; `journal:PATH` or postgresql://... for Slurm workers on several nodes. Exit codes: 0 done,
2 bad input / unusable storage, 75 stopped by a signal (run the same command again to continue).
`--confirm` retrains the best trial on fresh seeds at the full budget beside a baseline (the file's `confirm:`);
`--confirm-runs winner|baseline` and `--confirm-seeds 1,2` take a share of those runs (one process or job each).
`--worker` runs one worker in this process (slurm/sweep.sh array tasks); `--prepare` only creates the study and the
parent MLflow run; `--report` only prints the table and writes best.yaml and the figures; `--dashboard [--port N]`
starts optuna-dashboard on the study's storage, on 127.0.0.1 (`make dashboard`).
"""

from __future__ import annotations

import argparse

from _cli import Parser, out_dir, positive_float, positive_int, quiet_third_party, run

from gancore.sweep.spec import ROLES


def _workers(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {v!r}")
    return n


def _seeds(v: str) -> tuple[int, ...]:
    from gancore.cluster.runs import parse_seeds  # the one parser of a comma-separated seed list (submit --seeds)
    from gancore.errors import LaunchError

    try:
        seeds = tuple(parse_seeds(v))
    except LaunchError:
        seeds = ()
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas (e.g. 1,2), got {v!r}")
    return seeds


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep file (sweeps/*.yaml)")
    ap.add_argument("--workers", type=_workers, help="parallel workers, a number or auto (the measured best "
                    "trials per device x GPUs; bench/trials_per_device.py); default: the sweep file's `workers`, "
                    "else auto")
    ap.add_argument("--launcher", choices=("local", "slurm"), default="local",
                    help="local: worker processes on this machine; slurm: a Slurm job array through submitit")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///F.db, journal:F.log, postgresql://...)")
    ap.add_argument("--n-trials", type=positive_int, help="total trials of the study (overrides budget.n_trials)")
    ap.add_argument("--timeout-s", type=positive_float, help="stop starting trials after this many seconds (per run)")
    ap.add_argument("--out", type=out_dir, help="root of sweep dirs (default: the sweep file's `out`, else runs/sweeps)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--worker", action="store_true", help="be one worker of an already prepared sweep")
    mode.add_argument("--prepare", action="store_true", help="create/check the study and parent run, then exit")
    mode.add_argument("--report", action="store_true", help="only report (table, best.yaml, figures)")
    mode.add_argument("--confirm", action="store_true", help="train the best trial on the sweep file's fresh "
                      "confirm.seeds at the full budget beside its baseline preset, measure both, write "
                      "results/<study>_confirm.md (resumable)")
    mode.add_argument("--dashboard", action="store_true", help="optuna-dashboard on the study's storage, on "
                      "127.0.0.1 (the study must exist)")
    ap.add_argument("--port", type=positive_int, help="--dashboard's port (default 8080)")
    ap.add_argument("--confirm-runs", choices=ROLES, help="with --confirm: only these runs "
                    "(baseline: while the search still runs; default all, after the search)")
    ap.add_argument("--confirm-seeds", type=_seeds, metavar="S[,S...]", help="with --confirm: only these seeds "
                    "(of the --confirm-runs roles), e.g. one seed per process, machine or Slurm job; the table "
                    "holds every run that has finished")
    args = ap.parse_args()
    if args.port is not None and not args.dashboard:
        ap.error("--port goes with --dashboard")
    for flag, value in (("--confirm-runs", args.confirm_runs), ("--confirm-seeds", args.confirm_seeds)):
        if value is not None and not args.confirm:
            ap.error(f"{flag} goes with --confirm")
    quiet_third_party()

    from gancore.sweep import load_sweep, run_sweep, run_worker

    sweep = load_sweep(args.sweep, storage=args.storage, n_trials=args.n_trials, timeout_s=args.timeout_s,
                       out=args.out)
    if args.dashboard:  # reads the study, writes nothing: no sweep-dir check
        from gancore.sweep.dashboard import DEFAULT_PORT, serve

        serve(sweep, port=args.port or DEFAULT_PORT)
    try:  # the sweep file's own `out:` is checked here as --out is by argparse
        out_dir(str(sweep.dir))
    except argparse.ArgumentTypeError as e:
        ap.error(f"sweep dir: {e}")
    if args.worker:
        return run_worker(sweep)
    if args.confirm:
        from gancore.sweep.confirm import run_confirm

        return run_confirm(sweep, runs=args.confirm_runs or "all", seeds=args.confirm_seeds)
    return run_sweep(sweep, workers=args.workers, launcher=args.launcher, report_only=args.report,
                     prepare_only=args.prepare)

if __name__ == "__main__":
    run(main)
