#!/usr/bin/env python
"""Reproduce a suite of reference experiments: `python jobs/reproduce.py mnist|cifar10|families|bests|all [--epochs N]`.

Trains every experiment of the suite (or reuses its finished run), evaluates all of them under one protocol
(`--protocol domain`: the dataset's own classifier, fast on a CPU; `inception`: the FID Inception), and writes
results/<table>.md, .csv and _fid.png (FID vs step), where <table> is the suite with the budget and protocol when
they are not the defaults (mnist, mnist_3ep, mnist_3ep_inception): a run never writes into a table of another budget
or protocol, and rows of the table that it does not measure again are kept. Interrupt it and run the same
command again: it continues. `--epochs N` is the reduced budget (every experiment trains N epochs);
`--dry-run` prints the plan and its estimated training time on this device. `make reproduce SUITE=mnist`.
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal (rerun to continue).
"""

from __future__ import annotations

from pathlib import Path

from _cli import Parser, out_dir, positive_int, quiet_third_party, run

from gancore.errors import EXIT_STOPPED


def main() -> int:
    from gancore.experiments.reproduce import PROTOCOLS, SUITES

    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=list(SUITES), help="which experiments")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="domain", help="the extractor every number is measured with")
    ap.add_argument("--epochs", type=positive_int, help="reduced budget: train every experiment this many epochs")
    ap.add_argument("--final", choices=PROTOCOLS[1:], help="also measure each best checkpoint with this extractor "
                    "at the end (inception: about 15 min per 10k images on a 2-core CPU)")
    ap.add_argument("--seeds", help="comma-separated train.seed values: every experiment once per seed, with a "
                    "mean ± sd row per experiment (default: once, the preset's seed)")
    ap.add_argument("--n-samples", type=positive_int, default=10000, help="generated images per evaluation (10000)")
    ap.add_argument("--out", type=out_dir, default=Path("results"), help="where the tables go (results/)")
    ap.add_argument("--runs", type=out_dir, default=Path("runs/reproduce"), help="where the runs go (runs/reproduce/)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for every experiment")
    args = ap.parse_intermixed_args()  # overrides may follow the options
    quiet_third_party()
    from gancore.cluster.runs import parse_seeds
    from gancore.experiments import reproduce as rp

    seeds = tuple(parse_seeds(args.seeds)) if args.seeds else None
    plans = rp.plan(args.suite, args.protocol, args.epochs, args.n_samples, tuple(args.overrides), args.runs, seeds)
    if args.dry_run:
        total = 0.0
        for p in plans:
            state = "reuse" if rp.finished_run(p) else "train"
            secs = 0.0 if state == "reuse" else rp.estimate_seconds(p)
            total += secs
            print(f"{p.label:34s} {state:5s} {p.steps:>7d} steps  ~{secs / 60:7.1f} min  {p.run_dir}")
        print(f"estimated training time on this device: {total / 3600:.1f} h (evaluations come on top)")
        if args.final:
            secs = rp.estimate_final_seconds(plans, args.final)
            print(f"--final {args.final}: ~{secs / 60:.0f} min more for {len(plans)} evaluation(s) of "
                  f"{args.n_samples} images and the real statistics (measured here on a short probe)")
        return 0
    name = rp.table_name(args.suite, args.protocol, args.epochs)  # one table per suite, budget and protocol
    rows, complete = rp.reproduce(plans, args.out, args.suite, args.protocol, final=args.final, name=name)
    print(f"{len(rows)}/{len(plans)} experiments in {Path(args.out) / (name + '.md')}")
    return 0 if complete else EXIT_STOPPED


if __name__ == "__main__":
    run(main)
