"""Domain classifiers: which exist, how their inputs are prepared, how they are trained and found on disk.

    jobs/train_classifier.py --dataset mnist  ->  train_classifier("lenet_mnist")  ->  $GANCORE_CACHE/extractors/lenet_mnist.pt
    first metric evaluation without that file ->  ensure_classifier() trains it once (one-line notice, progress bar)

The saved file is a plain state_dict (load with weights_only=True); a JSON beside it records how it was made and
its test accuracy. Training is seeded and runs inside a forked RNG, so training an extractor in the middle of a GAN
run does not change that run's random stream (resume stays bit-identical).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gancore.config import DataConfig
from gancore.data import load_images
from gancore.io import atomic_write, cache_dir, file_lock
from gancore.errors import MetricsError
from gancore.progress import Bar
from gancore.metrics.nets import CifarNet, LeNet


@dataclass(frozen=True)
class DomainSpec:
    """A domain classifier: its network, the dataset it learns, its input format and its training recipe."""

    net: type[nn.Module]
    dataset: str  # gancore dataset name (gancore.data) it is trained and tested on
    channels: int  # input channels the net takes (1 grey, 3 RGB); other inputs are converted
    size: int  # native input size; other sizes are resized (bilinear, antialiased)
    tag: str  # short name in metric keys: fid_<tag>_10k
    epochs: int  # default training epochs (chosen to fit in about a minute or a few on 2 CPU cores)
    lr: float  # peak learning rate of the one-cycle schedule (Adam)
    augment: bool  # random 4-pixel shifts + horizontal flips (CIFAR only: digits must not be flipped)


DOMAIN: dict[str, DomainSpec] = {
    "lenet_mnist": DomainSpec(LeNet, "mnist", 1, 28, "lenet", epochs=2, lr=3e-3, augment=False),
    "lenet_fashion_mnist": DomainSpec(LeNet, "fashion_mnist", 1, 28, "lenet_fashion", epochs=3, lr=3e-3,
                                      augment=False),
    "cifar_classifier": DomainSpec(CifarNet, "cifar10", 3, 32, "cifar_cnn", epochs=4, lr=4e-3, augment=True),
}
# dataset -> its domain extractor (what eval.extractor=auto falls back to)
FOR_DATASET = {spec.dataset: name for name, spec in DOMAIN.items()}


def domain_spec(name: str) -> DomainSpec:
    """The spec of a domain extractor, or a one-line error listing the known ones."""
    if name not in DOMAIN:
        raise MetricsError(f"unknown domain extractor {name!r}; known: {', '.join(DOMAIN)}")
    return DOMAIN[name]


def extractor_path(name: str) -> Path:
    """Where a domain extractor's weights live: $GANCORE_CACHE/extractors/<name>.pt."""
    return cache_dir() / "extractors" / f"{name}.pt"


def prepare(x: torch.Tensor, spec: DomainSpec) -> torch.Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> float (B, spec.channels, size, size) in [-1, 1]."""
    x = x.float()
    if x.shape[1] != spec.channels:
        # grey -> RGB repeats; RGB -> grey averages (exact for grey images stored as RGB, e.g. PNG folders)
        x = x.expand(-1, 3, -1, -1) if spec.channels == 3 else x.mean(1, keepdim=True)
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def build(name: str) -> nn.Module:
    """An untrained domain network (eval mode)."""
    return domain_spec(name).net().eval()


def load_classifier(name: str, path: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A trained domain network in eval mode; trains it first when the default file is missing."""
    p = Path(path) if path else ensure_classifier(name, device)
    if not p.is_file():
        raise MetricsError(f"domain extractor weights {p} not found; train them with "
                           f"`python jobs/train_classifier.py --dataset {domain_spec(name).dataset} --out {p}`")
    net = build(name)
    try:
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as e:  # truncated file, other architecture
        raise MetricsError(f"cannot load domain extractor {name} from {p} ({str(e).splitlines()[0]}); "
                           "delete the file to retrain it") from None
    return net.to(device).requires_grad_(False)


