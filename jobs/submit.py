#!/usr/bin/env python
"""Launch training runs through submitit: `python jobs/submit.py --cluster slurm --config configs/quickstart.yaml k=v`.

Several runs at once: `--sets-file sets.txt` (one `k=v k2=v2` set per line), repeated `--set "k=v k2=v2"`, and/or
`--seeds 0,1,2` (every set x every seed); on Slurm they go out as one job array. Jobs checkpoint and requeue
themselves on preemption / time limit and resume into the same MLflow run. `--wait` shows a live status table and
then the results. Exit codes: 0 submitted (with --wait: every run finished), 1 a run failed, 2 bad input / no Slurm.
"""

from __future__ import annotations

import argparse
import shlex

from _cli import (
    Parser,
    deprecated_alias,
    non_negative_int,
    out_dir,
    positive_float,
    positive_int,
    quiet_third_party,
    run,
)


def main() -> int:
    from gancore.cluster import runs
    from gancore.cluster.resources import CLUSTERS, Resources

    default = Resources()  # the one place the resource defaults live
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                    help="slurm: sbatch via submitit; local: subprocesses on this machine; debug: in this process")
    ap.add_argument("--config", help="preset YAML (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides shared by every run")
    ap.add_argument("--out", type=out_dir, help="run dir (several runs: DIR-00, DIR-01, ...); default runs/<preset>-<timestamp>")
    several = ap.add_argument_group("several runs")
    several.add_argument("--sets-file", metavar="FILE", help="one override set per line ('k=v k2=v2'; # comments)")
    several.add_argument("--sweep-file", dest="sets_file", action=deprecated_alias("--sets-file"),
                         help=argparse.SUPPRESS)  # the old name (a sweep file is jobs/sweep.py's Optuna YAML)
    several.add_argument("--set", dest="sets", action="append", default=[], metavar="'K=V K2=V2'",
                         help="one override set (repeat for more runs)")
    several.add_argument("--seeds", help="comma-separated train.seed values, crossed with the override sets")
    res = ap.add_argument_group("resources (per run)")
    res.add_argument("--gpus", type=non_negative_int, default=default.gpus,
                     help="GPUs per node, one training process each (default %(default)s)")
    res.add_argument("--nodes", type=positive_int, default=default.nodes, help="(default %(default)s)")
    res.add_argument("--cpus", type=positive_int, default=default.cpus, help="CPUs per process (default %(default)s)")
    res.add_argument("--mem", default=default.mem, help="memory per node, e.g. 16G (default %(default)s)")
    res.add_argument("--time", default=default.time, help="time limit: minutes or H:MM:SS (default %(default)s)")
    res.add_argument("--partition", help="Slurm partition (-p)")
    res.add_argument("--account", help="Slurm account (-A)")
    res.add_argument("--qos", help="Slurm QOS")
    ap.add_argument("--name", help="job name (default gancore-<preset>)")
    ap.add_argument("--folder", type=out_dir, default=runs.DEFAULT_FOLDER,
                    help="submitit folder: job pickles and logs (default %(default)s)")
    ap.add_argument("--wait", action="store_true", help="show a live status table until every job ended, then the results")
    ap.add_argument("--poll", type=positive_float, default=runs.POLL_S,
                    help="--wait: seconds between status checks (default %(default)s)")
    args = ap.parse_intermixed_args()  # k=v overrides may come before or after the options
    quiet_third_party()

    from rich.console import Console

    sets = [*(runs.read_sets_file(args.sets_file) if args.sets_file else []),
            *(shlex.split(s) for s in args.sets)]
    seeds = runs.parse_seeds(args.seeds) if args.seeds else None
    resources = Resources(gpus=args.gpus, nodes=args.nodes, cpus=args.cpus, mem=args.mem, time=args.time,
                          partition=args.partition, account=args.account, qos=args.qos)
    specs = runs.expand_runs(args.overrides, sets, seeds)
    subs = runs.submit_runs(args.cluster, args.config, specs, resources, out=args.out, folder=args.folder,
                            name=args.name)

    console = Console()
    for s in subs:
        print(f"submitted {s.job.job_id}  {s.spec.label or '(base config)'}  run dir {runs.short_path(s.job_obj.out)}  "
              f"log {runs.short_path(s.log)}")
    if not args.wait and args.cluster != "debug":  # debug jobs run in this process when their result is read
        if args.cluster == "slurm":
            print("follow with: squeue --me; results land in the MLflow store (python jobs/runs.py)")
        return 0
    runs.wait(subs, poll_s=args.poll, console=console)
    outcomes = runs.collect(subs)
    for line in runs.result_lines(outcomes):
        print(line)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    run(main)
