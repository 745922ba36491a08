#!/usr/bin/env python
"""Train one run: `python jobs/train.py --config configs/mnist_dcgan.yaml optim.lr_g=1e-4 [--out DIR] [--resume auto]`.

Also under `accelerate launch jobs/train.py ...` (DDP, mixed precision). Exit codes: 0 done, 2 bad input,
3 non-finite loss, 75 stopped by a signal with a checkpoint written (resume continues it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _cli import Parser, out_dir, positive_int, quiet_third_party, run

from gancore.errors import EXIT_STOPPED


def resume_arg(v: str) -> str:
    """argparse type for --resume: auto, or an existing checkpoint file / run dir (checked before anything runs)."""
    p = Path(v)
    if v == "auto" or p.is_dir():
        return v
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"checkpoint {v!r} not found; pass auto, a checkpoint file or a run dir")
    from gancore.errors import CheckpointError
    from gancore.train.rundir import torch_archive  # no torch: a bad argument fails in a blink

    try:
        torch_archive(p, "pass auto, a checkpoint file or a run dir")
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def registered_names() -> str:
    """--help's epilog: the names each registry key takes, read from the registries (gancore/registry.py)."""
    from gancore.registry import DATASETS, FAMILIES, LOSSES, MODELS

    rows = [("family", FAMILIES), ("model.arch", MODELS), ("loss.name", LOSSES), ("data.name", DATASETS)]
    return "registered names (key=NAME):\n" + "\n".join(f"  {k}: {', '.join(r.names())}" for k, r in rows)


def main() -> int:
    wants_help = bool({"-h", "--help"} & set(sys.argv[1:]))  # the registries import torch: only for --help
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=registered_names() if wants_help else None)
    ap.add_argument("--config", help="preset YAML (configs/*.yaml); defaults alone when omitted")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr_g=1e-4 model.nz=64")
    ap.add_argument("--out", type=out_dir, help="run directory (default runs/<preset>-<timestamp>)")
    ap.add_argument("--resume", type=resume_arg, help="'auto' (latest checkpoint of --out, or of the newest runs/<preset>-*) or a checkpoint path")
    ap.add_argument("--stop-after", type=positive_int, help="stop after this many steps with a checkpoint (testing resume)")
    args = ap.parse_intermixed_args()  # overrides may also follow --out / --resume
    quiet_third_party()

    from gancore.config import load_config

    cfg = load_config(args.config, args.overrides)  # before the heavy imports: a bad config fails in a blink
    from gancore.train.loop import fit

    result = fit(cfg, out=args.out, resume=args.resume, stop_after=args.stop_after)
    if os.environ.get("RANK", "0") != "0":
        # other ranks of a multi-process run: rank 0 reports and carries the exit code (75 after a checkpointed
        # stop). Their 0 matters under srun --kill-on-bad-exit (slurm/train.sh): a 75 here would make srun
        # terminate rank 0 while it finishes; srun returns the highest exit code of its tasks, so 75 still shows.
        return 0
    if result.status == "stopped":
        print(f"stopped at step {result.step}/{result.total_steps}; checkpoint {result.checkpoint}; "
              f"continue with --out {result.run_dir} --resume auto")
        return EXIT_STOPPED
    print(f"done: {result.step} steps; run dir {result.run_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else ""))
    from gancore.metrics import MetricKey, degenerate

    # sample quality, printed last in this order: (kind, the run's best value of it)
    quality = [("fid", False), ("fid", True), ("kid", False), ("is", False), ("precision", False), ("recall", False)]
    rank = {k: quality.index((m.metric, m.best)) for k in result.metrics
            if (m := MetricKey.find(k)) is not None and (m.metric, m.best) in quality}
    for k, v in sorted(result.metrics.items()):
        if k not in rank:
            print(f"  {k} = {v:.4f}")
    sq = sorted(rank, key=lambda k: (rank[k], k))
    if sq:
        print(f"sample quality at step {result.step} (lower FID/KID is better, higher IS; the key names the "
              "extractor and sample count; FID/KID are in that extractor's feature units, so compare a value only "
              "with the same key; README \"Metrics\" gives the scales):")
        for k in sq:
            why = degenerate(k, result.metrics[k])
            print(f"  {k} = {result.metrics[k]:.4f}" + (f"  <- {why}" if why else ""))
    return 0


if __name__ == "__main__":
    run(main)
