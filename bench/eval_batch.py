#!/usr/bin/env python
"""Extractor batch size: the old fixed 250 (BASELINE) vs gancore's auto choice (eval.batch_size=0: 25 on a CPU,
250 on a GPU), side by side in one process on the same images, alternating, fastest of --repeats.

    .venv/bin/python bench/eval_batch.py [--n 250] [--repeats 2] [--extractor inception] [--device cpu]

Prints images/s of each, the ratio, and the largest feature difference between them (the batch size must not
change the numbers). The Inception weights must be in place (../shared/weights/make-fid-inception.sh).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gancore.config import load_config  # noqa: E402
from gancore.metrics import extractors  # noqa: E402
from gancore.metrics.fidelity import eval_batch, features  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=250, help="images per measurement (a multiple of 250)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--extractor", default="inception")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cfg = load_config(None, ["data.name=mnist"])
    fe, _ = extractors.load(args.extractor, cfg, args.device)
    layer, _ = extractors.layers(fe)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n, 1, 28, 28), generator=g, dtype=torch.uint8)  # MNIST-shaped, as evaluated
    variants = {"fixed 250 (BASELINE)": 250, f"auto ({eval_batch(cfg, args.device)})": eval_batch(cfg, args.device)}
    best: dict[str, float] = {}
    feats: dict[str, torch.Tensor] = {}
    features(fe, iter(x[:25].split(25)), 25, args.device)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.extractor}, "
          f"{args.n} images")
    for _ in range(args.repeats):
        for name, batch in variants.items():
            t = time.perf_counter()
            feats[name] = features(fe, iter(x.split(batch)), args.n, args.device)[layer]
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    base = args.n / best["fixed 250 (BASELINE)"]
    for name in variants:
        rate = args.n / best[name]
        print(f"{name:22s} {rate:7.2f} images/s  {rate / base:5.2f}x")
    a, b = feats.values()
    print(f"largest feature difference between the two: {(a - b).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
