"""The sweep file: its schema, strict validation and what a trial's config is (sweeps/README.md has the format).

    sweeps/x.yaml --load_sweep--> Sweep (base config + search space + objective + budget + sampler/pruner/storage)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gancore.config import SPLITS, Config, all_keys, choices, flat, load_config, read_mapping, replace
from gancore.errors import ConfigError, SweepError
from gancore.options import coerce

DEFAULT_OUT = "runs/sweeps"  # sweep dirs: <out>/<study>/{trial_NNNN/, optuna.db, best.yaml, figures/}


ROLES = ("all", "winner", "baseline")  # which confirmation runs `--confirm-runs` selects (gancore/sweep/confirm.py)

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
class Confirm:
    """The sweep's confirmation (`confirm:`): the winner at the full budget on fresh seeds beside a baseline preset
    (gancore/sweep/confirm.py). Not part of the study's definition: it can be added to a running study."""

    seeds: tuple[int, ...]  # the winner's seeds; never the search's own train.seed
    baseline: Path | None  # a preset trained beside it at the same budget and protocol
    baseline_seeds: tuple[int, ...]
    overrides: dict[str, Any]  # on top of the sweep's overrides, for winner and baseline alike (the full budget)
    extractor: str  # the final measurement of each run's best checkpoint (e.g. inception)
    real_split: str  # ... against these real images (test)
    anchor: dict[str, Any]  # {name, fid}: the published number the table is read against (optional)
    results: Path  # where the table and the committed generators go


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
    value: str = "last"  # a trial's value: last (its last evaluation) | best (the best of its evaluations)
    overrides: dict[str, Any] = field(default_factory=dict)  # the sweep file's overrides, as written
    confirm: Confirm | None = None

    @property
    def dir(self) -> Path:
        return self.out / self.study

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.dir / 'optuna.db'}"


# allowed keys per section: name -> (types, default); a type of None = any YAML value
_TOP = {"study", "base", "overrides", "objective", "value", "space", "budget", "sampler", "pruner", "storage",
        "out", "workers", "slurm", "confirm"}
_CONFIRM = {"seeds": (list, None), "baseline": (str, None), "baseline_seeds": (list, None), "overrides": (dict, {}),
            "extractor": (str, "inception"), "real_split": (str, "test"), "anchor": (dict, {}),
            "results": (str, "../results")}
VALUES = ("last", "best")
_BUDGET = {"n_trials": (int, None), "timeout_s": ((int, float), None)}
_SAMPLER = {"name": (str, "tpe"), "seed": (int, 0), "n_startup_trials": (int, 10), "multivariate": (bool, True),
            "constant_liar": (bool, True)}
_PRUNER = {"name": (str, "median"), "n_startup_trials": (int, 5), "n_warmup_steps": (int, 0),
           "interval_steps": (int, 1), "min_resource": (int, None), "reduction_factor": (int, 3)}
_STORAGE = {"url": (str, None), "heartbeat_interval": (int, 60), "grace_period": (int, 300), "max_retry": (int, 3)}
# per worker job, in gancore.cluster.Resources' spelling (jobs/submit.py takes the same); the defaults are Resources'
_SLURM_TYPES = {"gpus": int, "cpus": int, "mem": (str, int), "time": (str, int), "partition": str, "account": str,
                "qos": str}
