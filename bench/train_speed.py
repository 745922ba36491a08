#!/usr/bin/env python
"""Training speed of the MNIST DCGAN: the reports' loop vs gancore eager vs gancore's fast path, in one process.

    python bench/train_speed.py [--steps 200] [--batch 64 256] [--modes eager cudagraph] [--repeats R] [--profile]
                                [--json F]

BASELINE: the loop the reference reports use, written here as they write it (clearly labelled, not gancore code):
a torchvision-style Dataset with ToTensor/Normalize transforms, a shuffling DataLoader, fp32, `.item()` on both
losses every step. Same networks, loss, instance noise and Adam settings as configs/mnist_dcgan.yaml.

gancore variants run the real trainer (`gancore.train.loop.fit`, tracking off) with `train.compile=MODE`
(eager = none, compile, cudagraph, compile_cudagraph; `MODE+bf16` adds train.mixed_precision=bf16, `MODE+cl`
train.channels_last=true). A variant's ms/step is differential: (loop time of a run of W + steps steps - loop time
of a run of W steps) / steps, so set-up, compilation, the warm-up steps and the graph capture cancel out.
`--profile` adds, per variant, the GPU kernel time per step from torch.profiler: kernel ms/step close to the wall
ms/step means compute-bound, far below it means the GPU waits for the CPU to launch kernels (launch-bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gancore.config import COMPILE_MODES  # noqa: E402  (light: no torch)

WARM = 20  # steps of the shorter run (covers 3 warm-up steps + the capture)


def reports_loop(x_uint8, batch: int, steps: int, device) -> float:
    """BASELINE (the reports' style, not gancore): DataLoader + transforms, per-step .item(). Returns ms/step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from gancore.config import load_config
    from gancore.registry import MODELS

    class MNISTLike(Dataset):  # what torchvision.datasets.MNIST + ToTensor + Normalize((0.5,), (0.5,)) do per item
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return (self.x[i].float() / 255.0 - 0.5) / 0.5, 0

    cfg = load_config(ROOT / "configs" / "mnist_dcgan.yaml")
    nets = MODELS["dcgan_mnist"](cfg.model, (1, 28, 28), 10)
    G, D = nets["G"].to(device), nets["D"].to(device)
    oG = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    oD = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    loader = DataLoader(MNISTLike(x_uint8), batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
    done, losses, t0 = 0, [], None
    while done < steps + 5:
        for real, _ in loader:
            if done == 5:  # warm-up steps excluded
                _sync(device)
                t0 = time.perf_counter()
            real = real.to(device)
            z = torch.randn(batch, 100, device=device)
            fake = G(z)
            noisy = lambda t: t + 0.05 * torch.randn_like(t)  # noqa: E731 - instance noise 0.05
            lr, lf = D(noisy(real)), D(noisy(fake.detach()))
            loss_d = F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
            oD.zero_grad()
            loss_d.backward()
            oD.step()
            lg = D(noisy(fake))
            loss_g = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg))
            oG.zero_grad()
            loss_g.backward()
            oG.step()
            losses.append((loss_d.item(), loss_g.item()))  # the per-step host sync of the reports
            done += 1
            if done == steps + 5:
                break
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


MODES = ("eager", *COMPILE_MODES[1:])  # eager = train.compile=none
EXTRAS = {"bf16": ["train.mixed_precision=bf16"], "cl": ["train.channels_last=true"]}


def _overrides(variant: str, batch: int) -> list[str]:
    mode, *extras = variant.split("+")
    over = [f"optim.batch_size={batch}", "train.progress=false", "track.enabled=false",
            f"train.compile={'none' if mode == 'eager' else mode}", "train.log_every=100",
            f"track.image_every={10**9}", "train.checkpoint_every=1000000", "train.snapshot_epochs=[]", "eval.n_samples=0", "eval.every=0"]
    for e in extras:
        over += EXTRAS[e]
    return over


def gancore_run(variant: str, batch: int, n: int, out: Path) -> float:
    """Loop seconds of one run of the real trainer for n steps."""
    from gancore.config import load_config
    from gancore.train.loop import fit

    cfg = load_config(ROOT / "configs" / "mnist_dcgan.yaml", [*_overrides(variant, batch), f"train.max_steps={n}"])
    r = fit(cfg, out=Path(tempfile.mkdtemp(prefix=out.name + "-", dir=out.parent)))  # a fresh dir
    if r.status != "finished":  # SIGTERM/SIGINT stop a run with a checkpoint; here they stop the benchmark
        raise SystemExit(f"interrupted: a {variant} run stopped at step {r.step}/{n} (signal {r.stop_signal})")
    return r.loop_seconds


