#!/usr/bin/env python
"""Evaluate a trained generator: `python jobs/eval.py RUN_ID|RUN_DIR|CKPT [-n 10000] [--extractor auto] [--real-split test]`.

Prints FID/IS/KID/precision/recall (names state the protocol, e.g. fid_inception_10k) and logs them into the
run's MLflow record at the checkpoint's step. A run directory (or a run id's) gives its best.pt when it has one,
else its newest step checkpoint, as for jobs/generate.py and jobs/slim.py.
"""

from __future__ import annotations

from _cli import Parser, positive_int, run

from gancore.config import SPLITS
from gancore.train.rundir import MEANS


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help=f"an MLflow run id, a run directory ({MEANS}) or a checkpoint file")
    ap.add_argument("-n", type=positive_int, help="generated samples (default eval.n_samples of the run, else 10000)")
    ap.add_argument("--extractor", help="an eval.extractor value: auto, inception or a domain classifier such as "
                    "lenet_mnist (default: the run's)")
    ap.add_argument("--real-split", choices=SPLITS, help="the real images to compare with (default: the "
                    "run's eval.real_split); the metric names then end in it, e.g. fid_inception_10k_test")
    ap.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--no-log", action="store_true", help="print only; do not log into the MLflow run")
    ap.add_argument("--uri", help="MLflow tracking URI (default: the run's track.uri, $MLFLOW_TRACKING_URI, ./mlruns)")
    args = ap.parse_args()

    from gancore.evaluation import evaluate_checkpoint

    values, run_id = evaluate_checkpoint(args.target, n=args.n, extractor=args.extractor, device=args.device,
                                         log=not args.no_log, uri=args.uri, real_split=args.real_split)
    for k, v in sorted(values.items()):
        print(f"{k} = {v:.4f}")
    if run_id and not args.no_log:
        print(f"logged into MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    run(main)
