"""Reading runs back (for `jobs/runs.py`, and a metric's history for gancore.experiments): an experiment's runs with key params, headline statistics and best FID;
two runs compared (`--compare A B`: the params that differ, every metric's last value side by side).

Which statistics a row shows is its family's `headline` (GAN: Loss/D, Loss/G; VAE: Loss/total, Loss/recon,
Loss/kl; ...), looked up from the run's `family` param, so the table needs no change when a family is added.
"""

from __future__ import annotations

from typing import Any

from gancore.errors import TrackingError
from gancore.tracking.store import existing_client, get_run, store_errors

ALWAYS_PARAMS = ("family", "model.arch")  # what a run is; shown for every run with --columns all
MAX_VARIED_PARAMS = 6  # params that differ between the listed runs, shown after those (more do not fit a terminal)
ALL_COLUMNS = "all"  # --columns all: ALWAYS_PARAMS and the varied params, as well as the default columns


def _headline(family: str | None) -> tuple[str, ...]:
    """The family's headline statistics; none for a run without a family param or of a family unknown here."""
    from gancore.registry import FAMILIES

    return FAMILIES[family].headline if family and family in FAMILIES else ()


def protocol_of(run: Any, metric: str) -> str | None:
    """The protocol tag (JSON) of a sample-quality metric of `run` (fid_lenet_10k -> gancore.protocol.lenet_10k)."""
    from gancore.metrics.fidelity import MetricKey

    key = MetricKey.find(metric)
    return run.data.tags.get(key.protocol_key) if key is not None else None


def same_protocol(a: Any, b: Any, metric: str) -> bool:
    """Whether two runs' values of `metric` may share a column (runs without a stamp, older ones, are not split)."""
    pa, pb = protocol_of(a, metric), protocol_of(b, metric)
    return pa is None or pb is None or pa == pb


def _best_fid(client: Any, run: Any) -> tuple[str, float] | None:
    """(key, value) of the lowest value any fid_* metric of the run reached, or None without one."""
    from gancore.metrics.fidelity import MetricKey

    best = None
    fids = [k for k in run.data.metrics if (m := MetricKey.find(k)) is not None and m.metric == "fid" and not m.best]
    for key in fids:
        value = min(m.value for m in client.get_metric_history(run.info.run_id, key))
        if best is None or value < best[1]:
            best = (key, value)
    return best


def _trained(client: Any, run: Any) -> tuple[int, float] | None:
    """(last logged step, its epoch) of a run: how far it trained (the loop logs `epoch` with every statistics read)."""
    if "epoch" not in run.data.metrics:
        return None
    last = max(client.get_metric_history(run.info.run_id, "epoch"), key=lambda m: m.step)
    return last.step, last.value


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """Every (step, value) of metric `key` in run `run_id`, by step ([] when the run has no such metric)."""
    client, uri = existing_client(uri)
    with store_errors(uri):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def budget(params: dict[str, str], trained: tuple[int, float] | None) -> str:
    """The budget as it was set (train.max_steps, else train.epochs) and, short of it, how much was trained:
    "500 steps", "12/500 steps", "3 epochs", "1.5/3 epochs"."""
    steps, epochs = params.get("train.max_steps"), params.get("train.epochs")
    if steps not in (None, "0"):
        done = f"{trained[0]}/" if trained and trained[0] < int(steps) else ""
        return f"{done}{steps} steps"
    if epochs is None:
        return "-"
    done = f"{trained[1]:.3g}/" if trained and trained[1] < float(epochs) - 1e-9 else ""
    return f"{done}{epochs} epoch{'' if epochs == '1' and not done else 's'}"


def list_runs(experiment: str = "gancore", sort: str | None = None, limit: int = 20, uri: str | None = None) -> list[dict[str, Any]]:
    """Rows for the runs table: newest first, or by metric `sort` ascending (`-NAME`: descending).

    Each row: run_id, name, status, params (all of them), headline ({statistic: last value} of the run's family),
    best_fid ((key, value) or None), budget (`budget`), metrics (every last value) and sort_value.
    """
    client, uri = existing_client(uri)
    with store_errors(uri):
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise TrackingError(f"no experiment {experiment!r} in {uri}; known: {known}")
        order = ["attributes.start_time DESC"]
        if sort:
            name, direction = (sort[1:], "DESC") if sort.startswith("-") else (sort, "ASC")
            order = [f"metrics.`{name}` {direction}"]
        runs = client.search_runs([exp.experiment_id], order_by=order, max_results=limit)
        return [
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "params": dict(run.data.params),
                "headline": {k: run.data.metrics.get(k) for k in _headline(run.data.params.get("family"))},
                "best_fid": (best := _best_fid(client, run)),
                "protocol": protocol_of(run, best[0]) if best else None,
                "sort_value": run.data.metrics.get(sort.lstrip("-")) if sort else None,
                "budget": budget(run.data.params, _trained(client, run)),
                "metrics": dict(run.data.metrics),
            }
            for run in runs
        ]


