#!/usr/bin/env python
"""Write a sampling-only copy of a checkpoint: `python jobs/slim.py CKPT_OR_RUN_DIR OUT.pt`.

Keeps the generator's weights, its EMA, the config and the step; leaves out the discriminator, the optimisers and
the RNG/loader state, so the file is a fraction of the size (what a GPU machine sends back). jobs/eval.py and
jobs/generate.py read it like any checkpoint; it cannot be resumed. A run directory gives its best.pt when it has
one, else its newest step checkpoint, as for jobs/eval.py and jobs/generate.py. Exit codes: 0 done, 2 bad input
(missing or corrupt checkpoint, OUT is a folder or exists).
"""

from __future__ import annotations

from pathlib import Path

from _cli import Parser, out_file, run

from gancore.train.rundir import MEANS


def main() -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help=f"a checkpoint file or a run directory ({MEANS})")
    ap.add_argument("out", type=out_file, help="the file to write (.pt); an existing file is not overwritten")
    ap.add_argument("--small", action="store_true", help="only the weights the sampler uses (the EMA copy when "
                    "there is one), in float16: a file to commit beside a results row (~1.7 MB for DCGAN-MNIST)")
    args = ap.parse_args()

    from gancore.errors import ConfigError
    from gancore.io import atomic_write
    from gancore.train import state as ckpt

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} already exists; pass a new file name (nothing was written)")
    src = ckpt.checkpoint_file(args.checkpoint)
    slim = ckpt.sampling_only(ckpt.load(src), small=args.small)
    import torch

    atomic_write(out, lambda fh: torch.save(slim, fh))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, step {slim['step']}) from {src} "
          f"({src.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    run(main)
