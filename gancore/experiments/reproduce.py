"""`make reproduce SUITE=...`: train every experiment of a suite (or reuse its finished run), evaluate all of them
under one named protocol, and write results/<suite>.md, .csv and a FID-vs-step figure.

Each experiment is an ordinary training run (gancore.train) in `<runs>/<preset>-<config digest>`, so the same
resolved config always lands in the same run dir: a rerun reuses a finished run (its MLflow run is FINISHED and
its last checkpoint is the last step) and continues an interrupted one (`--resume auto`, the same MLflow run).
The protocol is part of the config (eval.extractor, eval.n_samples, eval.every: every epoch), so every number of
one table is measured the same way; the table names the protocol, and `gancore.metrics.protocol` is stamped on
each run. The reports' numbers (gancore/experiments/reports.py) were measured with Inception: they sit in their
own columns, never in gancore's.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gancore.config import Config, load_config, replace, to_dict
from gancore.errors import ConfigError
from gancore.experiments.reports import GOALS, REPORTED

ROOT = Path(__file__).resolve().parents[2]
SUITES: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist_dcgan", "mnist_dcgan_plus"),
    "cifar10": ("cifar10_dcgan", "cifar10_dcgan_nz50", "cifar10_dcgan_nz200", "cifar10_dcgan_bn_g",
                "cifar10_dcgan_bn_d", "cifar10_dcgan_smooth", "cifar10_dcgan_tanh", "cifar10_dcgan_lrelu",
                "cifar10_cgan", "cifar10_wgan_gp"),
    "families": ("mnist_mlp_gan", "mnist_vae", "mnist_ddpm_tiny"),
    # the presets meant to beat the best published numbers (reports.GOALS; sized for a GPU)
    "bests": ("mnist_dcgan_plus", "cifar10_sndcgan", "cifar10_cgan_plus"),
}
SUITES["all"] = tuple(dict.fromkeys(p for s in ("mnist", "cifar10", "families", "bests") for p in SUITES[s]))
EVALS = 40  # evaluations per run at most (at epoch ends): every epoch for short runs, every k epochs for long ones
# protocol name -> the extractor per dataset ("domain": the dataset's classifier; "inception": the FID Inception)
PROTOCOLS = ("domain", "inception")
COLUMNS = ["experiment", "report_fid", "report_is", "fid_best", "fid_best_step", "fid_last", "is_last", "kid_last",
           "protocol", "steps", "wall_min", "device", "run_id"]
# `--final inception` adds three columns: the best checkpoint (by the protocol's FID) measured once more with another
# extractor at the end, headed by their metric (fid_inception_10k ...), never mixed into the protocol's columns


@dataclass
class Plan:
    preset: str
    cfg: Config
    run_dir: Path
    steps: int
    label: str = ""  # the table's experiment name: the preset, with its seed when the suite runs several
    images_per_step: int = 0  # real images D sees per step (gancore.train.budget), when the plan knows it

    def __post_init__(self) -> None:
        self.label = self.label or self.preset


def _digest(cfg: Config) -> str:
    """The resolved config minus where it is written and how it is shown: same digest, same experiment."""
    d = to_dict(cfg)
    d["track"] = {k: v for k, v in d["track"].items() if k not in ("uri", "experiment")}
    d["train"] = {k: v for k, v in d["train"].items() if k != "progress"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan(suite: str, protocol: str = "domain", epochs: int | None = None, n_samples: int = 10000,
         overrides: tuple[str, ...] = (), runs_root: Path = Path("runs/reproduce"),
         seeds: tuple[int, ...] | None = None) -> list[Plan]:
    """The experiments of `suite`, each resolved with the protocol's eval settings (and `epochs`, the reduced-budget
    flag); `overrides` go last (tests shrink the runs with them). `seeds`: each experiment once per seed
    (train.seed), labelled "<preset> (seed s)"; None: once, with the preset's own seed."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds, e.g. 0,1,2")
    from gancore.metrics.classifier import FOR_DATASET  # the dataset's own domain extractor

    out: list[tuple[int, Plan]] = []
    for preset in SUITES[suite]:
        path = ROOT / "configs" / f"{preset}.yaml"
        budget = [f"train.epochs={epochs}"] if epochs is not None else []
        base = load_config(path, [*budget, *overrides])
        per_epoch = steps_per_epoch(base)
        total = base.train.max_steps or base.train.epochs * per_epoch
        every = per_epoch * math.ceil(total / EVALS / per_epoch)  # every epoch, or every k epochs: <= EVALS of them
        extractor = "inception" if protocol == "inception" else FOR_DATASET[base.data.name]
        over = [f"eval.extractor={extractor}", f"eval.n_samples={n_samples}", f"eval.every={every}",
                "eval.metrics=[fid,kid,is]", f"name={preset}", *budget]
        for k, seed in enumerate(seeds if seeds is not None else (None,)):
            cfg = load_config(path, [*over, *([] if seed is None else [f"train.seed={seed}"]), *overrides])
            steps = planned_steps(cfg)
            label = preset if seed is None else f"{preset} (seed {seed})"
            out.append((k, Plan(preset, cfg, Path(runs_root) / f"{preset}-{_digest(cfg)}", steps, label)))
    # seed-major (stable): an interrupted multi-seed suite has whole seeds of every preset first
    return [p for _, p in sorted(out, key=lambda kp: kp[0])]


