"""The sweep's confirmation: a search's winner judged on seeds the search never used, at the full budget,
beside a baseline preset trained and measured the same way. `python jobs/sweep.py SWEEP --confirm`.

For each run (winner x confirm.seeds, baseline x confirm.baseline_seeds): train it in <sweep dir>/confirm/<role>_seed<s>
(resumable: `--resume auto`; a finished run is reused; a run whose row and generator file are committed is kept
as it is, so a fresh clone continues the confirmation instead of starting it again), write its best checkpoint's
sampling weights as a small file under results/generators/<study>/ (once: an existing file is never replaced),
measure that file with the final extractor against the final real split (every run first), then against the
training images, beside it, and rewrite the table
results/<study>_confirm.md/.csv after every run, so an interrupted confirmation keeps what it measured. The table
ends with mean ± sd per role, their difference, and whether it exceeds the seed-to-seed spread (the sum of the two
sds); a tuned number from the search's own seed never appears in it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from gancore.config import Config, flat, load_config, replace
from gancore.errors import SweepError
from gancore.experiments.reproduce import Plan, _csv, _fmt, earlier_rows, finished_run, planned_budget, table_row
from gancore.sweep.spec import Sweep, trial_config

STOPPED = 75  # the exit code of a stop signal (the trainer checkpointed; run the same command to continue)
COLUMNS = ["experiment", "role", "trial", "seed", "final_fid", "final_fid_train", "fid_best", "best_images", "images",
           "steps", "wall_min", "device", "commit", "generator", "run_id"]


def plans(sweep: Sweep, params: dict[str, Any]) -> list[Plan]:
    """The confirmation's runs: the winner (the trial's params) on each fresh seed, then the baseline on its seeds.
    The winner is its trial's config, the baseline its preset with the sweep's infrastructure and evaluation
    overrides (not the search's hyper-parameter overrides); both with confirm.overrides (the full budget) on top."""
    c = _needs_confirm(sweep)
    infra = set(flat(sweep.base, include_infra=True)) - set(flat(sweep.base))
    protocol = {k: v for k, v in sweep.overrides.items() if k in infra}  # not the search's hyper-parameters
    out = []
    for s in c.seeds:
        cfg = replace(trial_config(sweep, params), **{**c.overrides, "train.seed": s, "train.progress": True,
                                                       "name": f"{sweep.study}-winner"})
        out.append(_plan(sweep, "winner", s, cfg))
    if c.baseline is not None:
        for s in c.baseline_seeds:
            cfg = replace(load_config(c.baseline), **{**protocol, **c.overrides, "train.seed": s})
            out.append(_plan(sweep, cfg.name, s, cfg))
    return out


def _plan(sweep: Sweep, role: str, seed: int, cfg: Config) -> Plan:
    key = "winner" if role == "winner" else "baseline"
    b = planned_budget(cfg)
    p = Plan(role, cfg, sweep.dir / "confirm" / f"{key}_seed{seed}", b.total_steps, f"{role} (seed {seed})")
    p.images_per_step = b.images_per_step
    return p


def _needs_confirm(sweep: Sweep) -> Any:
    if sweep.confirm is None:
        raise SweepError(f"{sweep.path}: no confirm: section; add one (seeds, baseline, overrides) to confirm the "
                         "winner, see sweeps/README.md")
    return sweep.confirm


def generator_file(sweep: Sweep, p: Plan) -> Path:
    return _needs_confirm(sweep).results / "generators" / sweep.study / f"{p.run_dir.name}.pt"


def run_confirm(sweep: Sweep, progress: Any = print, runs: str = "all", seeds: tuple[int, ...] | None = None) -> int:
    """Train, export and measure every confirmation run (`runs`: all, or only the winner's or the baseline's;
    `seeds`: only these seeds of them, so that several processes, machines or Slurm jobs can each take a share),
    writing the table after each; 0 done, 75 stopped. The baseline does not depend on the search, so it can be
    trained while the search still runs; the winner waits for a finished search unless asked for."""
    from gancore.sweep.report import best_trial
    from gancore.sweep.storage import open_storage, open_study
    from gancore.sweep.trials import trials_left
    from gancore.train.loop import fit

    from gancore.sweep.dashboard import check_study

    c = _needs_confirm(sweep)
    check_study(sweep)  # a missing storage or study: one line, and nothing is created
    study = open_study(sweep, open_storage(sweep.storage_url))
    best = best_trial(study)
    if best is None:
        raise SweepError(f"sweep {sweep.study}: no completed trial to confirm yet; run the sweep first")
    todo = plans(sweep, best.params)
    left = trials_left(study, sweep.n_trials)
    if left and runs != "baseline":
        raise SweepError(f"sweep {sweep.study}: the search has {left} trial(s) left; finish it first (run the "
                         "sweep again), or confirm only the baseline now with --confirm-runs baseline")
    selected = [p for p in todo if runs == "all" or (p.preset == "winner") == (runs == "winner")]
    if seeds is not None:
        have = sorted({p.cfg.train.seed for p in selected})
        if missing := [s for s in seeds if s not in have]:
            raise SweepError(f"--confirm-seeds {','.join(map(str, missing))}: not among the seeds of the {runs} "
                             f"confirmation runs ({', '.join(map(str, have))}); see confirm: in {sweep.path}")
        selected = [p for p in selected if p.cfg.train.seed in seeds]
    progress(f"confirm {sweep.study}: trial {best.number} ({sweep.objective} {best.value:.4g} on the search's seed) "
             f"on seeds {list(c.seeds)}, beside {c.baseline.stem if c.baseline else 'no baseline'}; "
             f"{len(selected)} run(s) here ({', '.join(f'{p.label}: {p.steps} steps' for p in selected)})")
    kept = committed_rows(sweep, todo, best.number)
    write = lambda: write_table(sweep, todo, best, left, kept)  # noqa: E731
    # two passes: every run trained and measured against the final split (the table's number) first, then every
    # run against the training images, so the numbers that matter most are measured first
    for n_pass, splits in enumerate([[s] for s in _finals(sweep)]):
        for i, p in enumerate(selected, 1):
            say = lambda m, i=i, p=p: progress(f"[{i}/{len(selected)}] {p.label}: {m}")  # noqa: E731
            if p.label in kept and not finished_run(p):
                if n_pass == 0:
                    say(f"trained, its generator {kept[p.label]['generator']} committed; kept, not trained again "
                        "(delete its row to retrain it)")
                measure_committed(sweep, p, kept[p.label], say, write, splits)
                continue
            if not finished_run(p):
                say(f"training {p.steps} steps in {p.run_dir}")
                r = fit(p.cfg, out=p.run_dir, resume="auto", tags={"gancore.confirm": sweep.study,
                                                                  "optuna.trial": str(best.number)})
                if r.status != "finished":
                    write()
                    return STOPPED
            measure(sweep, p, say, write, splits)  # writes the table after the export and each measurement
    if selected and _floor(sweep, todo[0]) is not None:  # both splits' statistics (cached by now): the floor row
        write()
    progress(f"confirm {sweep.study}: wrote {c.results / (sweep.study + '_confirm.md')}")
    return 0


def committed_rows(sweep: Sweep, todo: list[Plan], best: int) -> dict[str, dict[str, Any]]:
    """The committed table's rows whose generator file is committed, by label: on a fresh clone, whose run
    directories and MLflow store are gone, such a run is not trained again; its file is measured where the row lacks
    a final FID (measure_committed), and write_table keeps the row. Winner rows of another trial than the `best`
    one are refused in one line (their generator files would otherwise be taken for the new winner's)."""
    c = _needs_confirm(sweep)
    table = c.results / f"{sweep.study}_confirm.csv"
    out = {}
    for r in earlier_rows(table, _columns(sweep, todo[0]), set()):
        if r.get("role") == "winner" and r.get("trial") not in (None, best):
            raise SweepError(f"{table}: its winner rows are trial {r['trial']}'s, the search's best is now trial "
                             f"{best}; move that table and results/generators/{sweep.study}/winner_* aside to "
                             "confirm the new winner")
        if r.get("generator") and (c.results.parent / r["generator"]).is_file():
            out[r["experiment"]] = r
    return out


def _finals(sweep: Sweep) -> dict[str, list[str]]:
    """The final splits and the row fields each fills: the final split, then the training images."""
    c = _needs_confirm(sweep)
    out: dict[str, list[str]] = {}
    for split, field in ((c.real_split, "final_fid"), ("train", "final_fid_train")):
        out.setdefault(split, []).append(field)
    return out


def export(sweep: Sweep, p: Plan, progress: Any = print) -> Path:
    """The run's best checkpoint as a small sampling-only file under results/generators/ (once: never replaced)."""
    import torch

    from gancore.io import atomic_write
    from gancore.train import state as ckpt

    out = generator_file(sweep, p)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        small = ckpt.sampling_only(ckpt.load(ckpt.checkpoint_file(p.run_dir)), small=True)
        atomic_write(out, lambda fh: torch.save(small, fh))
        progress(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, step {small['step']})")
    return out


def measure(sweep: Sweep, p: Plan, progress: Any = print, written: Any = lambda: None,
            splits: list[str] | None = None) -> None:
    """Export the run's generator file and measure it with the final extractor (against the final split, then the
    training images), each logged into the run; skipped when already measured. `written` runs after the export
    and after each measurement (the table is rewritten there, so an interruption keeps what was measured)."""
    from gancore.evaluation import evaluate_checkpoint

    c = _needs_confirm(sweep)
    out = export(sweep, p, progress)
    written()
    have = _run_metrics(p)
    for split in splits or _finals(sweep):
        key = _final_key(p, c.extractor, split)
        if key not in have:
            progress(f"{key} of {out.name}")
            evaluate_checkpoint(str(out), n=p.cfg.eval.n_samples, extractor=c.extractor, uri=p.cfg.track.uri,
                                real_split=split)
            written()


def measure_committed(sweep: Sweep, p: Plan, r: dict[str, Any], progress: Any, written: Any,
                      splits: list[str] | None = None) -> None:
    """A kept row (committed generator, no run here): measure the file where the row lacks a final FID, without
    logging (its MLflow run may be gone), into the row."""
    from gancore.evaluation import evaluate_checkpoint

    c = _needs_confirm(sweep)
    gen = c.results.parent / r["generator"]
    for split, fields in _finals(sweep).items():
        done = all(isinstance(r.get(f), float) and math.isfinite(r[f]) for f in fields)
        if done or split not in (splits or [split]):
            continue
        key = _final_key(p, c.extractor, split)
        progress(f"{key} of {gen.name}")
        values, _ = evaluate_checkpoint(str(gen), n=p.cfg.eval.n_samples, extractor=c.extractor, log=False,
                                        real_split=split)
        r.update({f: values[key] for f in fields})
        written()


def _final_key(p: Plan, extractor: str, split: str) -> str:
    from gancore.metrics.fidelity import metric_key

    return metric_key("fid", extractor, p.cfg.eval.n_samples, split)


def _run_metrics(p: Plan) -> dict[str, float]:
    from gancore.tracking.store import existing_client

    rec = finished_run(p)
    if rec is None:
        return {}
    client, _ = existing_client(p.cfg.track.uri)
    return client.get_run(rec).data.metrics


def row(sweep: Sweep, p: Plan, run_id: str) -> dict[str, Any]:
    """One table row, read back from the run's MLflow record and its committed generator file."""
    from gancore.tracking.store import existing_client

    c = _needs_confirm(sweep)
    base = table_row(p, run_id, "domain")
    client, _ = existing_client(p.cfg.track.uri)
    run = client.get_run(run_id)
    per_step = p.images_per_step
    gen = generator_file(sweep, p)
    return {
        "experiment": p.label, "role": "winner" if p.preset == "winner" else "baseline",
        "trial": run.data.tags.get("optuna.trial") if p.preset == "winner" else None, "seed": p.cfg.train.seed,
        "final_fid": run.data.metrics.get(_final_key(p, c.extractor, c.real_split)),
        "final_fid_train": run.data.metrics.get(_final_key(p, c.extractor, "train")),
        "fid_best": base["fid_best"], "best_images": base["fid_best_step"] * per_step if base["fid_best_step"] else None,
        "images": p.steps * per_step, "steps": p.steps, "wall_min": base["wall_min"], "device": base["device"],
        "commit": run.data.tags.get("gancore.git_commit", "?")[:10], "run_id": run_id,
        "generator": str(gen.relative_to(c.results.parent)) if gen.is_file() else None,
    }


def _columns(sweep: Sweep, p: Plan) -> list[tuple[str, str]]:
    from gancore.metrics.fidelity import metric_key

    c = _needs_confirm(sweep)
    heads = {"final_fid": _final_key(p, c.extractor, c.real_split), "final_fid_train": _final_key(p, c.extractor, "train"),
             "fid_best": f"best {metric_key('fid', p.cfg.eval.extractor, p.cfg.eval.n_samples)} ({p.cfg.eval.real_split})"}
    return [(k, heads.get(k, k)) for k in COLUMNS]


def summary(rows: list[dict[str, Any]], anchor: dict[str, Any]) -> list[str]:
    """mean ± sd of the final FID per role, the winner's difference to the baseline and whether it exceeds the
    seed-to-seed spread (the sum of the two sds), and the anchor beside them."""
    stats = {}
    for role in ("winner", "baseline"):
        vals = [r["final_fid"] for r in rows if r.get("role") == role and isinstance(r.get("final_fid"), float)
                and math.isfinite(r["final_fid"])]
        if vals:
            stats[role] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan"), len(vals))
    lines = [f"- {role}: {m:.2f} ± {sd:.2f} (mean ± sd of {n} seeds)" if n > 1 else
             f"- {role}: {m:.2f} (one seed so far: no sd yet)" for role, (m, sd, n) in stats.items()]
    if len(stats) == 2:
        (mw, sw, nw), (mb, sb, nb) = stats["winner"], stats["baseline"]
        spread = (sw if nw > 1 else 0.0) + (sb if nb > 1 else 0.0)
        verdict = ("exceeds" if abs(mw - mb) > spread else "does not exceed") if nw > 1 and nb > 1 else \
            "cannot be judged yet (one role has a single seed)"
        lines.append(f"- difference winner - baseline: {mw - mb:+.2f}; it {verdict} the seed-to-seed spread "
                     f"({spread:.2f} = sum of the two sds)" if "judged" not in verdict else
                     f"- difference winner - baseline: {mw - mb:+.2f}; it {verdict}")
    if anchor:
        lines.append(f"- anchor: {anchor['name']}: {anchor['fid']:g}" + (
            f"; the winner's mean is {stats['winner'][0] - anchor['fid']:+.2f} from it" if "winner" in stats else ""))
    return lines


def write_table(sweep: Sweep, todo: list[Plan], best: Any, left: int | None = 0,
                kept: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """results/<study>_confirm.csv and .md: the measured rows (kept from an earlier table when not measured here,
    `kept`: committed rows measured further here), the open ones, and the summary; rows in the plan's order."""
    from gancore.io import atomic_write

    c = _needs_confirm(sweep)
    name = f"{sweep.study}_confirm"
    c.results.mkdir(parents=True, exist_ok=True)
    cols = _columns(sweep, todo[0])
    heads = dict(cols)
    rows = [row(sweep, p, run_id) for p in todo if (run_id := finished_run(p))]
    rows += [r for label, r in (kept or {}).items() if label not in {r["experiment"] for r in rows}]
    rows += earlier_rows(c.results / f"{name}.csv", cols, {r["experiment"] for r in rows})
    order = {p.label: i for i, p in enumerate(todo)}
    rows.sort(key=lambda r: order.get(r["experiment"], len(order)))
    atomic_write(c.results / f"{name}.csv", _csv(rows, cols))
    done = {r["experiment"] for r in rows}
    p0 = todo[0]
    search = (f"The search is still running ({left} trial(s) left): its best trial so far is {best.number} "
              f"({sweep.objective} {best.value:.4g}); the winner's rows stay open until it ends. Every run trains " if left else
              f"The search's best trial {best.number} ({sweep.objective} {best.value:.4g} on the search's seed "
              f"{sweep.base.train.seed}, not a result) retrained on fresh seeds ")
    lines = [f"# Confirmation of sweep {sweep.study} (`python jobs/sweep.py {_rel(sweep.path)} --confirm`)", "",
             search + f"at the full budget "
             f"({p0.cfg.train.max_images or '-'} real images shown to D), beside the baseline preset "
             f"{c.baseline.stem if c.baseline else '-'} trained the same way. Each run keeps the checkpoint with the "
             f"best {heads['fid_best'].split()[1]} against the {p0.cfg.eval.real_split} images (evaluated every "
             f"{p0.cfg.eval.every_images or p0.cfg.eval.every} {'images' if p0.cfg.eval.every_images else 'steps'}); "
             f"that checkpoint's sampling weights (EMA when on, float16) are the committed generator file, and "
             f"`{heads['final_fid']}` is measured on that file against the {c.real_split} images "
             f"(`python jobs/eval.py FILE --extractor {c.extractor} -n {p0.cfg.eval.n_samples} --real-split "
             f"{c.real_split}`); `{heads['final_fid_train']}` is the same file against the training images.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    lines += [f"| {p.label} | " + " | ".join(["open"] * (len(cols) - 1)) + " |" for p in todo if p.label not in done]
    floor = _floor(sweep, p0, cached_only=True) if rows else None  # a table write never computes statistics
    lines += ["", *summary(rows, c.anchor),
              *([f"- floor: {floor:.2f} = {c.extractor} FID of {p0.cfg.eval.n_samples} {p0.cfg.data.name} training images against "
                 f"the {c.real_split} images (no generator), from the same cached real statistics"] if floor else
                [f"- floor: open until the {c.extractor} statistics of both splits are cached (the second pass "
                 "measures against the training images)"] if rows and c.real_split != "train" else []),
              "",
              ("Params of the best trial so far: " if left else "Params of the winner: ") +
              ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best.params.items()))]
    atomic_write(c.results / f"{name}.md", "\n".join(lines) + "\n")
    return rows


def _floor(sweep: Sweep, p: Plan, cached_only: bool = False) -> float | None:
    """The data set's own floor under the final protocol: real training images against the final split."""
    import torch

    from gancore.metrics.fidelity import floor_fid

    c = _needs_confirm(sweep)
    if c.real_split == "train":
        return None
    return floor_fid(p.cfg, c.extractor, p.cfg.eval.n_samples, torch.device("cpu"), cached_only=cached_only)


def _rel(path: Path | None) -> str:
    if path is None:
        return "SWEEP"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
