#!/usr/bin/env python
"""Sample a trained model: `python jobs/generate.py CKPT_OR_RUN_DIR_OR_MODEL_URI -n 50 --format png|npz|h5 --out PATH`.

A run directory gives its best.pt when it has one, else its newest step checkpoint, as for jobs/eval.py and
jobs/slim.py.
"""

from __future__ import annotations

from _cli import Parser, non_negative_int, positive_int, run

from gancore.generate import FORMATS
from gancore.train.rundir import MEANS


def main() -> int:
    ap = Parser(description=__doc__)
    ap.add_argument("checkpoint", help=f"a checkpoint file, a run directory ({MEANS}), or an MLflow "
                    "model: runs:/RUN_ID/generator | models:/NAME/VERSION")
    ap.add_argument("-n", type=positive_int, default=64, help="number of images")
    ap.add_argument("--format", choices=FORMATS, help="default: from --out's suffix (folder -> png)")
    ap.add_argument("--out", required=True, help="output: a folder (png), FILE.npz or FILE.h5")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--batch-size", type=positive_int, default=500)
    ap.add_argument("--uri", default=None, help="tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, "
                    "else ./mlruns/mlflow.db)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    args = ap.parse_args()

    from gancore.generate import generate

    path = generate(args.checkpoint, args.n, args.out, fmt=args.format, seed=args.seed,
                    batch_size=args.batch_size, device=args.device, uri=args.uri)
    print(f"wrote {args.n} images to {path}")
    return 0


if __name__ == "__main__":
    run(main)
