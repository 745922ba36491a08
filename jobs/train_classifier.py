#!/usr/bin/env python
"""Train a domain feature extractor: `python jobs/train_classifier.py --dataset mnist [--epochs N] [--subset N --out PATH]
[--seed S] [--device cpu|cuda]` (default out: $GANCORE_CACHE/extractors/<name>.pt)."""

from __future__ import annotations

import sys

from _cli import Parser, non_negative_int, out_file, positive_int, run


def datasets() -> list[str]:
    """The datasets with a domain classifier, asked of their owner (gancore/metrics/classifier.py FOR_DATASET)."""
    from gancore.metrics.classifier import FOR_DATASET

    return sorted(FOR_DATASET)


def main() -> int:
    wants_help = bool({"-h", "--help"} & set(sys.argv[1:]))  # the classifier table imports torch: only for --help
    ap = Parser(description=__doc__)
    ap.add_argument("--dataset", required=True, metavar="NAME",
                    help=f"one of {', '.join(datasets())}" if wants_help else None)
    ap.add_argument("--epochs", type=positive_int, help="default: the extractor's recipe (MNIST 2, CIFAR-10 4)")
    ap.add_argument("--subset", type=non_negative_int, default=0,
                    help="train on the first N training images (a quick check; default 0: all, the recipe)")
    ap.add_argument("--out", type=out_file, help="weights file (a state_dict); default: where metrics look for it")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto")
    args = ap.parse_args()  # before the heavy imports: a bad flag fails in a blink
    if args.subset and not args.out:  # a quick-check model must not replace the extractor the metrics load
        ap.error("argument --subset: pass --out FILE too (the default path is the extractor every metric loads)")
    from gancore.device import torch_device
    from gancore.metrics.classifier import FOR_DATASET, train_classifier

    device = torch_device(args.device)  # a one-line error for a bad or absent device, before any data is read
    if args.dataset not in FOR_DATASET:
        ap.error(f"argument --dataset: invalid choice: {args.dataset!r} (choose from {', '.join(datasets())})")
    info = train_classifier(FOR_DATASET[args.dataset], epochs=args.epochs, out=args.out, seed=args.seed,
                            device=device, subset=args.subset)
    print(f"{info['name']}: test accuracy {info['test_accuracy']:.4f} after {info['epochs']} epochs "
          f"({info['seconds']:.0f} s) -> {info['path']}")
    return 0


if __name__ == "__main__":
    run(main)
