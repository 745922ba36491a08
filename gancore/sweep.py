"""Hyper-parameter sweeps: an Optuna study whose trials are gancore training runs (issue #7).

    sweeps/x.yaml --load_sweep--> Sweep (base config + search space + objective + budget + sampler/pruner/storage)
    run_sweep:  prepare (study, parent MLflow run, stale trials, metric caches)
                -> N workers (local processes or Slurm array tasks), each `study.optimize` on the shared storage
                -> report (rich table, best.yaml, Optuna figures on the parent run)
    a trial:    trial params -> config -> trainer.fit(out=<sweep dir>/trial_NNNN, on_eval=report and prune)
                -> the objective metric (an fid_* name) of the last evaluation, minimised

Storage: sqlite (default, one file under the sweep dir), `journal:PATH` (Optuna's journal file; what to use on NFS
without a database server) or an RDB URL such as postgresql://... . Workers coordinate only through the storage.

Interrupted trials are never lost and never counted twice. A trial whose worker was stopped (SIGTERM / SIGUSR1 /
Ctrl-C: the trainer writes a checkpoint) or killed is marked FAIL with `gancore.interrupted` and re-queued once as a
WAITING copy with the same params (Optuna's RetryHeartbeatStaleTrialCallback); the copy resumes training from the
interrupted trial's last checkpoint in the same MLflow child run. Killed workers are found by the next coordinator
on the same host (dead pid) and, on RDB storage, by Optuna's heartbeat (any host, after `grace_period`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gancore.config import Config, all_keys, flat, load_config, read_mapping, replace, save_yaml
from gancore.errors import ConfigError, GancoreError, NonFiniteLossError

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # like jobs/train.py: stopped by a signal, state kept; running the sweep again continues it
DEFAULT_OUT = "runs/sweeps"  # sweep dirs: <out>/<study>/{trial_NNNN/, optuna.db, best.yaml, figures/}
PARENT_ATTR = "gancore.mlflow_parent_run_id"  # study user attr: the sweep's parent MLflow run
DEFINITION_ATTR = "gancore.definition"  # study user attr: what a resumed sweep must not change
STATES_COUNTED = ("COMPLETE", "PRUNED", "FAIL")  # finished trials that use the budget (unless re-queued)
RDB_PREFIXES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# Config keys whose values name a registry entry: checked when the sweep file is read, not in the middle of a sweep.
REGISTRY_KEYS = {"family": "FAMILIES", "model.arch": "MODELS", "loss.name": "LOSSES", "data.name": "DATASETS"}


class SweepError(GancoreError):
    """A bad sweep file, an unusable study storage or a sweep that cannot go on."""


class TrialInterrupted(Exception):
    """A trial stopped by a signal (its checkpoint is kept); the worker re-queues it and exits."""

    def __init__(self, number: int, reason: str, original: BaseException | None = None, signum: int | None = None):
        super().__init__(f"trial {number} interrupted ({reason})")
        self.number, self.reason, self.original, self.signum = number, reason, original, signum


# ----------------------------------------------------------------------------------------------------------------
# The sweep file


@dataclass(frozen=True)
class Param:
    """One search-space dimension: an Optuna parameter whose value goes to one or more config keys."""

    name: str  # Optuna's parameter name (also an MLflow param of each trial: optuna.<name>)
    keys: tuple[str, ...]  # config keys that receive the value (lr -> optim.lr_g and optim.lr_d)
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} {self.kind} [{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (see sweeps/README.md for the format)."""

    study: str  # Optuna study name: the same name on the same storage continues the study
    path: Path | None  # the sweep file
    base: Config  # preset + overrides; every trial is this with the trial's params applied
    space: tuple[Param, ...]
    objective: str  # fid_* metric the trainer reports, minimised
    n_trials: int | None  # total trials of the study (earlier runs count), COMPLETE + PRUNED + FAIL
    timeout_s: float | None  # wall time of each run of the sweep (per worker)
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None  # None -> sqlite:///<sweep dir>/optuna.db
    heartbeat_interval: int = 60  # RDB only: seconds between a running trial's heartbeats
    grace_period: int = 300  # RDB only: a trial without heartbeat for this long is failed and re-queued
    max_retry: int = 3  # re-queues of an interrupted trial (then it stays FAIL and counts)
    out: Path = Path(DEFAULT_OUT)
    workers: int | str = "auto"  # default for --workers: a number, or auto (the measured best per device)
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.out / self.study

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.dir / 'optuna.db'}"


# allowed keys per section: name -> (types, default); a type of None = any YAML value
_TOP = {"study", "base", "overrides", "objective", "space", "budget", "sampler", "pruner", "storage", "out",
        "workers", "slurm"}
_BUDGET = {"n_trials": (int, None), "timeout_s": ((int, float), None)}
_SAMPLER = {"name": (str, "tpe"), "seed": (int, 0), "n_startup_trials": (int, 10), "multivariate": (bool, True),
            "constant_liar": (bool, True)}
_PRUNER = {"name": (str, "median"), "n_startup_trials": (int, 5), "n_warmup_steps": (int, 0),
           "interval_steps": (int, 1), "min_resource": (int, None), "reduction_factor": (int, 3)}
_STORAGE = {"url": (str, None), "heartbeat_interval": (int, 60), "grace_period": (int, 300), "max_retry": (int, 3)}
# per worker job, in gancore.launch.Resources' spelling (jobs/submit.py takes the same)
_SLURM = {"gpus": (int, 0), "cpus": (int, 4), "mem": ((str, int), "16G"), "time": ((str, int), "4:00:00"),
          "partition": (str, None), "account": (str, None), "qos": (str, None), "array_parallelism": (int, None)}
_PARAM = {"type", "low", "high", "log", "step", "choices", "keys"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


def _unknown_key(where: str, key: str, known: set[str] | dict) -> SweepError:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(known))}"
    return SweepError(f"{where}: unknown key '{key}'; {hint}")


