"""What the trainer drives: a family object (the process is one object, its networks others), and the helpers every
family shares.

Owns: `Family` (the interface), `Phase`, `Batch`, `StepContext`; the shared helpers (`unwrap`, `eval_mode`,
`load_test_split`, the figure helpers `save_figure` / `titled_rows` / `labelled_grid`) and `adam_options`.
Family modules import from here and from nowhere else in gancore.families, and never from gancore.train.

A family owns its networks and optimisers and says which phases one training step has. The trainer only calls
this interface; it never asks which family, model or loss it runs.

    phases:  GAN -> [D x d_iters, G];  VAE -> [ELBO];  GANomaly -> [G, D];  diffusion -> [denoise]
    each phase: loss(batch, ctx) -> (scalar loss, {stat name: 0-d tensor}) on one optimiser; `ctx` is the
    StepContext the step's phases share (a new one per step)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from gancore.config import CAPTURED, Config

Stats = dict[str, torch.Tensor]


class StepContext:
    """What one training step's phases hand each other (GAN: the last D step's fakes for the G phase; GANomaly: the G
    phase's reconstructions for D). The loop makes a new, empty one every step, so nothing outlives the step."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def put(self, name: str, value: Any) -> None:
        """Leave `value` for a later phase of this step (replacing what an earlier repeat left under `name`)."""
        self._items[name] = value

    def take(self, name: str) -> Any:
        """What an earlier phase left under `name`, removed: a graph it holds is released once the taker is done."""
        return self._items.pop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._items


EVAL_BATCH = 500  # images per forward pass when a family scores, encodes or reconstructs a whole split


@dataclass
class Batch:
    """One batch as the family wants it: images as floats on the device, labels as int64 (or None)."""

    x: torch.Tensor
    y: torch.Tensor | None


@dataclass
class Phase:
    """One optimisation phase of a step: `repeats` times, draw data (or reuse the last batch), loss, step."""

    name: str  # "D", "G", "ELBO", ...
    optimizer: str  # key into Family.optimizers
    loss: Callable[[Batch, StepContext], tuple[torch.Tensor, Stats]]
    repeats: int = 1
    fresh_batch: bool = True  # draw a new real batch for each repeat (False: reuse the step's last batch)


