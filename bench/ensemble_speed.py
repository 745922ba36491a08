#!/usr/bin/env python
"""Batched model ensembles: K MNIST DCGANs trained as one vmapped model vs the same K trained one after another.

    python bench/ensemble_speed.py [--k 1 2 4 8] [--steps 30] [--batch 64] [--device cpu|cuda] [--check-steps 5]

The issue's alternative to K processes per device: stack the K trials' weights (torch.func.stack_module_state),
run every network once with torch.func.vmap over the stack, sum the K losses and take one backward and one Adam
step over the stacked tensors. Adam is elementwise and each trial's loss depends only on its own weights, so the
ensemble is the same computation as K separate trainings, only batched: this script checks that first (relative
weight difference after --check-steps steps from identical seeds, noise and real batches, in float64, where only
rounding separates the two, and in float32) and then
times both ways in this process:

  sequential  K (G, D) pairs and K Adams, each step run model after model (what K trials in one process do)
  vmapped     one stacked (G, D) and one Adam per network, one vmapped forward/backward for all K

Each step is the MNIST DCGAN report's step without instance noise: D on a real batch and G(z).detach() with BCE,
then G with the non-saturating loss on the same fakes. Each model draws its own real batch and noise. Images/s
counts K * batch images per step. Only models whose shapes agree can be stacked: seeds and learning rates can
differ between members (a per-member lr is not implemented here), latent size and D-iterations cannot.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gancore.config import DataConfig, load_config  # noqa: E402
from gancore.data import load_images  # noqa: E402
from gancore.errors import DataError  # noqa: E402
from gancore.registry import MODELS  # noqa: E402
import gancore.models  # noqa: E402,F401  (registers the architectures)


def _real_data(device: torch.device) -> torch.Tensor:
    """The first 8192 MNIST training digits in [-1, 1], (N, 1, 28, 28), through gancore's loader (GANCORE_DATA)."""
    try:
        x, _ = load_images(DataConfig(name="mnist", subset=8192))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    return x.float().div(127.5).sub(1).to(device)