def _section(d: Any, schema: dict[str, tuple], where: str) -> dict[str, Any]:
    """A mapping checked against `schema` (unknown keys, types), with defaults filled in."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise SweepError(f"{where}: expected a mapping, got {d!r}")
    out = {}
    for k, v in d.items():
        if k not in schema:
            raise _unknown_key(where, k, schema)
        types = schema[k][0] if isinstance(schema[k][0], tuple) else (schema[k][0],)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
            raise SweepError(f"{where}.{k}: expected {' or '.join(t.__name__ for t in types)}, got {v!r}")
        out[k] = v
    return {k: out.get(k, default) for k, (_, default) in schema.items()}


def _number(v: Any, where: str) -> float:
    if isinstance(v, str):  # YAML reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SweepError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _param(name: str, d: Any, base: Config, where: str) -> Param:
    """One validated search-space entry; every value it can take must make a valid config."""
    if not isinstance(d, dict):
        raise SweepError(f"{where}: expected a mapping like {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
    for k in d:
        if k not in _PARAM:
            raise _unknown_key(where, k, _PARAM)
    keys = d.get("keys", [name])
    keys = tuple([keys] if isinstance(keys, str) else keys)
    known, hyper = all_keys(), set(flat(base))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            raise SweepError(f"{where}: '{key}' is not a config key" + (f"; did you mean '{close[0]}'?" if close else
                                                                        " (give `keys: [...]` for a named parameter)"))
        if key not in hyper:
            raise SweepError(f"{where}: '{key}' is infrastructure (it does not change the result); search "
                             "hyper-parameters only")
    kind = d.get("type")
    if kind not in ("float", "int", "categorical"):
        raise SweepError(f"{where}.type: {kind!r} is not one of float, int, categorical")
    if kind == "categorical":
        choices = d.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{where}.choices: expected a non-empty list")
        if any(k in d for k in ("low", "high", "log", "step")):
            raise SweepError(f"{where}: a categorical parameter takes `choices` only")
        p = Param(name, keys, kind, choices=tuple(choices))
        values = list(choices)
    else:
        if "choices" in d:
            raise SweepError(f"{where}: `choices` is for type categorical")
        for k in ("low", "high"):
            if k not in d:
                raise SweepError(f"{where}: {kind} parameter needs `{k}`")
        low, high = _number(d["low"], f"{where}.low"), _number(d["high"], f"{where}.high")
        step = _number(d["step"], f"{where}.step") if d.get("step") is not None else None
        use_log = d.get("log", False)
        if not isinstance(use_log, bool):
            raise SweepError(f"{where}.log: expected true/false, got {use_log!r}")
        if not low < high:
            raise SweepError(f"{where}: low ({low:g}) must be below high ({high:g})")
        if use_log and (low <= 0 or step is not None):
            raise SweepError(f"{where}: log scale needs low > 0 and no step")
        if kind == "int" and not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
            raise SweepError(f"{where}: int parameter needs integer low/high/step")
        p = Param(name, keys, kind, low, high, use_log, step)
        values = [int(low), int(high)] if kind == "int" else [low, high]
    for key in keys:
        for v in values:
            try:
                replace(base, **{key: v})
            except ConfigError as e:
                raise SweepError(f"{where}: value {v!r} does not fit {key} ({e})") from None
        if key in REGISTRY_KEYS:
            from gancore import registry

            reg = getattr(registry, REGISTRY_KEYS[key])
            bad = [v for v in values if v not in reg]
            if bad:
                raise SweepError(f"{where}: unknown {reg.kind} {bad[0]!r}; known: {', '.join(reg.names())}")
    return p


def load_sweep(path: str | Path, *, storage: str | None = None, n_trials: int | None = None,
               timeout_s: float | None = None, out: str | Path | None = None) -> Sweep:
    """Read and strictly validate a sweep file; keyword arguments override the file (CLI flags)."""
    path = Path(path)
    d = read_mapping(path, SweepError, "sweep file", "sweeps live in sweeps/",
                     "a mapping (study, base, objective, space, budget, ...)")
    for k in d:
        if k not in _TOP:
            raise _unknown_key(str(path), k, _TOP)
    for k in ("study", "base", "objective", "space"):
        if k not in d:
            raise SweepError(f"{path}: missing key '{k}'")
    study = d["study"]
    if not isinstance(study, str) or not study or "/" in study:
        raise SweepError(f"{path}: study: expected a name without '/', got {study!r}")

    # base preset (relative to the sweep file) + overrides (dotted keys, applied to every trial)
    base_path = (path.parent / str(d["base"])).resolve()
    overrides = d.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: overrides: expected a mapping of dotted config keys, e.g. train.max_steps: 500")
    try:
        base = replace(load_config(base_path), **{**{str(k): v for k, v in overrides.items()}, "name": study})
    except ConfigError as e:
        raise SweepError(f"{path}: {e}") from None

    space_d = d["space"]
    if not isinstance(space_d, dict) or not space_d:
        raise SweepError(f"{path}: space: expected a mapping of parameters, "
                         "e.g. optim.d_iters: {type: int, low: 1, high: 3}")
    space = tuple(_param(str(name), spec, base, f"{path}: space.{name}") for name, spec in space_d.items())
    seen: dict[str, str] = {}
    for p in space:
        for key in p.keys:
            if key in seen:
                raise SweepError(f"{path}: space: {key} is set by both '{seen[key]}' and '{p.name}'")
            seen[key] = p.name

    objective = d["objective"]
    if not isinstance(objective, str) or not objective.startswith("fid_"):
        raise SweepError(f"{path}: objective: expected an fid_* metric name (minimised), e.g. fid_lenet_10k; "
                         f"got {objective!r}")
    if base.eval.n_samples <= 0:
        raise SweepError(f"{path}: the objective needs sample-quality evaluations: set eval.n_samples in overrides")

    budget = _section(d.get("budget"), _BUDGET, f"{path}: budget")
    n_trials = n_trials if n_trials is not None else budget["n_trials"]
    timeout_s = timeout_s if timeout_s is not None else budget["timeout_s"]
    if n_trials is None and timeout_s is None:
        raise SweepError(f"{path}: budget: give n_trials and/or timeout_s")
    if n_trials is not None and n_trials < 1 or timeout_s is not None and timeout_s <= 0:
        raise SweepError(f"{path}: budget: n_trials and timeout_s must be positive")

    sampler = _section(d.get("sampler"), _SAMPLER, f"{path}: sampler")
    if sampler["name"] not in SAMPLERS:
        raise SweepError(f"{path}: sampler.name: {sampler['name']!r} is not one of {', '.join(SAMPLERS)}")
    pruner = _section(d.get("pruner"), _PRUNER, f"{path}: pruner")
    if pruner["name"] not in PRUNERS:
        raise SweepError(f"{path}: pruner.name: {pruner['name']!r} is not one of {', '.join(PRUNERS)}")
    if pruner["name"] != "none" and base.eval.every <= 0:
        raise SweepError(f"{path}: pruner {pruner['name']} needs intermediate FIDs: set eval.every > 0 in overrides "
                         "(or pruner: {name: none})")

    st = d.get("storage")
    st = _section({"url": st} if isinstance(st, str) else st, _STORAGE, f"{path}: storage")
    workers = d.get("workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"{path}: workers: expected a positive integer or auto, got {workers!r}")
    slurm = _section(d.get("slurm"), _SLURM, f"{path}: slurm")
    if slurm["gpus"] not in (0, 1):
        raise SweepError(f"{path}: slurm.gpus: a sweep worker trains one trial at a time on 0 or 1 GPU; "
                         "use more workers for more GPUs")
    out_dir = Path(out if out is not None else d.get("out") or DEFAULT_OUT).expanduser().resolve()
    return Sweep(study=study, path=path.resolve(), base=base, space=space, objective=objective,
                 n_trials=n_trials, timeout_s=float(timeout_s) if timeout_s else None, sampler=sampler,
                 pruner=pruner, storage=storage or st["url"], heartbeat_interval=st["heartbeat_interval"],
                 grace_period=st["grace_period"], max_retry=st["max_retry"], out=out_dir, workers=workers,
                 slurm=slurm)


def trial_config(sweep: Sweep, params: dict[str, Any], number: int | None = None) -> Config:
    """The full config of trial `number` (None: the best trial's preset, best.yaml): the sweep's base with each
    parameter's value on its config keys."""
    values = {key: params[p.name] for p in sweep.space for key in p.keys}
    if number is None:
        return replace(sweep.base, name=f"{sweep.study}-best", **values)
    # parallel workers share a terminal: one line per trial instead of progress bars
    return replace(sweep.base, name=f"{sweep.study}-trial{number:04d}", **{**values, "train.progress": False})


def definition(sweep: Sweep) -> dict[str, Any]:
    """What makes trials of one study comparable: hyper-parameters, evaluation protocol, space, objective."""
    protocol = {k: v for k, v in flat(sweep.base, include_infra=True).items() if k.startswith("eval.")}
    return {"base": {**flat(sweep.base), **protocol}, "objective": sweep.objective,
            "space": {p.name: dataclasses.asdict(p) for p in sweep.space}}


# ----------------------------------------------------------------------------------------------------------------
# Storage


def describe_url(url: str) -> str:
    """The storage URL without its password (for messages, tags and params)."""
    if url.startswith("journal:"):
        return url
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def open_storage(url: str, sweep: Sweep | None = None) -> Any:
    """An Optuna storage for `url`; an unreachable one is a one-line SweepError within seconds.

    sqlite / postgresql / mysql: RDBStorage with heartbeats (a dead worker's trial is failed and re-queued after
    `grace_period`). `journal:PATH`: JournalStorage on a journal file (no heartbeat: see module docstring).
    """
    import optuna

    shown = describe_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise SweepError(f"cannot use journal storage {path} ({e.strerror or e}); check the path") from None
    if url.split(":", 1)[0].split("+", 1)[0] not in RDB_PREFIXES:
        raise SweepError(f"storage {shown!r}: expected sqlite:///PATH, journal:PATH or a database URL "
                         "such as postgresql://user:pass@host:5432/db")
    engine: dict[str, Any] = {"pool_pre_ping": True}  # trials last hours: servers drop idle connections
    if url.startswith("sqlite"):
        db = url.split("///", 1)[-1].split("?", 1)[0]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # several workers write one file: wait for the lock; isolation_level None + BEGIN IMMEDIATE below: see
        # _serialise_sqlite
        engine["connect_args"] = {"timeout": 60, "isolation_level": None}
    elif url.startswith(("postgresql", "mysql")):
        engine["connect_args"] = {"connect_timeout": 5}  # unreachable host: fail in seconds, not minutes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if sweep is not None:
                kwargs = dict(heartbeat_interval=sweep.heartbeat_interval, grace_period=sweep.grace_period,
                              heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                                  sweep.max_retry, inherit_intermediate_values=True))
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            if url.startswith("sqlite"):
                _serialise_sqlite(storage.engine)
            return storage
    except ImportError as e:  # Optuna wraps the driver's ModuleNotFoundError
        name = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or "?"
        driver = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL",
                  "MySQLdb": "mysqlclient"}.get(name, name)
        raise SweepError(f"storage {shown}: database driver {name!r} is not installed; pip install {driver}") from None
    except Exception as e:  # sqlalchemy OperationalError / ArgumentError: one line, not a traceback
        msg = " ".join(str(getattr(e, "orig", None) or e).split())[:240]
        raise SweepError(f"cannot open study storage {shown} ({msg}); start the database or fix --storage") from None


