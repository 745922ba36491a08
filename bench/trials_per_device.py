#!/usr/bin/env python
"""Several trials per device: aggregate training throughput of K processes sharing one GPU (or this CPU).

    python bench/trials_per_device.py [--k 1 2 4 8] [--steps 300] [--mode cudagraph] [--batch 64] [--save]

Each of the K processes runs the real trainer (`gancore.train.loop.fit`, tracking off) on the MNIST DCGAN preset:
first a short warm-up run (imports, data, compilation), then all K wait at a barrier and each trains `--steps`
steps. Aggregate images/s = K * steps * batch / (last end - first start). On a CPU the cores are split between the
processes (torch threads = cores // K, at least 1). `--save` records the best K for this device and mode in
$GANCORE_CACHE/trials_per_device.json (gancore/sweep/devices.py), which `jobs/sweep.py --workers auto` (the default)
then uses.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trial(i: int, k: int, args: dict, barrier, out) -> None:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // k))
    from gancore.config import load_config
    from gancore.train.loop import fit

    over = [f"optim.batch_size={args['batch']}", "train.progress=false", "track.enabled=false",
            f"train.compile={args['mode']}", "train.log_every=100", f"track.image_every={10**9}",
            "train.checkpoint_every=1000000", "train.snapshot_epochs=[]", f"train.seed={i}",
            "eval.n_samples=0", "eval.every=0"]
    tmp = Path(args["tmp"])
    try:
        fit(load_config(ROOT / "configs" / "mnist_dcgan.yaml", [*over, "train.max_steps=20"]), out=tmp / f"w{k}-{i}")
        barrier.wait(timeout=600)
        t0 = time.time()
        r = fit(load_config(ROOT / "configs" / "mnist_dcgan.yaml", [*over, f"train.max_steps={args['steps']}"]),
                out=tmp / f"t{k}-{i}")
        end = time.time()
        if r.status != "finished":  # a signal stopped the run (checkpoint and stop): no valid measurement
            raise RuntimeError(f"interrupted at step {r.step}/{args['steps']} (signal {r.stop_signal})")
        out.put((i, t0, end, r.loop_seconds, None))
    except Exception as e:  # reported by the parent (a K that does not fit in memory, say)
        out.put((i, 0.0, 0.0, 0.0, f"{type(e).__name__}: {e}"))


def measure(k: int, args: dict) -> tuple[float, float]:
    """(aggregate images/s, mean ms/step of one trial) for K concurrent trials."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(i, k, args, barrier, out)) for i in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    errors = [e for *_, e in results if e]
    if errors:
        raise SystemExit(f"K={k}: a trial failed: {errors[0]}")
    start, end = min(r[1] for r in results), max(r[2] for r in results)
    return k * args["steps"] * args["batch"] / (end - start), 1000 * sum(r[3] for r in results) / (k * args["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="processes per device to compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mode", default="none", help="train.compile of every trial (none, cudagraph, ...)")
    ap.add_argument("--save", action="store_true", help="record the best K for `jobs/sweep.py --workers auto`")
    a = ap.parse_args()
    from gancore.config import COMPILE_MODES as modes

    if a.mode not in modes:
        ap.error(f"--mode {a.mode!r}: expected one of {', '.join(modes)}")
    if min(a.k) < 1 or a.steps < 1 or a.batch < 1:
        ap.error("--k, --steps and --batch must be positive")

    from gancore.sweep import devices

    args = {"steps": a.steps, "batch": a.batch, "mode": a.mode, "tmp": tempfile.mkdtemp(prefix="gancore-trials-")}
    print(f"device {devices.device_name()}, train.compile={a.mode}, batch {a.batch}, {a.steps} steps per trial, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'K':>3s} {'aggregate img/s':>16s} {'vs K=1':>7s} {'ms/step per trial':>18s}")
    table: dict[int, float] = {}
    for k in a.k:
        agg, ms = measure(k, args)
        table[k] = agg
        first = table[min(table)]
        print(f"{k:3d} {agg:16.0f} {agg / first:6.2f}x {ms:18.2f}", flush=True)
    best = max(table, key=lambda k: table[k])
    print(f"best K = {best}")
    if a.save:
        _, path = devices.record_trials_per_device(a.mode, table, {"batch": a.batch, "steps": a.steps,
                                                                  "date": time.strftime("%Y-%m-%d")})
        print(f"saved to {path}; jobs/sweep.py --workers auto now starts {best} worker(s) per device")


if __name__ == "__main__":
    main()
