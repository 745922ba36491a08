"""The sweep's report: a rich table of the top trials, best.yaml (retrain: jobs/train.py --config best.yaml),
trials.csv, Optuna's figures, and all of it on the parent MLflow run (gancore/tracking/sweep_runs.py)."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from gancore.config import save_yaml
from gancore.io import atomic_write
from gancore.sweep.spec import Sweep, trial_config
from gancore.sweep.trials import budget_used
from gancore.tracking.sweep_runs import log_report

FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values", "timeline")


def _figures(study: Any, out: Path) -> list[Path]:
    """Optuna's matplotlib figures as PNGs; ones that need more trials (importances: 2 complete, varying) are
    skipped with a notice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis

    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # their "not enough trials" warnings: our notice says it
    done = []
    for name in FIGURES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vis, f"plot_{name}")(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            atomic_write(out / f"{name}.png", lambda fh: fig.savefig(fh, format="png", dpi=100))
            plt.close(fig)
            done.append(out / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, optuna.exceptions.OptunaError) as e:
            print(f"sweep: figure {name} skipped ({' '.join(str(e).split())[:120]})", flush=True)
            plt.close("all")
    return done


def best_trial(study: Any) -> Any | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None
                and math.isfinite(t.value)]
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def trials_table(sweep: Sweep, study: Any, top: int = 10) -> Any:
    """A rich Table of the best trials (then the others by number)."""
    from rich.table import Table

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    ranked = sorted(trials, key=lambda t: (t.value is None or t.state.name != "COMPLETE", t.value or 0, t.number))
    title = f"sweep {sweep.study}: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
    table = Table(title=title)
    unit = "images" if sweep.base.train.max_images else "steps"  # what the trials report at (objective.report_point)
    for col in ("trial", "state", sweep.objective, *(p.name for p in sweep.space), unit, "time", "MLflow run"):
        table.add_column(col, justify="right" if col not in ("state", "MLflow run") else "left")
    for t in ranked[:top]:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        steps = max(t.intermediate_values) if t.intermediate_values else "-"
        table.add_row(str(t.number), t.state.name, "-" if t.value is None else f"{t.value:.4g}",
                      *(fmt(t.params.get(p.name, "-")) for p in sweep.space), str(steps),
                      f"{t.duration.total_seconds():.0f} s" if t.duration else "-",
                      (t.user_attrs.get("mlflow.run_id") or "-")[:8])
    return table


def summary_markdown(sweep: Sweep, study: Any) -> str:
    """The study as a markdown page (summary.md): trials by state, CPU/GPU hours, the best trial, every trial."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    hours = sum(t.duration.total_seconds() for t in trials if t.duration) / 3600
    unit = "images" if sweep.base.train.max_images else "steps"
    best = best_trial(study)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# Sweep {sweep.study}", "",
             f"{len(trials)} trial(s): " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) +
             f"; {hours:.2f} hours of trial time (sum of the trials' wall times, one worker per trial). Objective: "
             f"{sweep.objective} ({'best' if sweep.value == 'best' else 'last'} of each trial's evaluations, "
             f"reported at {unit} {sweep.base.eval.every_images or sweep.base.eval.every} apart), minimised; pruner "
             f"{sweep.pruner.get('name')}. Every trial trains with seed {sweep.base.train.seed}: the values rank "
             "configurations on one seed, they are not results (the confirmation retrains the best on fresh seeds).", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {sweep.objective} {best.value:.4g}: " +
                  ", ".join(f"{k}={fmt(v)}" for k, v in sorted(best.params.items())), ""]
    names = [p.name for p in sweep.space]
    lines += ["| trial | state | " + sweep.objective + " | " + " | ".join(names) + f" | last {unit} | minutes |",
              "|" + "---|" * (len(names) + 5)]
    for t in sorted(trials, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else "-"
        state = t.state.name + (" (interrupted: re-queued)" if t.user_attrs.get("gancore.interrupted") else "")
        lines.append(f"| {t.number} | {state} | {'-' if t.value is None else f'{t.value:.4g}'} | " +
                     " | ".join(fmt(t.params.get(n, "-")) for n in names) +
                     f" | {last} | {t.duration.total_seconds() / 60:.1f} |" if t.duration else
                     f"| {t.number} | {state} | - | " + " | ".join(fmt(t.params.get(n, "-")) for n in names) +
                     f" | {last} | - |")
    return "\n".join(lines) + "\n"


def report(sweep: Sweep, study: Any, parent_id: str | None, final: bool | None = True) -> int:
    """The table of top trials; best.yaml (retrain: jobs/train.py --config best.yaml); figures and the best
    value/params on the parent MLflow run, which ends FINISHED (final), KILLED (interrupted) or stays (None)."""
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(trials_table(sweep, study))
    best = best_trial(study)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    best_yaml = sweep.dir / "best.yaml"
    if best is not None:
        save_yaml(trial_config(sweep, best.params), best_yaml)
        print(f"sweep {sweep.study}: best trial {best.number}: {sweep.objective} {best.value:.4g}; "
              f"retrain it with: python jobs/train.py --config {best_yaml}", flush=True)
    else:
        print(f"sweep {sweep.study}: no completed trial yet", flush=True)
    figures = _figures(study, sweep.dir / "figures") if best is not None else []
    with contextlib.suppress(Exception):
        atomic_write(sweep.dir / "trials.csv", study.trials_dataframe().to_csv(index=False))
    atomic_write(sweep.dir / "summary.md", summary_markdown(sweep, study))
    if parent_id and sweep.base.track.enabled:
        finished = budget_used(study.get_trials(deepcopy=False))["finished"]
        log_report(sweep, parent_id, best, finished, figures, [best_yaml, sweep.dir / "trials.csv"], final)
    return 0