def ensure_classifier(name: str, device: torch.device | str = "cpu") -> Path:
    """The default weights file of `name`, trained now (once, announced on one line) when missing."""
    p = extractor_path(name)
    if p.is_file():
        return p
    with file_lock(p.with_name(f".{p.name}.lock")):  # concurrent processes (test workers, trials) train it once
        if not p.is_file():  # another process may have trained it while this one waited
            spec = domain_spec(name)
            print(f"metrics: domain extractor {name} not found at {p}; training it on {spec.dataset} now (once)",
                  file=sys.stderr)
            train_classifier(name, out=p, device=device)
    return p


def _shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 4 pixels (reflect-padded) and horizontal flip, per image; uint8 in and out."""
    b, _, h, w = x.shape
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")  # (B, C, H+8, W+8)
    dy, dx = torch.randint(0, 9, (2, b), generator=gen)
    out = torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.to(torch.uint8)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: DomainSpec, device: torch.device | str,
             batch: int = 500) -> float:
    """Top-1 accuracy of `net` on uint8 images `x` with labels `y`."""
    net.eval()
    right = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        right += (net(prepare(xb.to(device), spec)).argmax(1).cpu() == yb).sum().item()
    return right / len(x)


def train_classifier(name: str, epochs: int | None = None, out: str | Path | None = None, seed: int = 0,
                     device: torch.device | str = "cpu", batch_size: int = 128, progress: bool = True,
                     subset: int = 0) -> dict:
    """Train domain extractor `name` on its dataset's train split (its first `subset` images; 0 = all, the recipe);
    save it atomically; return its accuracy on the whole test split.

    Returns {"name", "dataset", "path", "epochs", "seed", "subset", "test_accuracy", "seconds"}.
    """
    spec = domain_spec(name)
    epochs = spec.epochs if epochs is None else epochs
    out = Path(out) if out else extractor_path(name)
    device = torch.device(device)
    x, y = load_images(DataConfig(name=spec.dataset, split="train", subset=subset))
    batch_size = min(batch_size, len(x))  # a subset smaller than one batch is one batch
    x_test, y_test = load_images(DataConfig(name=spec.dataset, split="test"))
    steps_per_epoch = len(x) // batch_size
    t0 = time.time()
    # Forked RNG: seeding here must not move the caller's (e.g. a GAN run's) random stream. Gradients on: callers
    # that train it lazily may be inside no_grad (figures.class_accuracy, at the end of a conditional run).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # data order and augmentation
        net = spec.net().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=epochs * steps_per_epoch)
        with Bar(f"train {name}", epochs * steps_per_epoch, enabled=progress, note="") as bar:
            for _ in range(epochs):
                net.train()
                perm = torch.randperm(len(x), generator=gen)[: steps_per_epoch * batch_size]
                for step, idx in enumerate(perm.view(steps_per_epoch, batch_size)):
                    xb = x[idx]
                    if spec.augment:
                        xb = _shift_flip(xb, gen)
                    loss = F.cross_entropy(net(prepare(xb.to(device), spec)), y[idx].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    # reading the loss syncs a GPU: every 50 steps is enough for the bar
                    bar.advance(**({"note": f"loss {loss.item():.3f}"} if progress and step % 50 == 0 else {}))
    acc = accuracy(net, x_test, y_test, spec, device)
    info = {"name": name, "dataset": spec.dataset, "path": str(out), "epochs": epochs, "seed": seed,
            "subset": subset, "test_accuracy": acc, "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    _atomic_save(net.cpu().state_dict(), out, info)
    return info


def _atomic_save(state: dict, path: Path, info: dict) -> None:
    """state_dict -> path and info -> path.json, each written atomically (concurrent runs may race)."""
    atomic_write(path, lambda fh: torch.save(state, fh))
    atomic_write(path.with_suffix(".json"), json.dumps(info, indent=1))
