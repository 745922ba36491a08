"""The per-digit anomaly table: one GANomaly run per normal digit, AUROC / average precision per digit and their mean.

Owns: the driver (`anomaly_table`, what jobs/anomaly_table.py calls), the files it writes (table.csv, table.md),
the summary MLflow run and the terminal table (`rich_table`). Each run is an ordinary training run (gancore.train).
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import numpy as np

from gancore.config import Config, load_config
from gancore.tracking import make_tracker
from gancore.train.loop import fit

COLUMNS = ["normal_digit", "auroc", "average_precision", "run_dir", "run_id"]  # table.csv's header


def anomaly_table(config: str | Path, digits=range(10), overrides: list[str] | tuple[str, ...] = (),
                  out: str | Path | None = None) -> tuple[list[dict], Path, bool]:
    """Train and evaluate one model per normal digit; write table.csv / table.md under `out`.

    Each digit is a run in `out/digit_<d>` (resumed when it holds checkpoints, so a rerun skips finished digits'
    training). Returns (rows, out, complete); `complete` is False when a run was stopped by a signal.
    With tracking on, the table is also a summary MLflow run's metrics and artifacts.
    """
    base = load_config(config, [*overrides, "data.normal_class=-1"])
    out = Path(out) if out else Path("runs") / f"{base.name}-table-{datetime.now():%Y%m%d-%H%M%S}"
    rows, complete = [], True
    for d in digits:
        cfg = load_config(config, [*overrides, f"data.normal_class={d}", f"name={base.name}-digit{d}"])
        r = fit(cfg, out=out / f"digit_{d}", resume="auto")
        if r.status != "finished":
            complete = False
            break
        rows.append({"normal_digit": d, "auroc": r.metrics["auroc"],
                     "average_precision": r.metrics["average_precision"], "run_dir": str(r.run_dir),
                     "run_id": r.run_id or ""})
    paths = write_table(rows, out)
    if rows and base.track.enabled:
        log_summary(base, rows, out, paths, complete)
    return rows, out, complete


def log_summary(base: Config, rows: list[dict], out: Path, paths: list[Path], complete: bool) -> None:
    """One MLflow run for the table: auroc_digit<d> and auroc_mean as metrics, the table files as artifacts."""
    tracker = make_tracker(base, True)
    tracker.start(base, out, None, tags={"gancore.kind": "anomaly_table",
                                         "gancore.digits": ",".join(str(r["normal_digit"]) for r in rows)})
    metrics = {f"auroc_digit{r['normal_digit']}": r["auroc"] for r in rows}
    metrics["auroc_mean"] = float(np.mean([r["auroc"] for r in rows]))
    tracker.log_metrics(metrics, 0)
    for p in paths:
        tracker.log_artifact(p, "report")
    tracker.finish("FINISHED" if complete else "KILLED")


def write_table(rows: list[dict], out: Path) -> list[Path]:
    """table.csv and table.md (per digit, then the mean) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| normal digit | AUROC | average precision |", "|---:|---:|---:|"]
    lines += [f"| {r['normal_digit']} | {r['auroc']:.4f} | {r['average_precision']:.4f} |" for r in rows]
    if rows:
        lines.append(f"| mean | {np.mean([r['auroc'] for r in rows]):.4f} | "
                     f"{np.mean([r['average_precision'] for r in rows]):.4f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return [out / "table.csv", out / "table.md"]


def rich_table(rows: list[dict]):
    """The per-digit table for the terminal."""
    from rich.table import Table

    t = Table(title="GANomaly: AUROC per normal digit (test split; other digits = anomalous)")
    t.add_column("normal digit", justify="right")
    t.add_column("AUROC", justify="right")
    t.add_column("average precision", justify="right")
    for r in rows:
        t.add_row(str(r["normal_digit"]), f"{r['auroc']:.4f}", f"{r['average_precision']:.4f}")
    if rows:
        t.add_section()
        t.add_row("mean", f"{np.mean([r['auroc'] for r in rows]):.4f}",
                  f"{np.mean([r['average_precision'] for r in rows]):.4f}")
    return t