def _param_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The params the table shows: what each run is, then (some of) those that differ between the listed runs."""
    keys = dict.fromkeys(k for r in rows for k in r["params"] if k not in ALWAYS_PARAMS)  # first-seen order
    varied = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    return [*ALWAYS_PARAMS, *varied[:MAX_VARIED_PARAMS]]


def runs_table(experiment: str = "gancore", sort: str | None = None, limit: int = 20, uri: str | None = None,
               columns: tuple[str, ...] = ()) -> Any:
    """A rich Table of an experiment's runs that fits 80 columns: id, name, status, the budget trained, the last
    headline statistics of each run's family and the best FID. `columns`: more, each a param key or a metric name
    (its last value), or ALL_COLUMNS for what each run is and the params that differ between the listed runs."""
    from rich import box
    from rich.table import Table

    rows = list_runs(experiment, sort, limit, uri)
    params = _param_columns(rows) if ALL_COLUMNS in columns else []
    metric_cols = []
    for c in columns:
        if c == ALL_COLUMNS or c in params:
            continue
        if any(c in r["params"] for r in rows):
            params.append(c)
        elif any(c in r["metrics"] for r in rows):
            metric_cols.append(c)
        else:
            known = sorted({k for r in rows for k in r["params"]}) if rows else []
            raise TrackingError(f"--columns {c}: no listed run has a param or metric {c!r}; use a param key (e.g. "
                                f"{', '.join(known[:3]) or 'optim.lr_g'}), a metric name or {ALL_COLUMNS}")
    stats = list(dict.fromkeys(k for r in rows for k in r["headline"]))  # union over families, first-seen order
    sort_key = sort.lstrip("-") if sort else None
    extra = [k for k in ([sort_key] if sort_key else []) + metric_cols if k not in stats]
    extra = list(dict.fromkeys(extra))
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    fid_keys = {r["best_fid"][0] for r in rows if r["best_fid"]}
    one_key = next(iter(fid_keys)) if len(fid_keys) == 1 else None  # one key: named once, in the header
    # one space between columns; a cell too long for the terminal wraps onto a second line instead of ending in "…"
    table = Table(title=f"MLflow experiment {experiment!r} ({len(rows)} runs)", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in ("run", "name", "status", "budget", *params):
        table.add_column(col, overflow="fold")
    short = lambda k: k.split("/")[-1] if k.startswith("Loss/") else k  # noqa: E731  (Loss/D -> D, as the bar does)
    for col in (*(short(k) for k in stats), f"best {one_key or 'fid_*'}", *extra):
        table.add_column(col, justify="right", overflow="fold")
    # the best-FID cells name their key; where one key was measured under several protocols, each gets a marker
    protocols: dict[str, list[str]] = {}
    for r in rows:
        if r["best_fid"] and r["protocol"]:
            seen = protocols.setdefault(r["best_fid"][0], [])
            if r["protocol"] not in seen:
                seen.append(r["protocol"])
    for r in rows:
        best = "-"
        if r["best_fid"]:
            best = f"{r['best_fid'][1]:.4g}" + ("" if one_key else f" ({r['best_fid'][0]})")
        if r["best_fid"] and len(protocols.get(r["best_fid"][0], [])) > 1:
            best += f" [protocol {protocols[r['best_fid'][0]].index(r['protocol']) + 1}]"
        cells = [r["run_id"][:8], r["name"] or "", r["status"], r["budget"], *(r["params"].get(k) or "-" for k in params)]
        cells += [fmt(r["headline"].get(k)) for k in stats] + [best] + [fmt(r["metrics"].get(k)) for k in extra]
        table.add_row(*cells)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Two runs side by side (the UI's "Compare")


def compare_runs(run_a: str, run_b: str, uri: str | None = None) -> dict[str, Any]:
    """What differs between two runs: {"runs": (info A, info B), "params": {key: (A, B)} for params whose values
    differ (None: the run lacks it), "metrics": {key: (last A, last B)} for every metric either run has}."""
    client, uri = existing_client(uri)
    runs = [get_run(client, r, uri, f"no MLflow run {r!r} in {uri}; list runs with: python jobs/runs.py --uri {uri}",
                    prefix=True) for r in (run_a, run_b)]
    pa, pb = (dict(r.data.params) for r in runs)
    ma, mb = (dict(r.data.metrics) for r in runs)
    params = {k: (pa.get(k), pb.get(k)) for k in sorted(pa.keys() | pb.keys()) if pa.get(k) != pb.get(k)}
    metrics = {}
    for k in sorted(ma.keys() | mb.keys()):
        if same_protocol(runs[0], runs[1], k):
            metrics[k] = (ma.get(k), mb.get(k))
        else:  # measured differently: never one row (gancore.metrics.protocol)
            metrics[f"{k} (A's protocol)"], metrics[f"{k} (B's protocol)"] = (ma.get(k), None), (None, mb.get(k))
    info = tuple({"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status} for r in runs)
    return {"runs": info, "params": params, "metrics": metrics}


def compare_table(run_a: str, run_b: str, uri: str | None = None) -> Any:
    """A rich Table: the params that differ, then every metric's last value, for run A and run B side by side."""
    from rich.table import Table

    c = compare_runs(run_a, run_b, uri)
    a, b = c["runs"]
    table = Table(title=f"{a['run_id'][:8]} vs {b['run_id'][:8]}: {len(c['params'])} params differ")
    table.add_column("")
    for r in (a, b):
        table.add_column(f"{r['run_id'][:8]} {r['name'] or ''}".strip(), justify="right")
    table.add_row("status", a["status"], b["status"], end_section=True)
    for k, (va, vb) in c["params"].items():
        table.add_row(k, "-" if va is None else va, "-" if vb is None else vb)
    if not c["params"]:
        table.add_row("(params)", "same", "same")
    table.rows[-1].end_section = True
    fmt = lambda v: "-" if v is None else f"{v:.6g}"
    for k, (va, vb) in c["metrics"].items():
        table.add_row(k, fmt(va), fmt(vb))
    return table