class Family:
    """Base class: subclasses fill `networks`, `optimizers` and `phases` in __init__."""

    #: the network that generates (GAN: "G"); its weights are the run's snapshots, its EMA copy the sampler
    generator_name: str = "G"
    #: the statistic shown in the progress bar and used for NaN checks (all are checked)
    headline: tuple[str, ...] = ()

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        self.cfg = cfg
        self.image_shape = image_shape  # (C, H, W)
        self.num_classes = num_classes
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.phases: list[Phase] = []
        self.ema: nn.Module | None = None  # set by the trainer when EMA is on
        # Adam's implementation for the run's train.compile mode (fused / capturable on a GPU fast path)
        self.adam_options = adam_options(cfg.train.compile)

    # -- data ------------------------------------------------------------------------------------------------
    def prepare(self, x_uint8: torch.Tensor, y: torch.Tensor | None) -> Batch:
        """uint8 (B, C, H, W) on the device -> the family's input range. Default: [-1, 1]."""
        return Batch(x_uint8.float().div_(127.5).sub_(1.0), y)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `prepare` for images this family produces: -> uint8 (B, C, H, W)."""
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    # -- sampling --------------------------------------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs for the fixed sample grid (drawn once per run from a seeded generator)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        """n images in the family's output range, from `inputs` (fixed grid) or fresh random draws."""
        raise NotImplementedError

    def sample_inputs(self, n: int, generator: torch.Generator | None, inputs: dict | None) -> dict:
        """What `sample` draws from: `inputs` when given, else `fixed_inputs(n)` from `generator` (seed 0 if None)."""
        return inputs or self.fixed_inputs(n, generator if generator is not None else torch.Generator().manual_seed(0))

    def grid_labels(self, n: int) -> torch.Tensor:
        """Labels (n,) for a sample grid: rows cycle through the classes."""
        return torch.arange(n) % self.num_classes

    def sampler_network(self) -> nn.Module:
        """The network that generates (its EMA copy when there is one)."""
        if self.ema is not None:
            return self.ema
        net = self.networks[self.generator_name]
        # DDP wraps the network: sampling on the main process alone must not enter DDP's buffer broadcast
        return getattr(net, "module", net)

    def class_sampler(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For class-conditional families: labels (b,) -> b uint8 images of those classes; else None."""
        return None

    # -- reporting -------------------------------------------------------------------------------------------
    def figures(self, out_dir: Path, data: "object") -> list[Path]:
        """Family-specific figures written at the end of a run (VAE: latent scatter, GANomaly: ROC, ...)."""
        return []

    def evaluate(self, data: "object") -> dict[str, float]:
        """Family-specific end-of-run metrics (GANomaly: AUROC); FID etc. come from gancore.metrics."""
        return {}

    # -- helpers ---------------------------------------------------------------------------------------------
    def draws_per_step(self) -> int:
        """Real batches one step consumes: one per repeat of a fresh-batch phase, and one for a step whose first
        phase reuses a batch (there is none yet)."""
        n, have = 0, False
        for p in self.phases:
            for _ in range(p.repeats):
                if p.fresh_batch or not have:
                    n, have = n + 1, True
        return max(1, n)

    @property
    def device(self) -> torch.device:
        return next(iter(self.networks.values())).parameters().__next__().device

    def adam(self, params, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.Adam(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                **self.adam_options)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: evaluation mode, the test split, figures


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (evaluation runs on the main process only)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


@contextlib.contextmanager
def eval_mode(*nets: nn.Module) -> Iterator[None]:
    """Networks in eval mode and no autograd inside the block, their training flags restored after (sampling must
    not change state)."""
    was = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for n, w in zip(nets, was):
            n.train(w)


def load_test_split(cfg: Config, subset: int, every_class: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's dataset, test split, first `subset` images (0 = all), at the run's image size; every class, or
    (every_class=False) the classes data.normal_class keeps."""
    from gancore.data import load_images

    data = dataclasses.replace(cfg.data, split="test", subset=subset)
    return load_images(dataclasses.replace(data, normal_class=-1) if every_class else data)


def save_figure(fig, path: Path) -> Path:
    """tight_layout, write a PNG (its folder made), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def titled_rows(rows: list[tuple[torch.Tensor, str]], path: Path, figsize: tuple[float, float]) -> Path:
    """One figure of image rows, each uint8 (k, C, H, W) in one line under its title (originals vs reconstructions)."""
    from gancore import plots

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=figsize)
    for ax, (imgs, title) in zip(axes, rows):
        ax.imshow(plots.grid(imgs, nrow=len(imgs)))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return save_figure(fig, path)


def labelled_grid(images: torch.Tensor, nrow: int, path: Path, title: str, col_labels: list[str] | None = None,
                  row_labels: list[str] | None = None) -> Path:
    """uint8 images in rows of `nrow` as one figure with column / row labels."""
    from gancore import plots

    import matplotlib.pyplot as plt

    arr = plots.grid(images, nrow)
    h, w = images.shape[-2:]
    rows = math.ceil(images.shape[0] / nrow)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * nrow, 0.6 + 0.9 * rows))
    ax.imshow(arr)
    ax.set_xticks([2 + (w + 2) * i + w / 2 for i in range(nrow)] if col_labels else [])
    ax.set_xticklabels(col_labels or [], fontsize=8)
    ax.set_yticks([2 + (h + 2) * i + h / 2 for i in range(rows)] if row_labels else [])
    ax.set_yticklabels(row_labels or [], fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Optimisers


def adam_options(mode: str) -> dict[str, Any]:
    """Adam's implementation flags for a train.compile mode: fused (one multi-tensor kernel) and capturable (its step
    counter on the device) where a CUDA device will run it; the eager path keeps torch's defaults (foreach on CUDA)."""
    opts: dict[str, Any] = {"foreach": None, "fused": None, "capturable": False}
    if mode != "none" and torch.cuda.is_available():
        opts.update(fused=True, capturable=mode in CAPTURED)
    return opts
