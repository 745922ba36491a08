#!/usr/bin/env python
"""Step-time overhead of MLflow tracking: the quickstart training with tracking on and off, in one process.

    python bench/tracking_overhead.py [--steps 300] [--repeats 2]

Runs alternate off/on (same seed, same data) so machine noise hits both; prints ms/step of each and the ratio.
Target (issue "MLflow tracking"): overhead <= 3 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"))
    args = ap.parse_args()

    import torch

    from gancore.config import load_config
    from gancore.train.loop import fit

    tmp = Path(tempfile.mkdtemp(prefix="gancore-bench-"))
    base = [f"train.max_steps={args.steps}", "train.progress=false", "track.experiment=bench",
            f"track.uri=sqlite:///{tmp / 'mlflow.db'}"]
    times: dict[str, list[float]] = {"off": [], "on": []}
    fit(load_config(args.config, [*base, "train.max_steps=20", "track.enabled=false"]), out=tmp / "warmup")
    for rep in range(args.repeats):
        for mode in ("off", "on"):
            cfg = load_config(args.config, [*base, f"track.enabled={'true' if mode == 'on' else 'false'}"])
            r = fit(cfg, out=tmp / f"{mode}-{rep}")
            times[mode].append(1000 * r.loop_seconds / r.steps_run)
            print(f"  {mode:3s} run {rep}: {times[mode][-1]:.2f} ms/step", flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, {args.steps} steps x {args.repeats}")
    print(f"tracking off: {off:.2f} ms/step   tracking on: {on:.2f} ms/step   overhead: {100 * (on / off - 1):+.1f} %")


if __name__ == "__main__":
    main()