def _epoch_and_draws(cfg: Config) -> tuple[int, int]:
    from gancore.data import load_images
    from gancore.train.state import build_family

    x, y = load_images(cfg.data)
    classes = max(int(y.max()) + 1, cfg.model.num_classes) if len(y) else cfg.model.num_classes
    draws = build_family(cfg, tuple(x.shape[1:]), classes).draws_per_step()
    return max(1, (len(x) // cfg.optim.batch_size) // draws), draws


def steps_per_epoch(cfg: Config) -> int:
    """Training steps per epoch, as the loop counts them: whole batches, over the real batches one step draws."""
    return _epoch_and_draws(cfg)[0]


def planned_budget(cfg: Config) -> Any:
    """The run's gancore.train.budget.Budget (total steps, images per step) as the loop will compute it."""
    from gancore.train.budget import budget

    return budget(cfg, *_epoch_and_draws(cfg))


def planned_steps(cfg: Config) -> int:
    return planned_budget(cfg).total_steps


def finished_run(p: Plan) -> str | None:
    """The MLflow run id of `p`'s run dir when it is complete (FINISHED, last checkpoint at the last step)."""
    from gancore.train.rundir import RunDir

    run_dir = RunDir(p.run_dir)
    last, rec = run_dir.latest(), run_dir.tracking_run
    if last is None or RunDir.step_of(last) != p.steps or not rec.is_file():
        return None
    run_id = json.loads(rec.read_text())["run_id"]
    from gancore.tracking import open_run_info

    return run_id if open_run_info(run_id, p.cfg.track.uri)["status"] == "FINISHED" else None


def table_name(suite: str, protocol: str = "domain", epochs: int | None = None) -> str:
    """The tables' file name: one per suite, budget and protocol, so a run at another budget or protocol never
    writes into a measured table. table_name("mnist") == "mnist"; table_name("mnist", "inception", 3) ==
    "mnist_3ep_inception"."""
    return suite + (f"_{epochs}ep" if epochs else "") + (f"_{protocol}" if protocol != PROTOCOLS[0] else "")


def reproduce(plans: list[Plan], out: Path, suite: str, protocol: str, progress: Any = print,
              final: str | None = None, name: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Train (or reuse) every planned experiment, measure each best checkpoint with the `final` extractor when
    given (once: a run that has the metric keeps it), then write the tables (`name`.md/.csv, default the suite;
    rows measured earlier and not measured again here are kept); returns (rows, complete)."""
    from gancore.train.loop import fit

    if final and any(p.cfg.eval.extractor == final for p in plans):
        raise ConfigError(f"--final {final} is the protocol's own extractor; leave --final out or pick another")
    complete = True
    for i, p in enumerate(plans, 1):
        run_id = finished_run(p)
        if run_id:
            progress(f"[{i}/{len(plans)}] {p.label}: finished run {run_id} reused ({p.run_dir})")
            continue
        progress(f"[{i}/{len(plans)}] {p.label}: training {p.steps} steps in {p.run_dir}")
        r = fit(p.cfg, out=p.run_dir, resume="auto", tags={"gancore.reproduce": suite})
        if r.status != "finished":
            complete = False
            break
    if complete and final:
        for i, p in enumerate(plans, 1):
            final_eval(p, finished_run(p), final, lambda m, i=i: progress(f"[{i}/{len(plans)}] {p.label}: {m}"))
    rows = [table_row(p, run_id, protocol, final) for p in plans if (run_id := finished_run(p))]
    write_tables(rows, Path(out), suite, protocol, plans, final, name=name)
    return rows, complete


def final_key(p: Plan, final: str, metric: str = "fid") -> str:
    from gancore.metrics.fidelity import metric_key

    return metric_key(metric, final, p.cfg.eval.n_samples)


def final_eval(p: Plan, run_id: str, final: str, progress: Any = print) -> None:
    """`final`-extractor FID/KID of the finished run's best checkpoint, logged into its MLflow run (at that
    checkpoint's step, protocol-stamped); skipped when the run already has it. Interrupted, it continues from its
    cached feature chunks (gancore.evaluation)."""
    from gancore.evaluation import evaluate_checkpoint

    key = final_key(p, final)
    if key in _metrics(p, run_id):
        progress(f"{key} already measured (run {run_id})")
        return
    progress(f"{key} of the best checkpoint ({p.run_dir})")
    evaluate_checkpoint(str(p.run_dir), n=p.cfg.eval.n_samples, extractor=final, uri=p.cfg.track.uri)


def table_row(p: Plan, run_id: str, protocol: str, final: str | None = None) -> dict[str, Any]:
    """One results row, read back from the experiment's finished MLflow run `run_id`."""
    from gancore.metrics.fidelity import MetricKey
    from gancore.tracking import metric_history, open_run_info

    uri = p.cfg.track.uri
    run = open_run_info(run_id, uri)
    metric = run["metrics"].get
    fid = MetricKey.of("fid", p.cfg.eval.extractor, p.cfg.eval.n_samples)
    hist = metric_history(run_id, fid.name, uri)  # [(step, value)] by step
    fid_key = fid.name if hist else None
    best = min(hist, key=lambda m: m[1]) if hist else None
    same = lambda kind: metric(dataclasses.replace(fid, metric=kind).name)  # noqa: E731 (the FID key's protocol)
    rep = REPORTED.get(p.preset)
    extra: dict[str, Any] = {}
    if final:
        last = max(metric_history(run_id, final_key(p, final), uri), key=lambda m: m[0], default=None)
        extra = {"final_fid": last[1] if last else None, "final_step": last[0] if last else None,
                 "final_kid": metric(final_key(p, final, "kid"))}
    return {**extra,
        "experiment": p.label, "report_fid": rep.fid if rep else None, "report_is": rep.inception_score if rep else None,
        "fid_best": best[1] if best else None, "fid_best_step": best[0] if best else None,
        "fid_last": hist[-1][1] if hist else None, "is_last": same("is") if fid_key else None,
        "kid_last": same("kid") if fid_key else None,
        "protocol": f"{protocol}: {fid_key}" if fid_key else protocol, "steps": p.steps,
        "wall_min": (run["end_time"] - run["start_time"]) / 60000 if run["end_time"] else None,
        "device": run["tags"].get("gancore.device", "?"), "run_id": run_id,
        "history": hist,
        "run_dir": p.run_dir,
    }


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def earlier_rows(path: Path, cols: list[tuple[str, str]], measured: set[str]) -> list[dict[str, Any]]:
    """The rows of an existing table `path` (.csv) that this call does not measure again: a row measured earlier
    (on another machine, or before an interruption) is never lost. Columns of that table that `cols` lacks (e.g. an
    earlier `--final` column) are appended to `cols`, so no cell is dropped either."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        by_header = {h: c for c, h in cols}
        cols += [(h, h) for h in reader.fieldnames or [] if h not in by_header]
        by_header = {h: c for c, h in cols}
        return [{by_header[h]: _value(v) for h, v in r.items() if h is not None} for r in reader
                if r.get("experiment") not in measured]


def _value(v: str) -> Any:
    """A table cell read back: None (empty), int, float or text, as table_row made it."""
    if v == "":
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def write_tables(rows: list[dict[str, Any]], out: Path, suite: str, protocol: str, plans: list[Plan],
                 final: str | None = None, name: str | None = None) -> None:
    """results/<name>.csv, .md and _fid.png (atomic writes; name defaults to the suite); rows of the existing table
    that are not measured here are kept (earlier_rows); open rows are listed as such."""
    from gancore.io import atomic_write

    out, name = Path(out), name or suite
    out.mkdir(parents=True, exist_ok=True)
    cols = _columns(final, plans)
    kept = earlier_rows(out / f"{name}.csv", cols, {r["experiment"] for r in rows})
    measured, rows = rows, [*rows, *kept]
    done = {r["experiment"] for r in rows}
    atomic_write(out / f"{name}.csv", _csv(rows, cols))
    lines = [f"# Results: {suite} suite (`make reproduce SUITE={suite}`)", "",
             f"Protocol of gancore's columns: **{protocol}** ({rows[0]['protocol'] if rows else 'none measured'}; "
             "each run's MLflow tag `gancore.protocol.*` holds the extractor's weights sha256, the counts and the "
             "reference split). The report columns are the reports' Inception FID/IS, a different protocol: "
             "compare within a column, not across."]
    if final:
        lines += ["", f"`{cols[-3][1]}` / `{cols[-2][1]}`: the best checkpoint (by the protocol's FID) measured at "
                  f"the end with the {final} extractor (`--final {final}`), at step `{cols[-1][1]}`."]
    lines += ["", "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c, _ in cols) + " |" for r in rows]
    lines += [f"| {p.label} | " + " | ".join(["open"] * (len(cols) - 1)) + " |" for p in plans
              if p.label not in done]
    lines += ["| " + " | ".join(r.get(c, "") for c, _ in cols) + " |" for r in seed_means(rows, plans, cols)]
    goals = [f"- {k}: {GOALS[k].protocol} <= {GOALS[k].fid:g} (beats {GOALS[k].beats})"
             for k in dict.fromkeys(p.preset for p in plans) if k in GOALS]
    if goals:
        lines += ["", "Goals (gancore/experiments/reports.py), each under its own protocol:", *goals]
    atomic_write(out / f"{name}.md", "\n".join(lines) + "\n")
    if measured:  # the figures need each run's MLflow history and sample grids: this machine's runs only
        _figure(measured, out / f"{name}_fid.png", protocol)
        _grids(measured, out / f"{name}_grids.png")


MEANS = ("fid_best", "fid_last", "is_last", "kid_last", "final_fid", "final_kid", "wall_min")


def seed_means(rows: list[dict[str, Any]], plans: list[Plan], cols: list[tuple[str, str]]) -> list[dict[str, str]]:
    """One "<preset> (mean of k seeds)" row per preset run with several seeds: mean ± sample sd of every measured
    column (a column some seeds lack stays "-"), as text for the markdown table."""
    import statistics

    by_label = {r["experiment"]: r for r in rows}
    out = []
    for preset in dict.fromkeys(p.preset for p in plans):
        runs = [by_label[p.label] for p in plans if p.preset == preset and p.label != p.preset and p.label in by_label]
        if len(runs) < 2:
            continue
        row = {c: "-" for c, _ in cols}
        row["experiment"] = f"{preset} (mean of {len(runs)} seeds)"
        for c in MEANS:
            vals = [r.get(c) for r in runs]
            if all(isinstance(v, float) and math.isfinite(v) for v in vals):
                row[c] = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        row["protocol"], row["steps"] = runs[0]["protocol"], str(runs[0]["steps"])
        out.append(row)
    return out


def _columns(final: str | None, plans: list[Plan]) -> list[tuple[str, str]]:
    """(row key, header) of the table; the final columns are headed by their metric (fid_inception_10k ...)."""
    cols = [(c, c) for c in COLUMNS]
    if final and plans:
        key = final_key(plans[0], final)
        cols += [("final_fid", key), ("final_kid", final_key(plans[0], final, "kid")), ("final_step", key + "_step")]
    return cols


def _csv(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([h for _, h in cols])
    w.writerows([["" if r.get(c) is None else r[c] for c, _ in cols] for r in rows])
    return buf.getvalue()


def _figure(rows: list[dict[str, Any]], path: Path, protocol: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["history"]:
            steps, values = zip(*r["history"])
            ax.plot(steps, values, marker="o", label=r["experiment"])
    ax.set_xlabel("step")
    ax.set_ylabel(rows[0]["protocol"].split(": ")[-1])
    ax.set_yscale("log")
    ax.set_title(f"FID vs step ({protocol} protocol)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grids(rows: list[dict[str, Any]], path: Path) -> None:
    """Every experiment's last fixed-noise sample grid (its run dir's newest samples/step_*.png), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from gancore.train.rundir import RunDir

    found = [(r["experiment"], g[-1]) for r in rows if (g := RunDir(r["run_dir"]).sample_grids())]
    if not found:
        return
    cols = min(4, len(found))
    nrows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, png) in zip(axes.flat, found):
        ax.imshow(Image.open(png).convert("RGB"))
        ax.set_title(f"{label}\nstep {int(png.stem[5:])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def estimate_seconds(p: Plan, probe_steps: int = 6) -> float:
    """Training time of `p` on this device from a short probe run (tracking and metrics off): s/step x steps."""
    import tempfile

    from gancore.train.loop import fit

    probe = replace(p.cfg, **{"train.max_steps": probe_steps, "track.enabled": False, "eval.n_samples": 0,
                              "eval.every": 0, "train.progress": False, "train.checkpoint_every": 10**9,
                              "track.image_every": 10**9})
    with tempfile.TemporaryDirectory() as d:
        r = fit(probe, out=Path(d) / "probe")
    return r.loop_seconds / max(1, r.steps_run) * p.steps


def estimate_final_seconds(plans: list[Plan], final: str, probe: int = 50) -> float:
    """Time of the `--final` evaluations still to do, from the extractor's speed on `probe` images here: the
    generated images of each plan without the metric, plus the real statistics once per dataset (cached after)."""
    import time

    import torch

    from gancore.metrics import extractors
    from gancore.metrics.fidelity import eval_batch, features, real_images, stats_path

    todo = [p for p in plans if not ((run := finished_run(p)) and final_key(p, final) in _metrics(p, run))]
    if not todo:
        return 0.0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = todo[0].cfg
    fe, fe_id = extractors.load(final, cfg, dev)
    x = real_images(cfg, probe)
    batch = eval_batch(cfg, dev)
    features(fe, iter(x[:batch].split(batch)), min(batch, len(x)), dev)  # warm-up
    t = time.perf_counter()
    features(fe, iter(x.split(batch)), len(x), dev)
    per_image = (time.perf_counter() - t) / len(x)
    images = sum(p.cfg.eval.n_samples for p in todo)
    for p in {p.cfg.data.name: p for p in sorted(todo, key=lambda p: p.cfg.eval.n_samples)}.values():
        x_real = real_images(p.cfg, p.cfg.eval.n_samples)  # per dataset, the largest count; unless cached
        images += 0 if stats_path(p.cfg, final, fe_id, x_real).is_file() else len(x_real)
    return per_image * images


def _metrics(p: Plan, run_id: str) -> dict[str, float]:
    from gancore.tracking import open_run_info

    return open_run_info(run_id, p.cfg.track.uri)["metrics"]
