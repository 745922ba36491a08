#!/usr/bin/env python
"""Data-parallel scaling of the quickstart: 1 process vs P processes (torchrun, gloo on CPUs, NCCL on GPUs).

    python bench/scale_out.py [--procs 1 2] [--steps 60] [--batch 64] [--threads-single 2] [--json F]

Each variant is the real trainer (`gancore.train.loop.fit`, tracking off) on configs/quickstart.yaml at the same
global batch, started by `python -m torch.distributed.run --nproc_per_node P` (P = 1 included, so the launcher is
the same). A variant's ms/step is differential, (loop time of a W+steps run - that of a W-step run) / steps, so
start-up and warm-up cancel. On a CPU the cores are shared: P processes get cores/P threads each, and the 1-process
baseline gets every core (`--threads-single`). To say where the multi-process overhead goes, each P > 1 variant
also times the gradient all-reduce alone: DDP all-reduces D's gradients twice per step (D phase, and the G phase's
backward through D) and G's once, so comm ms/step = time of all_reduce over 2|D| + |G| floats, in DDP's 25 MB
buckets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARM = 10


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): two runs (W and W+steps steps), then the all-reduce timing; rank 0 prints JSON."""
    import torch
    import torch.distributed as dist

    from gancore.config import load_config
    from gancore.train.loop import fit

    loops = []
    for steps in (WARM, WARM + args.steps):
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          [f"optim.batch_size={args.batch}", f"train.max_steps={steps}", "track.enabled=false",
                           "train.progress=false", "train.checkpoint_every=100000", "train.log_every=1000",
                           "track.image_every=100000", "train.snapshot_epochs=[]", "train.loss_ranges=[]",
                           "eval.n_samples=0", "eval.every=0"])
        with tempfile.TemporaryDirectory() as d:
            loops.append(fit(cfg, out=Path(d) / "run").loop_seconds)
    step_ms = (loops[1] - loops[0]) / args.steps * 1e3
    comm_ms = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        from gancore.train.state import build_family

        fam = build_family(cfg, (1, 28, 28), 10)
        n_g = sum(p.numel() for p in fam.networks["G"].parameters())
        n_d = sum(p.numel() for p in fam.networks["D"].parameters())
        flat = torch.zeros(2 * n_d + n_g)
        bucket = 25 * 2**20 // 4
        for _ in range(3):
            dist.all_reduce(flat)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(20):
            for chunk in flat.split(bucket):
                dist.all_reduce(chunk)
        comm_ms = (time.perf_counter() - t) / 20 * 1e3
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"step_ms": step_ms, "comm_ms": comm_ms, "threads": torch.get_num_threads()}))


def run_variant(procs: int, threads: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{procs} process(es) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    r = json.loads(line[-1][7:])
    r.update(procs=procs, images_per_s=args.batch / r["step_ms"] * 1e3)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split across the processes)")
    ap.add_argument("--threads-single", type=int, default=os.cpu_count(), help="threads of the 1-process baseline")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    rows = [run_variant(p, args.threads_single if p == 1 else max(1, cores // p), args) for p in args.procs]
    base = rows[0]
    # what one rank of the largest P computes, alone: 1 process, its threads, its share of the batch, no all-reduce
    top = max(args.procs)
    if top > 1:
        share = argparse.Namespace(**{**vars(args), "batch": args.batch // top})
        alone = run_variant(1, max(1, cores // top), share)
        alone.update(label=f"1 (one rank's share: batch {share.batch})", images_per_s=None)
        rows.append(alone)
    print(f"quickstart, global batch {args.batch}, {args.steps} steps after {WARM} warm-up, {cores} cores")
    print(f"{'processes':>36} {'threads/proc':>12} {'ms/step':>8} {'images/s':>9} {'vs 1':>6} {'all-reduce ms/step':>19}")
    for r in rows:
        comm = f"{r['comm_ms']:.1f}" if r["comm_ms"] is not None else "-"
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        ratio = f"{base['step_ms'] / r['step_ms']:.2f}x" if r["images_per_s"] else "-"
        print(f"{r.get('label', r['procs']):>36} {r['threads']:>12} {r['step_ms']:>8.1f} {ips:>9} {ratio:>6} {comm:>19}")
    if top > 1:
        multi = next(r for r in rows if r["procs"] == top and "label" not in r)
        rest = multi["step_ms"] - alone["step_ms"] - multi["comm_ms"]
        print(f"{top} processes, per step: {alone['step_ms']:.1f} ms one rank's compute + {multi['comm_ms']:.1f} ms "
              f"all-reduce + {rest:.1f} ms other (waiting for the slower rank, DDP's hooks and buffer broadcasts)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
