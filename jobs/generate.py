#!/usr/bin/env python
"""Sample a trained model: `python jobs/generate.py CKPT_OR_RUN_DIR -n 50 --format png|npz|h5 --out PATH`."""

from __future__ import annotations

import argparse

from _cli import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)")
    ap.add_argument("-n", type=int, default=64, help="number of images")
    ap.add_argument("--format", choices=["png", "npz", "h5"], help="default: from --out's suffix (folder -> png)")
    ap.add_argument("--out", required=True, help="output: a folder (png), FILE.npz or FILE.h5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = ap.parse_args()

    from gancore.generate import generate

    path = generate(args.checkpoint, args.n, args.out, fmt=args.format, seed=args.seed,
                    batch_size=args.batch_size, device=args.device)
    print(f"wrote {args.n} images to {path}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    run(main)