def _serialise_sqlite(engine: Any) -> None:
    """Every transaction on the SQLite study file starts with BEGIN IMMEDIATE (the write lock).

    Python's sqlite3 driver opens a transaction only at the first write, so Optuna's pop of a WAITING trial (read
    the state, then set RUNNING) ran its read outside any transaction: two workers could both read WAITING, both
    set RUNNING and train the same re-queued trial, and the second one's tell failed ("Cannot tell a COMPLETE
    trial"). Holding the write lock from the read on makes the pop atomic; a few workers wait milliseconds."""
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sampler(sweep: Sweep, stream: int) -> Any:
    """The sampler of one worker. Workers (and later runs of the sweep) get distinct seeds, so their random
    start-up trials differ; a fresh sweep with the same workers draws the same start-up params."""
    import optuna

    s = sweep.sampler
    seed = None if s["seed"] is None else (s["seed"] * 1_000_003 + stream) % 2**31
    if s["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s["n_startup_trials"],
                                          multivariate=s["multivariate"], constant_liar=s["constant_liar"])


def _pruner(sweep: Sweep) -> Any:
    """Median or Hyperband over the intermediate objective, reported every eval.every steps in every trial."""
    import optuna

    p = sweep.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["n_startup_trials"],
                                           n_warmup_steps=p["n_warmup_steps"], interval_steps=p["interval_steps"])
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p["min_resource"] or sweep.base.eval.every,
                                              max_resource="auto", reduction_factor=p["reduction_factor"])
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, storage: Any, stream: int = 0, create: bool = False) -> Any:
    """The sweep's study on `storage` (created when `create`), with this worker's sampler and the pruner."""
    import optuna

    try:
        if create:
            return optuna.create_study(study_name=sweep.study, storage=storage, direction="minimize",
                                       sampler=_sampler(sweep, stream), pruner=_pruner(sweep), load_if_exists=True)
        return optuna.load_study(study_name=sweep.study, storage=storage, sampler=_sampler(sweep, stream),
                                 pruner=_pruner(sweep))
    except KeyError:
        raise SweepError(f"no study {sweep.study!r} in {describe_url(sweep.storage_url)}; start the sweep with "
                         "`python jobs/sweep.py SWEEP.yaml` (or --prepare) first") from None
    except ValueError as e:  # e.g. a resumed study created for another direction
        raise SweepError(f"study {sweep.study!r}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Budget, interrupted trials


def _state(t: Any) -> str:
    return t.state.name


def retried_numbers(trials: list[Any]) -> set[int]:
    """Trials that were re-queued (a later trial's retry history names them): they do not use the budget."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_used(trials: list[Any]) -> dict[str, int]:
    """{"finished": COMPLETE + PRUNED + FAIL (re-queued ones excluded), "running": ..., "waiting": ...}."""
    retried = retried_numbers(trials)
    finished = sum(1 for t in trials if _state(t) in STATES_COUNTED and t.number not in retried)
    return {"finished": finished, "running": sum(_state(t) == "RUNNING" for t in trials),
            "waiting": sum(_state(t) == "WAITING" for t in trials)}


def trials_left(study: Any, n_trials: int | None) -> int | None:
    """Trials still to start (WAITING re-queued ones included); None = no trial budget (timeout only)."""
    if n_trials is None:
        return None
    u = budget_used(study.get_trials(deepcopy=False))
    return max(u["waiting"], n_trials - u["finished"] - u["running"])


class Budget:
    """Stop a worker when the study's trials (all workers, earlier runs) use `n_trials`.

    Optuna's MaxTrialsCallback counts trial states only: an interrupted trial (FAIL) and its re-queued copy would
    count twice, and RUNNING trials of other workers not at all (N workers overshoot by up to N-1); this counts
    both right. Checked after every trial and before a worker's first.
    """

    def __init__(self, n_trials: int | None):
        self.n_trials = n_trials

    def exhausted(self, study: Any) -> bool:
        left = trials_left(study, self.n_trials)
        return left is not None and left <= 0

    def __call__(self, study: Any, trial: Any) -> None:
        if self.exhausted(study):
            study.stop()


def worker_id() -> str:
    """host:pid:start-time of this process (the start time tells a live worker from a reused pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state first); [] where there is no /proc."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return []


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else "?"


def _dead_here(worker: str | None) -> bool:
    """True when `worker` (worker_id()) ran on this host and that process is gone."""
    if not worker or worker.count(":") < 2:
        return False
    host, pid, started = worker.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = _stat(int(pid))  # a zombie (not yet reaped by PID 1) or a reused pid is dead too
    return bool(fields) and (fields[0] in ("Z", "X") or (started != "?" and fields[19] != started))


def requeue(study: Any, number: int, sweep: Sweep, reason: str) -> bool:
    """Mark trial `number` FAIL (interrupted: `reason`) and queue a WAITING copy with its params, once.

    The copy inherits the intermediate values and user attrs (so it knows the interrupted trial's run dir and
    resumes from its checkpoint). Returns False when the trial had already finished (another process won)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage  # Optuna exposes no public "fail this trial" outside tell(); its own stale-trial
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)  # code does the same
    frozen = storage.get_trial(trial_id)
    if frozen.state == TrialState.RUNNING:
        try:
            storage.set_trial_user_attr(trial_id, "gancore.interrupted", reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
    elif (frozen.state != TrialState.FAIL or not frozen.user_attrs.get("gancore.interrupted")
          or number in retried_numbers(study.get_trials(deepcopy=False))):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(sweep.max_retry, inherit_intermediate_values=True)
        retry(study, storage.get_trial(trial_id))
    return True


def recover_stale(study: Any, sweep: Sweep) -> list[int]:
    """Re-queue trials left RUNNING by workers that died on this host, and interrupted FAIL trials not yet
    re-queued. Trials of live workers and of other hosts are left alone (RDB heartbeats cover other hosts)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    done = []
    for t in trials:
        stale = _state(t) == "RUNNING" and _dead_here(t.user_attrs.get("gancore.worker"))
        unqueued = _state(t) == "FAIL" and t.user_attrs.get("gancore.interrupted") and t.number not in retried
        if stale or unqueued:
            reason = t.user_attrs.get("gancore.interrupted") or f"worker {t.user_attrs['gancore.worker']} died"
            if requeue(study, t.number, sweep, reason):
                done.append(t.number)
                _close_child_runs(sweep, t, study.user_attrs.get(PARENT_ATTR))
    return done


# ----------------------------------------------------------------------------------------------------------------
# MLflow: the parent run per sweep, child runs per trial


def _tracked(sweep: Sweep) -> bool:
    return sweep.base.track.enabled


def _mlflow(sweep: Sweep) -> tuple[Any, str]:
    from gancore.tracking import open_store

    return open_store(sweep.base.track.uri, sweep.base.track.experiment)


def parent_run(sweep: Sweep, study: Any) -> str | None:
    """The sweep's parent MLflow run: created once, its id kept as a study attr so a resumed sweep reuses it."""
    if not _tracked(sweep):
        return None
    from mlflow.entities import Param

    from gancore.tracking import run_tags

    client, exp_id = _mlflow(sweep)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="RUNNING")
            return run_id
    space = "; ".join(p.describe() for p in sweep.space)
    note = f"Optuna sweep {sweep.study}: minimise {sweep.objective} over {space}"
    tags = {**run_tags(sweep.base, sweep.dir), "gancore.sweep": "parent", "optuna.study": sweep.study,
            "optuna.storage": describe_url(sweep.storage_url), "mlflow.note.content": note}
    run = client.create_run(exp_id, run_name=f"sweep-{sweep.study}", tags=tags)
    params = {"sweep.objective": sweep.objective, "sweep.sampler": json.dumps(sweep.sampler),
              "sweep.pruner": json.dumps(sweep.pruner), "sweep.file": str(sweep.path),
              **{f"space.{p.name}": p.describe() for p in sweep.space}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    if sweep.path is not None:
        client.log_artifact(run.info.run_id, str(sweep.path))
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


class ChildRun:
    """Tags the trainer's MLflow run of one trial as a child of the sweep's parent run.

    The trainer creates the run inside fit(); it is found by its gancore.run_dir tag on the first evaluation (and
    when fit returns or raises); fit(tags=...) already nests it from its start.
    """

    def __init__(self, sweep: Sweep, parent_id: str | None, trial: Any, run_dir: Path, params: dict[str, Any]):
        self.sweep, self.parent_id, self.trial, self.run_dir, self.params = sweep, parent_id, trial, run_dir, params
        self.run_id: str | None = None
        self.client: Any = None

    def attach(self) -> str | None:
        if self.run_id is not None or self.parent_id is None:
            return self.run_id
        from mlflow.entities import Param, RunTag

        try:
            self.client, exp_id = _mlflow(self.sweep)
            run = _find_run(self.client, exp_id, self.run_dir)
            if run is None:
                return None
            self.run_id = run.info.run_id
            existing = run.data.params
            tags = {"mlflow.parentRunId": self.parent_id, "optuna.study": self.sweep.study,
                    "optuna.trial": str(self.trial.number), "optuna.state": "RUNNING", "gancore.sweep": "trial"}
            params = [Param(f"optuna.{k}", str(v)) for k, v in self.params.items() if f"optuna.{k}" not in existing]
            self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(self.run_id, name=f"{self.sweep.study}-trial{self.trial.number:04d}")  # a re-run
            self.trial.set_user_attr("mlflow.run_id", self.run_id)  # continues the interrupted trial's run
        except Exception as e:  # tracking trouble must not fail a trial (its checkpoints are on disk)
            log.warning("sweep: MLflow run of trial %s not tagged: %s", self.trial.number, e)
        return self.run_id

    def finish(self, state: str, value: float | None = None) -> None:
        """Tag the final Optuna state; pruned and interrupted runs end KILLED (the trainer says FAILED)."""
        if self.attach() is None:
            return
        with contextlib.suppress(Exception):
            tags = {"optuna.state": state, **({"optuna.value": repr(value)} if value is not None else {})}
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
            if state in ("PRUNED", "INTERRUPTED"):
                self.client.set_terminated(self.run_id, "KILLED")


def _find_run(client: Any, exp_id: str, run_dir: str | Path) -> Any | None:
    """The newest MLflow run the trainer made for `run_dir` (its gancore.run_dir tag), or None."""
    path = str(Path(run_dir).resolve()).replace("'", "\\'")
    runs = client.search_runs([exp_id], f"tags.`gancore.run_dir` = '{path}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def _close_child_runs(sweep: Sweep, t: Any, parent_id: str | None) -> None:
    """Nest the MLflow run(s) of a killed trial under the parent, tag them INTERRUPTED and end them KILLED (found by
    id and by run dir: the worker may have died before it stored the id, or before its first evaluation)."""
    if not _tracked(sweep):
        return
    with contextlib.suppress(Exception):
        client, exp_id = _mlflow(sweep)
        run_dir = t.user_attrs.get("gancore.run_dir")
        found = _find_run(client, exp_id, run_dir) if run_dir else None
        for run_id in {t.user_attrs.get("mlflow.run_id"), found.info.run_id if found else None} - {None}:
            tags = {"optuna.study": sweep.study, "optuna.trial": str(t.number), "optuna.state": "INTERRUPTED",
                    **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")


# ----------------------------------------------------------------------------------------------------------------
# One trial


class Objective:
    """trial -> config -> fit(on_eval = report + prune) -> the objective metric of the last evaluation."""

    def __init__(self, sweep: Sweep, parent_id: str | None):
        self.sweep, self.parent_id = sweep, parent_id

    def on_eval(self, trial: Any, child: ChildRun) -> Any:
        """The trainer's on_eval hook: report the objective at this step; raise TrialPruned when told to."""
        import optuna

        def report(step: int, metrics: dict[str, float]) -> None:
            child.attach()
            if self.sweep.objective not in metrics:
                raise SweepError(f"objective {self.sweep.objective} is not among the reported metrics "
                                 f"({', '.join(sorted(metrics)) or 'none'}); fix `objective` in the sweep file")
            value = float(metrics[self.sweep.objective])
            trial.report(value, step)
            # the last evaluation ends the trial anyway: it completes with that value (known with max_steps only)
            if step != self.sweep.base.train.max_steps and trial.should_prune():
                raise optuna.TrialPruned(f"{self.sweep.objective} {value:.4g} at step {step}")

        return report

    @staticmethod
    def _interrupted(trial: Any, child: ChildRun, reason: str, original: BaseException | None = None,
                     signum: int | None = None) -> TrialInterrupted:
        trial.set_user_attr("gancore.interrupted", reason)  # now: once Optuna marks it FAIL it is read-only
        child.finish("INTERRUPTED")
        return TrialInterrupted(trial.number, reason, original, signum)

    def __call__(self, trial: Any) -> float:
        import optuna

        from gancore import checkpoint as ckpt
        from gancore.trainer import fit

        trial.set_user_attr("gancore.worker", worker_id())
        # A re-queued copy inherits the interrupted trial's user attrs: continue from the newest checkpoint of that
        # trial's run dir, else of the dir it had itself resumed (interrupted again before its first checkpoint).
        earlier = [trial.user_attrs.get(k) for k in ("gancore.run_dir", "gancore.resumes")]
        resume = next((c for d in earlier if d and (c := ckpt.latest(d)) is not None), None)
        if trial.user_attrs.get("gancore.interrupted"):  # inherited: about the interrupted trial, not this one
            trial.set_user_attr("gancore.interrupted", None)
        if resume is not None:
            trial.set_user_attr("gancore.resumes", str(resume.parent.parent))
        params = {p.name: p.suggest(trial) for p in self.sweep.space}
        cfg = trial_config(self.sweep, params, trial.number)
        run_dir = self.sweep.dir / f"trial_{trial.number:04d}"
        trial.set_user_attr("gancore.run_dir", str(run_dir))
        child = ChildRun(self.sweep, self.parent_id, trial, run_dir, params)
        try:
            nest = {"mlflow.parentRunId": self.parent_id, "optuna.study": self.sweep.study,
                    "optuna.trial": str(trial.number)} if self.parent_id else None
            result = fit(cfg, out=run_dir, resume=str(resume) if resume else None, on_eval=self.on_eval(trial, child),
                         tags=nest)
        except optuna.TrialPruned:
            child.finish("PRUNED")
            raise
        except NonFiniteLossError as e:  # diverged: this trial fails, the study goes on
            trial.set_user_attr("gancore.failure", str(e).split(";")[0])
            child.finish("FAIL")
            raise
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or submitit's requeue on preemption
            raise self._interrupted(trial, child, type(e).__name__, e) from e
        if result.status == "stopped":  # SIGTERM / SIGUSR1: the trainer wrote a checkpoint
            signum = getattr(result, "stop_signal", None)
            how = f" by {signal.Signals(signum).name}" if signum else ""
            raise self._interrupted(trial, child, f"stopped{how} at step {result.step}", signum=signum)
        value = result.metrics.get(self.sweep.objective)
        if value is None and result.steps_run == 0:  # resumed from a final checkpoint: its last report counts
            value = trial.study.get_trials(deepcopy=False)[trial.number].intermediate_values.get(result.step)
        if value is None:
            raise SweepError(f"objective {self.sweep.objective} not reported by trial {trial.number}; "
                             f"got {', '.join(sorted(result.metrics)) or 'no metrics'}")
        value = float(value)
        child.finish("COMPLETE" if math.isfinite(value) else "FAIL", value)
        return value


# ----------------------------------------------------------------------------------------------------------------
# Workers


@dataclass(frozen=True)
class WorkerContext:
    """What a worker process needs (picklable: sent to spawned processes and Slurm jobs)."""

    sweep: Sweep
    parent_id: str | None
    index: int  # worker number in this run of the sweep
    stream: int  # sampler seed stream (distinct per worker and per run of the sweep)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for this worker (local multi-GPU machines)


def _print_trial(study: Any, t: Any) -> None:
    value = f"{t.value:.4g}" if t.value is not None else "-"
    params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    why = t.user_attrs.get("gancore.failure") or t.user_attrs.get("gancore.interrupted") or ""
    secs = f"{t.duration.total_seconds():.0f} s" if t.duration else ""
    print(f"sweep {study.study_name}: trial {t.number} {t.state.name:<8} {value:>9}  {params}  {secs}"
          + (f"  ({why})" if why else ""), flush=True)


def worker(ctx: WorkerContext) -> int:
    """Run trials of the study until its budget is used (or timeout); 0 done, EXIT_STOPPED interrupted."""
    return _work(ctx)[0]


def _work(ctx: WorkerContext) -> tuple[int, int | None]:
    """worker() plus the signal that interrupted it (None when it was not)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial (_print_trial), not tracebacks

    if ctx.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ctx.gpu
    if ctx.threads:
        import torch

        torch.set_num_threads(ctx.threads)
    sweep = ctx.sweep
    study = open_study(sweep, open_storage(sweep.storage_url, sweep), stream=ctx.stream)
    budget = Budget(sweep.n_trials)
    if budget.exhausted(study):
        return 0, None
    catch: tuple[type[Exception], ...] = (NonFiniteLossError,)
    with contextlib.suppress(ImportError, AttributeError):
        import torch

        catch += (torch.OutOfMemoryError,)  # a batch size too big for the GPU fails that trial only
    try:
        study.optimize(Objective(sweep, ctx.parent_id), n_trials=None, timeout=sweep.timeout_s, catch=catch,
                       callbacks=[budget, _print_trial], gc_after_trial=True)
    except TrialInterrupted as e:
        requeue(study, e.number, sweep, e.reason)
        t = study.get_trials(deepcopy=False)[e.number]
        _print_trial(study, t)
        if isinstance(e.original, (KeyboardInterrupt, SystemExit)):
            raise e.original from None
        return EXIT_STOPPED, e.signum
    return 0, None


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the coordinator dies (the trainer then checkpoints and stops)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _local_worker(ctx: WorkerContext) -> None:
    """Entry point of a local worker process: errors as one line, exit code as worker() says."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which sends SIGTERM
    _die_with_parent()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        code = worker(ctx)
    except GancoreError as e:
        print(f"error: sweep worker {ctx.index}: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.exit(code)


class _SlurmWorker:
    """A submitit-callable worker (one task of the job array).

    Preemption / time limit (submitit's SIGUSR2): the trainer checkpoints and stops, the trial is re-queued in the
    study, then submitit's handler requeues this worker job (as gancore.launch.TrainJob does), which pulls the
    re-queued trial again. Not after SIGTERM (scancel): a cancelled job must stay cancelled.
    """

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    def __call__(self, index: int) -> int:
        ctx = dataclasses.replace(self.ctx, index=index, stream=self.ctx.stream + index)
        code, signum = _work(ctx)
        if code == EXIT_STOPPED and signum not in (None, signal.SIGTERM):
            sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
            handler = signal.getsignal(sig)
            if callable(handler) and type(getattr(handler, "__self__", None)).__name__ == "SignalHandler":
                handler(sig, None)  # submitit's: stores checkpoint(), `scontrol requeue`, exits
        return code

    def checkpoint(self, index: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, index)


class _Stop(Exception):
    pass


def _launch_local(ctxs: list[WorkerContext]) -> int:
    """N worker processes (spawned: no CUDA/fork surprises); Ctrl-C / SIGTERM stop them gracefully."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    procs: list[Any] = []  # started ones

    def _term(signum: int, frame: Any) -> None:
        raise _Stop()

    old = signal.signal(signal.SIGTERM, _term)
    stopped = False
    try:
        for c in ctxs:
            procs.append(spawn.Process(target=_local_worker, args=(c,), name=f"sweep-worker-{c.index}"))
            procs[-1].start()
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.5)
            if any(p.exitcode not in (None, 0, EXIT_STOPPED) for p in procs):
                break  # a worker hit an error: stop the others (they checkpoint) and report it
    except (KeyboardInterrupt, _Stop):
        stopped = True
        print("sweep: stopping workers (each checkpoints its trial; run the sweep again to continue)", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 120  # a step plus a checkpoint; then give up on it
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, EXIT_STOPPED, -signal.SIGTERM)]
    if failed and not stopped:
        i, code = failed[0]
        raise SweepError(f"sweep worker {i} failed (exit code {code}); its error is printed above")
    return EXIT_STOPPED if stopped or any(p.exitcode == EXIT_STOPPED for p in procs) else 0


def _launch_slurm(sweep: Sweep, ctx: WorkerContext, n: int) -> int:
    """A Slurm job array of n workers through submitit (gancore.launch's executor); waits for them."""
    from gancore.launch import Resources, make_executor

    s = sweep.slurm
    res = Resources(gpus=s["gpus"], cpus=s["cpus"], mem=str(s["mem"]), time=str(s["time"]), partition=s["partition"],
                    account=s["account"], qos=s["qos"])
    ex = make_executor("slurm", sweep.dir / "slurm", res, name=f"sweep-{sweep.study}")
    ex.update_parameters(slurm_array_parallelism=s["array_parallelism"] or n)
    jobs = ex.map_array(_SlurmWorker(ctx), list(range(n)))
    print(f"sweep: {n} Slurm worker(s) in job array {jobs[0].job_id.split('_')[0]}; logs in {sweep.dir / 'slurm'}",
          flush=True)
    code = 0
    try:
        for j in jobs:
            try:
                code = max(code, int(j.result() or 0))
            except Exception as e:
                print(f"sweep: Slurm worker {j.job_id} failed: {' '.join(str(e).split())[:300]}", file=sys.stderr)
                code = max(code, 1)
    except KeyboardInterrupt:
        for j in jobs:
            j.cancel(check=False)  # SIGTERM: each worker checkpoints and re-queues its trial
        return EXIT_STOPPED
    if code not in (0, EXIT_STOPPED):
        raise SweepError(f"Slurm workers failed; see {sweep.dir / 'slurm'}")
    return code


# ----------------------------------------------------------------------------------------------------------------
# Prepare, run, report


def _warm_metrics(sweep: Sweep) -> None:
    """Train the domain extractor / compute real statistics once, before N workers would race to; check that the
    objective is a metric the trials will report."""
    import torch

    from gancore.metrics import extractors, metric_key
    from gancore.metrics.fidelity import real_images, real_statistics

    cfg = sweep.base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_real = real_images(cfg, cfg.eval.n_samples)
    name = extractors.resolve(cfg, None, channels=x_real.shape[1])
    expected = metric_key("fid", name, cfg.eval.n_samples)
    if expected != sweep.objective:
        raise SweepError(f"objective {sweep.objective} is not what the trials report: {expected} (extractor {name}, "
                         f"eval.n_samples={cfg.eval.n_samples}); fix `objective` or the eval overrides")
    fe, fe_id = extractors.load(name, cfg, device)
    real_statistics(cfg, name, fe, fe_id, x_real, device)


def prepare(sweep: Sweep) -> tuple[Any, str | None]:
    """Open the storage (fails fast), check the objective and warm the metric caches, create or load the study
    (a resumed one must have the same definition), recover trials of dead workers, make the parent MLflow run.
    Returns (study, parent run id)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(sweep.storage_url, sweep)
    _warm_metrics(sweep)
    study = open_study(sweep, storage, create=True)
    mine, theirs = json.loads(json.dumps(definition(sweep), default=str)), study.user_attrs.get(DEFINITION_ATTR)
    if theirs is None:
        study.set_user_attr(DEFINITION_ATTR, mine)
    else:
        diffs = [f"{sec}.{k}" for sec in ("base", "space") for k in sorted(set(mine[sec]) | set(theirs[sec]))
                 if mine[sec].get(k) != theirs[sec].get(k)]
        diffs += ["objective"] if mine["objective"] != theirs["objective"] else []
        if diffs:
            raise SweepError(f"study {sweep.study!r} in {describe_url(sweep.storage_url)} was made with another "
                             f"definition (differs: {', '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}); "
                             "use a new study name")
    recovered = recover_stale(study, sweep)
    if recovered:
        print(f"sweep: re-queued interrupted trial(s) {', '.join(map(str, recovered))}; they resume from their "
              "checkpoints", flush=True)
    return study, parent_run(sweep, study)


def run_sweep(sweep: Sweep, workers: int | None = None, launcher: str = "local", report_only: bool = False,
              prepare_only: bool = False) -> int:
    """Prepare, run the workers, report. Returns 0 (budget used / timeout) or EXIT_STOPPED (interrupted)."""
    workers = workers or sweep.workers
    why = ""
    if workers == "auto":
        workers, why = auto_workers(sweep, launcher)
        why = f" ({why})"
    if launcher not in ("local", "slurm"):
        raise SweepError(f"launcher {launcher!r}: expected local or slurm")
    if launcher == "slurm" and sweep.storage_url.startswith("sqlite"):
        raise SweepError("Slurm workers on several nodes need a shared storage that locks over the network: give "
                         "--storage postgresql://... (or journal:/shared/path/study.log); not SQLite on NFS")
    if report_only:
        study = open_study(sweep, open_storage(sweep.storage_url))
        return report(sweep, study, study.user_attrs.get(PARENT_ATTR), final=None)
    study, parent = prepare(sweep)
    left = trials_left(study, sweep.n_trials)
    n = workers if left is None else min(workers, left)
    plan = ("prepared: start workers (e.g. sbatch --array=0-N slurm/sweep.sh)" if prepare_only else
            "budget used" if n == 0 else f"{n} {launcher} worker(s){why}")
    print(f"sweep {sweep.study}: storage {describe_url(sweep.storage_url)}; "
          f"{len(study.get_trials(deepcopy=False))} trial(s) so far; {plan}; dir {sweep.dir}", flush=True)
    if prepare_only:
        return 0
    stream = len(study.get_trials(deepcopy=False)) * 1009  # later runs of the sweep draw new start-up params
    code = 0
    if n > 0 and launcher == "local":
        import torch

        threads = 0 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // n)
        gpus = torch.cuda.device_count()
        ctxs = [WorkerContext(sweep, parent, i, stream + i, threads, str(i % gpus) if gpus > 1 else None)
                for i in range(n)]
        code = _launch_local(ctxs)
    elif n > 0:
        code = _launch_slurm(sweep, WorkerContext(sweep, parent, 0, stream), n)
    study = open_study(sweep, open_storage(sweep.storage_url))
    report(sweep, study, parent, final=code == 0)
    return code


def auto_workers(sweep: Sweep, launcher: str) -> tuple[int, str]:
    """`workers: auto`: local workers = the measured best trials per device (gancore.fast, bench/
    trials_per_device.py) x the GPUs here (one CPU device without GPUs). Slurm arrays: the default count."""
    from gancore import fast

    if launcher == "slurm":
        return fast.DEFAULT_TRIALS_PER_DEVICE, "the default for a Slurm job array; pass --workers N"
    import torch

    k, source = fast.trials_per_device(sweep.base.train.compile)
    gpus = torch.cuda.device_count()
    per = f"{k} per GPU x {gpus} GPUs" if gpus else f"{k} on the CPU"
    return k * max(1, gpus), f"auto: {per}, {source}"


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
    for name, fn in (("optimization_history", vis.plot_optimization_history),
                     ("param_importances", vis.plot_param_importances),
                     ("parallel_coordinate", vis.plot_parallel_coordinate),
                     ("intermediate_values", vis.plot_intermediate_values),
                     ("timeline", vis.plot_timeline)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
            plt.close(fig)
            done.append(out / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, optuna.exceptions.OptunaError) as e:
            print(f"sweep: figure {name} skipped ({' '.join(str(e).split())[:120]})", flush=True)
            plt.close("all")
    return done


def best_trial(study: Any) -> Any | None:
    complete = [t for t in study.get_trials(deepcopy=False) if _state(t) == "COMPLETE" and t.value is not None
                and math.isfinite(t.value)]
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def trials_table(sweep: Sweep, study: Any, top: int = 10) -> Any:
    """A rich Table of the best trials (then the others by number)."""
    from rich.table import Table

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(_state(t) == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    ranked = sorted(trials, key=lambda t: (t.value is None or _state(t) != "COMPLETE", t.value or 0, t.number))
    title = f"sweep {sweep.study}: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
    table = Table(title=title)
    for col in ("trial", "state", sweep.objective, *(p.name for p in sweep.space), "steps", "time", "MLflow run"):
        table.add_column(col, justify="right" if col not in ("state", "MLflow run") else "left")
    for t in ranked[:top]:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        steps = max(t.intermediate_values) if t.intermediate_values else "-"
        table.add_row(str(t.number), _state(t), "-" if t.value is None else f"{t.value:.4g}",
                      *(fmt(t.params.get(p.name, "-")) for p in sweep.space), str(steps),
                      f"{t.duration.total_seconds():.0f} s" if t.duration else "-",
                      (t.user_attrs.get("mlflow.run_id") or "-")[:8])
    return table


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
        study.trials_dataframe().to_csv(sweep.dir / "trials.csv", index=False)
    if parent_id and _tracked(sweep):
        from mlflow.entities import Metric, RunTag

        try:
            client, _ = _mlflow(sweep)
            finished = budget_used(study.get_trials(deepcopy=False))["finished"]
            tags = {"sweep.finished_trials": str(finished)}
            metrics = []
            if best is not None:
                tags.update({"best.trial": str(best.number), "best.value": repr(best.value),
                             **{f"best.{k}": str(v) for k, v in best.params.items()}})
                metrics.append(Metric(f"best_{sweep.objective}", best.value, int(time.time() * 1000), finished))
            client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
            for f in figures:
                client.log_artifact(parent_id, str(f), "optuna")
            for f in (best_yaml, sweep.dir / "trials.csv"):
                if f.is_file():
                    client.log_artifact(parent_id, str(f))
            if final is not None:
                client.set_terminated(parent_id, "FINISHED" if final else "KILLED")
        except Exception as e:
            log.warning("sweep: parent MLflow run not updated: %s", e)
    return 0