def _bce_mean(logits: torch.Tensor, target: float) -> torch.Tensor:
    """BCE with logits against a constant target, averaged over each member's batch: (..., B, 1) -> (...)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none").mean((-2, -1))


def _models(k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.nn.Module]]:
    cfg = load_config(ROOT / "configs" / "mnist_dcgan.yaml", [])
    out = []
    for i in range(k):
        torch.manual_seed(1000 + i)
        nets = MODELS[cfg.model.arch](cfg.model, (1, 28, 28), 10)
        out.append({n: m.to(device, dtype).train() for n, m in nets.items()})
    return out


def _adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999), foreach=True)


class Sequential:
    """K independent (G, D) pairs stepped one after another."""

    def __init__(self, members: list[dict[str, torch.nn.Module]]):
        self.m = members
        self.opt = [{n: _adam(net.parameters()) for n, net in mem.items()} for mem in members]

    def step(self, real: torch.Tensor, z: torch.Tensor) -> None:  # real (K, B, 1, 28, 28), z (K, B, nz)
        for i, (mem, opt) in enumerate(zip(self.m, self.opt)):
            G, D = mem["G"], mem["D"]
            fake = G(z[i])
            lr, lf = D(real[i]), D(fake.detach())
            d = _bce_mean(lr, 1.0) + _bce_mean(lf, 0.0)
            opt["D"].zero_grad(set_to_none=True)
            d.backward()
            opt["D"].step()
            lg = D(fake)
            g = _bce_mean(lg, 1.0)
            opt["G"].zero_grad(set_to_none=True)
            g.backward()
            opt["G"].step()

    def weights(self, i: int, net: str) -> dict[str, torch.Tensor]:
        return dict(self.m[i][net].named_parameters())


class Vmapped:
    """The same K members as one stacked model: one vmapped forward/backward and one Adam per network."""

    def __init__(self, members: list[dict[str, torch.nn.Module]]):
        self.base, self.p, self.b, self.opt = {}, {}, {}, {}
        for n in ("G", "D"):
            p, b = stack_module_state([mem[n] for mem in members])  # params are new leaves (K, ...)
            self.p[n], self.b[n] = p, b
            self.base[n] = copy.deepcopy(members[0][n]).to("meta")
            self.opt[n] = _adam(p.values())

    def _call(self, n: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base[n]
        return vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,)), randomness="different")(
            self.p[n], self.b[n], x)

    def step(self, real: torch.Tensor, z: torch.Tensor) -> None:
        fake = self._call("G", z)  # (K, B, 1, 28, 28)
        lr, lf = self._call("D", real), self._call("D", fake.detach())
        # each member's mean loss, summed over members: member i's gradient is exactly its own loss's gradient
        d = (_bce_mean(lr, 1.0) + _bce_mean(lf, 0.0)).sum()
        self.opt["D"].zero_grad(set_to_none=True)
        d.backward()
        self.opt["D"].step()
        lg = self._call("D", fake)
        g = _bce_mean(lg, 1.0).sum()
        self.opt["G"].zero_grad(set_to_none=True)
        g.backward()
        self.opt["G"].step()

    def weights(self, i: int, net: str) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.p[net].items()}


def _inputs(data: torch.Tensor, k: int, batch: int, nz: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(len(data), (k, batch), generator=gen).to(data.device)
    z = torch.randn(k, batch, nz, generator=gen).to(data.device)
    return data[idx], z


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(k: int, steps: int, data: torch.Tensor, device: torch.device, dtype: torch.dtype, batch: int = 64) -> float:
    """Largest relative difference ||w_seq - w_vmap|| / ||w_seq|| over each member's G and D (all weights of a
    network as one vector) after `steps` identical steps. Per-tensor figures mislead here: the biases in front of a
    BatchNorm get gradients of rounding-noise size, and Adam turns any noise into full-size steps."""
    seq, vm = Sequential(_models(k, device, dtype)), Vmapped(_models(k, device, dtype))
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        real, z = (t.to(dtype) for t in _inputs(data, k, batch, 100, gen))
        seq.step(real, z)
        vm.step(real, z)
    worst = 0.0
    for i in range(k):
        for n in ("G", "D"):
            a, b = seq.weights(i, n), vm.weights(i, n)
            wa = torch.cat([a[name].detach().flatten() for name in a])
            wb = torch.cat([b[name].detach().flatten() for name in a])
            worst = max(worst, ((wa - wb).norm() / wa.norm()).item())
    return worst


def time_steps(way, k: int, steps: int, batch: int, data: torch.Tensor, device: torch.device) -> float:
    """Seconds per step (all K members), after 3 warm-up steps; inputs drawn outside the timed region."""
    gen = torch.Generator().manual_seed(0)
    inputs = [_inputs(data, k, batch, 100, gen) for _ in range(steps + 3)]
    for real, z in inputs[:3]:
        way.step(real, z)
    _sync(device)
    t0 = time.perf_counter()
    for real, z in inputs[3:]:
        way.step(real, z)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="ensemble sizes to compare")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per way and K")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check-steps", type=int, default=5, help="steps of the exactness check (0: skip)")
    a = ap.parse_args()
    if min(a.k) < 1 or a.steps < 1 or a.batch < 1 or a.check_steps < 0:
        ap.error("--k, --steps and --batch must be positive, --check-steps at least 0")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU; use --device cpu")
    data = _real_data(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, batch {a.batch}, {a.steps} timed steps, "
          f"{time.strftime('%Y-%m-%d')}")
    if a.check_steps:
        kk = max(2, min(a.k))
        for dt in (torch.float64, torch.float32):
            print(f"exactness ({str(dt)[6:]}): K={kk}, {a.check_steps} steps, relative weight difference vmapped vs "
                  f"sequential = {check(kk, a.check_steps, data, device, dt):.1e}", flush=True)
    print(f"{'K':>3s} {'sequential ms/step':>19s} {'img/s':>8s} {'vmapped ms/step':>16s} {'img/s':>8s} "
          f"{'vmapped/seq':>11s} {'vmapped vs K=1':>15s}")
    single = None
    for k in a.k:
        s = time_steps(Sequential(_models(k, device)), k, a.steps, a.batch, data, device)
        v = time_steps(Vmapped(_models(k, device)), k, a.steps, a.batch, data, device)
        ips_s, ips_v = k * a.batch / s, k * a.batch / v
        if k == 1:
            single = ips_s
        vs1 = f"{ips_v / single:14.2f}x" if single else f"{'-':>15s}"
        print(f"{k:3d} {1000 * s:19.1f} {ips_s:8.0f} {1000 * v:16.1f} {ips_v:8.0f} {s / v:10.2f}x {vs1}", flush=True)


if __name__ == "__main__":
    main()
