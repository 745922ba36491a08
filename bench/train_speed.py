#!/usr/bin/env python
"""Training speed of the MNIST DCGAN: the reports' loop vs gancore eager vs gancore compiled, in one process.

    python bench/train_speed.py [--steps 200] [--batch 64 256] [--modes eager compile]

The baseline is the loop the reference reports use, written here as they write it (clearly labelled): a
torchvision-style Dataset with ToTensor/Normalize transforms, a shuffling DataLoader, fp32, `.item()` on both
losses every step. Same networks, loss, instance noise and Adam settings as configs/mnist_dcgan.yaml.
Prints ms/step, images/s and each variant's speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def gancore_loop(batch: int, steps: int, mode: str, tmp: Path) -> float:
    from gancore.config import load_config
    from gancore.trainer import fit

    over = [f"optim.batch_size={batch}", "train.progress=false", "track.enabled=false", f"train.compile={mode}",
            "train.log_every=100", f"track.image_every={10**9}", "train.checkpoint_every=100000", "train.snapshot_epochs=[]"]
    cfg = load_config(ROOT / "configs" / "mnist_dcgan.yaml", [*over, "train.max_steps=10"])
    fit(cfg, out=tmp / f"warm-{mode}-{batch}")  # warm-up (and compilation) outside the timed run
    cfg = load_config(ROOT / "configs" / "mnist_dcgan.yaml", [*over, f"train.max_steps={steps}"])
    r = fit(cfg, out=tmp / f"{mode}-{batch}")
    return 1000 * r.loop_seconds / r.steps_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--modes", nargs="+", default=["eager"], help="gancore variants: eager, compile")
    args = ap.parse_args()

    import torch

    from gancore.config import DataConfig
    from gancore.data import load_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, _ = load_images(DataConfig(name="mnist"))
    tmp = Path(tempfile.mkdtemp(prefix="gancore-speed-"))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {args.steps} timed steps")
    print(f"{'variant':28s} {'batch':>5s} {'ms/step':>9s} {'images/s':>9s} {'speed-up':>9s}")
    for b in args.batch:
        base = reports_loop(x, b, args.steps, device)
        print(f"{'reports loop (baseline)':28s} {b:5d} {base:9.2f} {1000 * b / base:9.0f} {1.0:8.2f}x", flush=True)
        for mode in args.modes:
            ms = gancore_loop(b, args.steps, "none" if mode == "eager" else mode, tmp)
            print(f"{'gancore ' + mode:28s} {b:5d} {ms:9.2f} {1000 * b / ms:9.0f} {base / ms:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