_PARAM = {"type", "low", "high", "log", "step", "choices", "keys"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


def _slurm_schema() -> dict[str, tuple]:
    """The `slurm:` section: Resources' fields with Resources' defaults (one set, owned by gancore.cluster)."""
    from gancore.cluster import Resources

    defaults = {f.name: f.default for f in dataclasses.fields(Resources)}
    return {**{k: (tp, defaults[k]) for k, tp in _SLURM_TYPES.items()}, "array_parallelism": (int, None)}


def _unknown_key(where: str, key: str, known: set[str] | dict) -> SweepError:
    # not config._unknown: that one speaks of dotted config keys and raises ConfigError; sections here are flat
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
    """config's float check (YAML reads 1e-4, without a dot, as a string), as a SweepError."""
    try:
        return coerce(v, float, where)
    except ConfigError as e:
        raise SweepError(str(e)) from None


def _check_keys(keys: tuple[str, ...], base: Config, where: str) -> None:
    """Every key is a config key and a hyper-parameter (infrastructure does not change the result)."""
    known, hyper = all_keys(), set(flat(base))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            raise SweepError(f"{where}: '{key}' is not a config key" + (f"; did you mean '{close[0]}'?" if close else
                                                                        " (give `keys: [...]` for a named parameter)"))
        if key not in hyper:
            raise SweepError(f"{where}: '{key}' is infrastructure (it does not change the result); search "
                             "hyper-parameters only")


def _range(name: str, keys: tuple[str, ...], kind: str, d: dict, where: str) -> tuple[Param, list[Any]]:
    """A float/int parameter and its extreme values."""
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
    return Param(name, keys, kind, low, high, use_log, step), [int(low), int(high)] if kind == "int" else [low, high]


def _check_values(keys: tuple[str, ...], values: list[Any], base: Config, where: str) -> None:
    """Every value a parameter can take makes a valid config (registry names included: gancore/config.py asks the
    registries), checked when the sweep file is read, not in the middle of a sweep."""
    for key in keys:
        for v in values:
            try:
                replace(base, **{key: v})
            except ConfigError as e:
                raise SweepError(f"{where}: value {v!r} does not fit {key} ({e})") from None


def _param(name: str, d: Any, base: Config, where: str) -> Param:
    """One validated search-space entry; every value it can take must make a valid config."""
    if not isinstance(d, dict):
        raise SweepError(f"{where}: expected a mapping like {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
    for k in d:
        if k not in _PARAM:
            raise _unknown_key(where, k, _PARAM)
    keys = d.get("keys", [name])
    keys = tuple([keys] if isinstance(keys, str) else keys)
    _check_keys(keys, base, where)
    kind = d.get("type")
    if kind not in ("float", "int", "categorical"):
        raise SweepError(f"{where}.type: {kind!r} is not one of float, int, categorical")
    if kind == "categorical":
        choices = d.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{where}.choices: expected a non-empty list")
        if any(k in d for k in ("low", "high", "log", "step")):
            raise SweepError(f"{where}: a categorical parameter takes `choices` only")
        p, values = Param(name, keys, kind, choices=tuple(choices)), list(choices)
    else:
        p, values = _range(name, keys, kind, d, where)
    _check_values(keys, values, base, where)
    return p


def _base(path: Path, d: dict, study: str) -> Config:
    """The base preset (relative to the sweep file) + overrides (dotted keys, applied to every trial)."""
    overrides = d.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{path}: overrides: expected a mapping of dotted config keys, e.g. train.max_steps: 500")
    try:
        return replace(load_config((path.parent / str(d["base"])).resolve()),
                       **{**{str(k): v for k, v in overrides.items()}, "name": study})
    except ConfigError as e:
        raise SweepError(f"{path}: {e}") from None


def _space(path: Path, space_d: Any, base: Config) -> tuple[Param, ...]:
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
    return space


def _search(path: Path, d: dict, base: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampler and pruner sections."""
    sampler = _section(d.get("sampler"), _SAMPLER, f"{path}: sampler")
    if sampler["name"] not in SAMPLERS:
        raise SweepError(f"{path}: sampler.name: {sampler['name']!r} is not one of {', '.join(SAMPLERS)}")
    pruner = _section(d.get("pruner"), _PRUNER, f"{path}: pruner")
    if pruner["name"] not in PRUNERS:
        raise SweepError(f"{path}: pruner.name: {pruner['name']!r} is not one of {', '.join(PRUNERS)}")
    if pruner["name"] != "none" and base.eval.every <= 0 and base.eval.every_images <= 0:
        raise SweepError(f"{path}: pruner {pruner['name']} needs intermediate FIDs: set eval.every (steps) or "
                         "eval.every_images > 0 in overrides (or pruner: {name: none})")
    return sampler, pruner


def _seeds(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) \
            or len(set(v)) != len(v):
        raise SweepError(f"{where}: expected a list of distinct seeds >= 0, e.g. [1, 2, 3]; got {v!r}")
    return tuple(v)


def _confirm(path: Path, d: Any, base: Config) -> Confirm | None:
    """The `confirm:` section, checked like the rest: its configs must build, its seeds must be fresh."""
    if d is None:
        return None
    c = _section(d, _CONFIRM, f"{path}: confirm")
    seeds = _seeds(c["seeds"], f"{path}: confirm.seeds")
    if base.train.seed in seeds:
        raise SweepError(f"{path}: confirm.seeds: {base.train.seed} is the search's own train.seed; confirm on seeds "
                         "the search never used")
    baseline = (path.parent / c["baseline"]).resolve() if c["baseline"] else None
    if baseline is not None and not baseline.is_file():
        raise SweepError(f"{path}: confirm.baseline: {baseline} not found; name a preset, e.g. ../configs/mnist_dcgan.yaml")
    if c["extractor"] not in choices("eval.extractor"):
        raise SweepError(f"{path}: confirm.extractor: {c['extractor']!r} is not one of "
                         f"{', '.join(choices('eval.extractor'))}")
    if c["real_split"] not in SPLITS:
        raise SweepError(f"{path}: confirm.real_split: expected train or test, got {c['real_split']!r}")
    anchor = c["anchor"]
    if anchor and (set(anchor) != {"name", "fid"} or not isinstance(anchor["fid"], (int, float))):
        raise SweepError(f"{path}: confirm.anchor: expected {{name: ..., fid: number}}, got {anchor!r}")
    try:
        replace(base, **{str(k): v for k, v in c["overrides"].items()})
    except ConfigError as e:
        raise SweepError(f"{path}: confirm.overrides: {e}") from None
    return Confirm(seeds=seeds, baseline=baseline,
                   baseline_seeds=_seeds(c["baseline_seeds"], f"{path}: confirm.baseline_seeds")
                   if c["baseline_seeds"] is not None else seeds,
                   overrides={str(k): v for k, v in c["overrides"].items()}, extractor=c["extractor"],
                   real_split=c["real_split"], anchor=anchor, results=(path.parent / c["results"]).resolve())


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
    base = _base(path, d, study)
    space = _space(path, d["space"], base)

    objective = d["objective"]
    from gancore.metrics.fidelity import MetricKey  # torch: only once the file's own keys are checked

    key = MetricKey.find(objective) if isinstance(objective, str) else None
    if key is None or key.metric != "fid" or key.best:
        raise SweepError(f"{path}: objective: expected an fid_* metric name (minimised), e.g. fid_lenet_10k; "
                         f"got {objective!r}")
    if base.eval.n_samples <= 0:
        raise SweepError(f"{path}: the objective needs sample-quality evaluations: set eval.n_samples in overrides")
    value = d.get("value", "last")
    if value not in VALUES:
        raise SweepError(f"{path}: value: {value!r} is not one of {', '.join(VALUES)} (best: the best of a trial's "
                         "evaluations, the budget protocol's rule)")

    budget = _section(d.get("budget"), _BUDGET, f"{path}: budget")
    n_trials = n_trials if n_trials is not None else budget["n_trials"]
    timeout_s = timeout_s if timeout_s is not None else budget["timeout_s"]
    if n_trials is None and timeout_s is None:
        raise SweepError(f"{path}: budget: give n_trials and/or timeout_s")
    if n_trials is not None and n_trials < 1 or timeout_s is not None and timeout_s <= 0:
        raise SweepError(f"{path}: budget: n_trials and timeout_s must be positive")

    sampler, pruner = _search(path, d, base)
    st = d.get("storage")
    st = _section({"url": st} if isinstance(st, str) else st, _STORAGE, f"{path}: storage")
    workers = d.get("workers", "auto")
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"{path}: workers: expected a positive integer or auto, got {workers!r}")
    slurm = _section(d.get("slurm"), _slurm_schema(), f"{path}: slurm")
    if slurm["gpus"] not in (0, 1):
        raise SweepError(f"{path}: slurm.gpus: a sweep worker trains one trial at a time on 0 or 1 GPU; "
                         "use more workers for more GPUs")
    out_dir = Path(out if out is not None else d.get("out") or DEFAULT_OUT).expanduser().resolve()
    return Sweep(study=study, path=path.resolve(), base=base, space=space, objective=objective,
                 n_trials=n_trials, timeout_s=float(timeout_s) if timeout_s else None, sampler=sampler,
                 pruner=pruner, storage=storage or st["url"], heartbeat_interval=st["heartbeat_interval"],
                 grace_period=st["grace_period"], max_retry=st["max_retry"], out=out_dir, workers=workers,
                 slurm=slurm, value=value, overrides={str(k): v for k, v in (d.get("overrides") or {}).items()},
                 confirm=_confirm(path, d.get("confirm"), base))


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
            **({"value": sweep.value} if sweep.value != "last" else {}),
            "space": {p.name: dataclasses.asdict(p) for p in sweep.space}}
