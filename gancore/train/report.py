"""The end-of-run report: loss plots per epoch range, the loss report, family figures, t-SNE and per-class
accuracy figures, the family's own end-of-run metrics, and the artifacts that go to the tracker.

Called once by the training loop after a finished run (main process only); a stopped run reports when it finishes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gancore import plots
from gancore.config import Config
from gancore.families.base import Family
from gancore.train.rundir import RunDir


def add_epoch(history: dict[str, list[float]], epoch: int, means: dict[str, float]) -> None:
    """Append one epoch's mean statistics to the per-epoch history (the loss plots' data)."""
    history.setdefault("epoch", []).append(epoch)
    for k, v in means.items():
        history.setdefault(k, []).append(v)


def end_of_run(cfg: Config, family: Family, run_dir: Path, history: dict[str, list[float]],
               data: dict[str, torch.Tensor], sampler: Callable[[int], torch.Tensor], device: torch.device,
               tracker: Any) -> dict[str, float]:
    """Write the report's plots and figures, log them as artifacts; returns the end-of-run metrics."""
    out_plots = plots.loss_plots(history, cfg.train.loss_ranges, run_dir / "plots")
    plots.loss_report(history, cfg.train.loss_ranges, run_dir / "loss_report.json")
    figures = family.figures(run_dir / "figures", data)
    metrics: dict[str, float] = {}
    if cfg.eval.n_samples:  # figures of the metrics layer: t-SNE of features; per-class accuracy (conditional)
        from gancore.metrics import class_accuracy, tsne_plot

        figures.append(tsne_plot(cfg, sampler, device, run_dir / "figures" / "tsne.png", n=min(500, cfg.eval.n_samples)))
        if (by_class := family.class_sampler()) is not None:
            metrics.update(class_accuracy(by_class, cfg, device, n_per_class=50,
                                          path=run_dir / "figures" / "class_accuracy.png"))
            figures.append(run_dir / "figures" / "class_accuracy.png")
    metrics.update(family.evaluate(data))
    for p in [*out_plots, run_dir / "loss_report.json", run_dir / "loss_report.md", *figures]:
        if p.is_file():
            tracker.log_artifact(p, "report" if "loss_report" in p.name else "plots")
    snapshots = RunDir(run_dir).snapshots_dir
    if snapshots.is_dir():  # a run shorter than one epoch has none
        tracker.log_artifact(snapshots, snapshots.name)
    return metrics
