"""Figures from extractor features: t-SNE of real vs generated, and per-class accuracy of conditional samples.

Owns: tsne_figure / tsne_plot and class_accuracy (with its bar plot).

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed); both write PNGs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gancore.config import Config
from gancore.io import data_root
from gancore.errors import MetricsError
from gancore.metrics import extractors
from gancore.metrics.classifier import FOR_DATASET, ensure_classifier, load_classifier, prepare
from gancore.metrics.fidelity import eval_batch, features, real_images, sampled_batches


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def tsne_figure(real: np.ndarray, generated: np.ndarray, path: str | Path, title: str = "", seed: int = 0) -> Path:
    """2-D t-SNE of real (N, D) and generated (M, D) features in one embedding, as a two-colour scatter PNG."""
    from sklearn.manifold import TSNE

    both = np.concatenate([real, generated]).astype(np.float32)
    perplexity = float(min(30, max(2, (len(both) - 1) // 3)))  # t-SNE needs perplexity < number of points
    emb = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(both)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.scatter(*emb[: len(real)].T, s=4, alpha=0.6, label=f"real ({len(real)})", color="tab:blue")
    ax.scatter(*emb[len(real):].T, s=4, alpha=0.6, label=f"generated ({len(generated)})", color="tab:orange")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    ax.set_title(title or "t-SNE of extractor features")
    fig.tight_layout()
    return _save(fig, path)


def tsne_plot(cfg: Config, sample_uint8: Callable[[int], torch.Tensor], device: torch.device | str,
              path: str | Path, n: int = 1000, extractor: str | None = None, seed: int = 0) -> Path:
    """t-SNE PNG of n real and n generated images' features (the FID layer of `extractor`, default eval.extractor)."""
    x_real = real_images(cfg, n)
    name = extractors.resolve(cfg, extractor, channels=x_real.shape[1])
    fe, _ = extractors.load(name, cfg, device)
    layer, _ = extractors.layers(fe)
    batch = eval_batch(cfg, device)
    real = features(fe, iter(x_real.split(batch)), len(x_real), device)[layer]
    gen = features(fe, sampled_batches(sample_uint8, n, batch), n, device)[layer]
    return tsne_figure(real.numpy(), gen.numpy(), path, f"t-SNE of {name} features: {cfg.data.name}", seed)


def _class_names(cfg: Config, k: int) -> list[str]:
    """CIFAR-10's names from the data folder's class_names.txt when present, else the indices."""
    f = data_root(cfg.data.root) / "cifar10" / "class_names.txt"
    if cfg.data.name == "cifar10" and f.is_file():
        names = f.read_text().split()
        if len(names) == k:
            return names
    return [str(c) for c in range(k)]


@torch.no_grad()
def class_accuracy(sample_with_labels: Callable[[torch.Tensor], torch.Tensor], cfg: Config,
                   device: torch.device | str, n_per_class: int = 100, path: str | Path | None = None,
                   extractor: str | None = None) -> dict[str, float]:
    """How often the domain classifier recognises the class a conditional generator was asked for.

    sample_with_labels(y) takes labels (b,) int64 on `device` and returns uint8 (b, C, H, W).
    Returns {"class_acc_<tag>_<c>": accuracy of class c, ..., "class_acc_<tag>_mean": their mean}; with `path`,
    also a bar plot PNG there.
    """
    if extractor in (None, "auto"):
        if cfg.data.name not in FOR_DATASET:
            raise MetricsError(f"no domain classifier for data.name={cfg.data.name!r}; pass extractor= one of "
                               f"{', '.join(extractors.DOMAIN)}")
        extractor = FOR_DATASET[cfg.data.name]
    if extractor == extractors.INCEPTION:
        raise MetricsError("class accuracy needs a domain classifier (its classes are the dataset's), not inception")
    spec = extractors.DOMAIN[extractor] if extractor in extractors.DOMAIN else None
    if spec is None:
        raise MetricsError(f"unknown domain classifier {extractor!r}; known: {', '.join(extractors.DOMAIN)}")
    net = load_classifier(extractor, ensure_classifier(extractor, device), device)
    k = cfg.model.num_classes
    acc = []
    batch = eval_batch(cfg, device)
    for c in range(k):
        right = 0
        for lo in range(0, n_per_class, batch):
            b = min(batch, n_per_class - lo)
            y = torch.full((b,), c, dtype=torch.long, device=device)
            x = sample_with_labels(y)
            if x.dtype != torch.uint8 or len(x) != b:
                raise MetricsError(f"sample_with_labels must return uint8 ({b}, C, H, W); got {x.dtype} "
                                   f"{tuple(x.shape)}")
            right += (net(prepare(x.to(device), spec)).argmax(1) == c).sum().item()
        acc.append(right / n_per_class)
    out = {f"class_acc_{spec.tag}_{c}": a for c, a in enumerate(acc)}
    out[f"class_acc_{spec.tag}_mean"] = float(np.mean(acc))
    if path is not None:
        fig = Figure(figsize=(max(5.0, 0.55 * k), 3.5))
        ax = fig.add_subplot()
        ax.bar(range(k), acc, color="tab:green")
        ax.axhline(np.mean(acc), color="k", lw=1, ls="--", label=f"mean {np.mean(acc):.3f}")
        ax.set_xticks(range(k), _class_names(cfg, k), rotation=45 if cfg.data.name == "cifar10" else 0)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"accuracy ({extractor})")
        ax.set_title(f"Generated samples classified as their label ({n_per_class} per class)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        _save(fig, path)
    return out
