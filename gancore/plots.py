"""Figures: sample grids, loss curves per epoch range, the loss report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402


def grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) -> one HWC uint8 image (greyscale as RGB), 2-px padding."""
    from torchvision.utils import make_grid

    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    g = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=0)  # (3, H', W') uint8
    return g.permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> np.ndarray:
    from PIL import Image

    arr = grid(images, nrow)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _ranges(ranges, last_epoch: int) -> list[tuple[int, int]]:
    """The configured epoch ranges clipped to what ran, plus (1, last) for 'all'; empty ranges dropped."""
    out = [(a, min(b, last_epoch)) for a, b in ranges if a <= last_epoch]
    out.append((1, last_epoch))
    return list(dict.fromkeys(out))


def loss_plots(history: dict[str, list[float]], ranges, out_dir: str | Path, keys=("Loss/D", "Loss/G")) -> list[Path]:
    """One PNG per epoch range (report: 1-25, 26-50, 51-100 and all) of the per-epoch mean losses."""
    epochs = history.get("epoch", [])
    if not epochs:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    keys = [k for k in keys if k in history] or [k for k in history if k.startswith("Loss/")]
    e = np.asarray(epochs)
    for a, b in _ranges(ranges, int(e.max())):
        sel = (e >= a) & (e <= b)
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            ax.plot(e[sel], np.asarray(history[k])[sel], marker="o" if sel.sum() < 30 else None, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean loss")
        ax.set_title(f"losses, epochs {a}-{b}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out_dir / ("loss_all.png" if (a, b) == (1, int(e.max())) else f"loss_epochs_{a}-{b}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def loss_report(history: dict[str, list[float]], ranges, path: str | Path) -> dict[str, dict[str, float]]:
    """Mean of each per-epoch loss over each epoch range, written as JSON and a Markdown table beside it."""
    epochs = np.asarray(history.get("epoch", []))
    if epochs.size == 0:
        return {}
    keys = [k for k in history if k != "epoch"]
    report = {}
    for a, b in _ranges(ranges, int(epochs.max())):
        sel = (epochs >= a) & (epochs <= b)
        report[f"{a}-{b}"] = {k: float(np.mean(np.asarray(history[k])[sel])) for k in keys}
    path = Path(path)
    path.write_text(json.dumps(report, indent=2))
    lines = ["| epochs | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(f"{v[k]:.4f}" for k in keys) + " |" for r, v in report.items()]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return report
