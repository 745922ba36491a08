#!/usr/bin/env python
"""Train a domain feature extractor: `python jobs/train_classifier.py --dataset mnist|fashion_mnist|cifar10
[--epochs N] [--out PATH] [--seed S] [--device cpu|cuda]` (default out: $GANCORE_CACHE/extractors/<name>.pt)."""

from __future__ import annotations

import argparse

from _cli import run


def main() -> int:
    from gancore.metrics.classifier import FOR_DATASET, train_classifier

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True, choices=sorted(FOR_DATASET))
    ap.add_argument("--epochs", type=int, help="default: the extractor's recipe (MNIST 2, CIFAR-10 4)")
    ap.add_argument("--out", help="weights file (a state_dict); default: where metrics look for it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    info = train_classifier(FOR_DATASET[args.dataset], epochs=args.epochs, out=args.out, seed=args.seed,
                            device=args.device)
    print(f"{info['name']}: test accuracy {info['test_accuracy']:.4f} after {info['epochs']} epochs "
          f"({info['seconds']:.0f} s) -> {info['path']}")
    return 0


if __name__ == "__main__":
    run(main)