def gancore_loop(variant: str, batch: int, steps: int, tmp: Path) -> float:
    """ms/step of the real trainer: the difference of a WARM-step and a WARM+steps-step run, per step."""
    gancore_run(variant, batch, WARM, tmp / f"{variant}-{batch}-first")  # first compilation (cached for the rest)
    short = gancore_run(variant, batch, WARM, tmp / f"{variant}-{batch}-short")
    long = gancore_run(variant, batch, WARM + steps, tmp / f"{variant}-{batch}-long")
    return 1000 * (long - short) / steps


def kernel_ms(call) -> float | None:
    """GPU kernel time of `call()` in ms (torch.profiler), or None without a GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=["eager", "cudagraph"],
                    help="gancore variants: eager, compile, cudagraph, compile_cudagraph; suffix +bf16 / +cl")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the variants R times; report the fastest")
    ap.add_argument("--no-baseline", action="store_true", help="skip the reports' loop")
    ap.add_argument("--profile", action="store_true", help="also GPU kernel ms/step (launch- vs compute-bound)")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args()
    for v in args.modes:
        mode, *extras = v.split("+")
        if mode not in MODES or not set(extras) <= set(EXTRAS):
            ap.error(f"unknown variant {v!r}: a mode ({', '.join(MODES)}) with optional suffixes "
                     f"{', '.join('+' + e for e in EXTRAS)}, e.g. cudagraph+bf16")
    if args.steps < 1 or min(args.batch) < 1 or args.repeats < 1:
        ap.error("--steps, --batch and --repeats must be positive")

    import torch

    from gancore.config import DataConfig
    from gancore.data import load_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, _ = load_images(DataConfig(name="mnist"))
    tmp = Path(tempfile.mkdtemp(prefix="gancore-speed-"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, {args.steps} timed steps, {time.strftime('%Y-%m-%d')}")
    head = f"{'variant':30s} {'batch':>5s} {'ms/step':>9s} {'images/s':>9s} {'speed-up':>9s}"
    print(head + (f" {'kernel ms/step':>15s} {'GPU busy':>9s}" if args.profile else ""))
    rows = []

    def show(label: str, b: int, ms: float, base: float | None, kernel=None) -> None:
        """One table row; `kernel()` -> GPU kernel ms per step (--profile)."""
        if ms <= 0:  # a differential time: the run-to-run noise exceeded the extra steps' cost
            print(f"{label:30s} {b:5d}  n/a: below the timing noise at {args.steps} steps; use more --steps")
            rows.append({"variant": label, "batch": b, "ms_per_step": None})
            return
        row = {"variant": label, "batch": b, "ms_per_step": ms, "images_per_s": 1000 * b / ms,
               "speedup": (base / ms) if base else None}
        line = f"{label:30s} {b:5d} {ms:9.2f} {1000 * b / ms:9.0f} " + (f"{base / ms:8.2f}x" if base else f"{'-':>9s}")
        if args.profile and kernel is not None:
            k = kernel()
            row["kernel_ms_per_step"] = k
            line += f" {k:15.2f} {100 * k / ms:8.0f}%" if k is not None else f" {'n/a (cpu)':>15s}"
        rows.append(row)
        print(line, flush=True)

    def gancore_kernel(v: str, b: int):
        def per_step():
            short = kernel_ms(lambda: gancore_run(v, b, WARM, tmp / f"{v}-{b}-prof-short"))
            long = kernel_ms(lambda: gancore_run(v, b, WARM + args.steps, tmp / f"{v}-{b}-prof-long"))
            return None if short is None else (long - short) / args.steps
        return per_step

    def save() -> None:  # after every row: a run stopped by a timeout keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "steps": args.steps,
                                                   "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))

    for b in args.batch:
        # --repeats R: the variants alternate R times; each row is the fastest (least disturbed) of its R runs and
        # prints as soon as its last run is done
        times: dict[str, list[float]] = {}
        base = None
        for r in range(args.repeats):
            last = r == args.repeats - 1
            if not args.no_baseline:
                times.setdefault("reports loop (BASELINE)", []).append(reports_loop(x, b, args.steps, device))
                if last:
                    base = min(times["reports loop (BASELINE)"])
                    show("reports loop (BASELINE)", b, base, base, lambda: _none_or(
                        kernel_ms(lambda: reports_loop(x, b, args.steps, device)), lambda k: k / (args.steps + 5)))
                    save()
            for v in args.modes:
                times.setdefault(f"gancore {v}", []).append(gancore_loop(v, b, args.steps, tmp))
                if last:
                    show(f"gancore {v}", b, min(times[f"gancore {v}"]), base, gancore_kernel(v, b))
                    save()


def _none_or(v, f):
    return None if v is None else f(v)


if __name__ == "__main__":
    main()
