"""Where a study lives: the Optuna storage (sqlite, journal file or a database), the sampler, the pruner, the study.

Storage: sqlite (default, one file under the sweep dir), `journal:PATH` (Optuna's journal file; what to use on NFS
without a database server) or an RDB URL such as postgresql://... . Workers coordinate only through the storage.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from gancore.errors import SweepError
from gancore.sweep.spec import Sweep

PARENT_ATTR = "gancore.mlflow_parent_run_id"  # study user attr: the sweep's parent MLflow run
DEFINITION_ATTR = "gancore.definition"  # study user attr: what a resumed sweep must not change
RDB_PREFIXES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def describe_url(url: str) -> str:
    """The storage URL without its password (for messages, tags and params)."""
    if url.startswith("journal:"):
        return url
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def _journal(url: str) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(url[len("journal:"):]).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise SweepError(f"cannot use journal storage {path} ({e.strerror or e}); check the path") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    engine: dict[str, Any] = {"pool_pre_ping": True}  # trials last hours: servers drop idle connections
    if url.startswith("sqlite"):
        db = url.split("///", 1)[-1].split("?", 1)[0]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # several workers write one file: wait for the lock; isolation_level None + BEGIN IMMEDIATE: see
        # _serialise_sqlite
        engine["connect_args"] = {"timeout": 60, "isolation_level": None}
    elif url.startswith(("postgresql", "mysql")):
        from sqlalchemy.pool import NullPool

        engine["connect_args"] = {"connect_timeout": 5}  # unreachable host: fail in seconds, not minutes
        # no idle pooled connections: every worker, coordinator and heartbeat thread opens engines, and pooled ones
        # (up to 15 each) exhausted the server's max_connections (100 by default) in a 2-worker test sweep
        engine["poolclass"] = NullPool
    return engine


def open_storage(url: str, sweep: Sweep | None = None) -> Any:
    """An Optuna storage for `url`; an unreachable one is a one-line SweepError within seconds.

    sqlite / postgresql / mysql: RDBStorage with heartbeats (a dead worker's trial is failed and re-queued, to resume
    from its checkpoint, `grace_period` s after its last beat, by any worker or coordinator). `journal:PATH`: JournalStorage on a journal file (no heartbeat: see gancore/sweep/trials.py).
    """
    import optuna

    shown = describe_url(url)
    if url.startswith("journal:"):
        return _journal(url)
    if url.split(":", 1)[0].split("+", 1)[0] not in RDB_PREFIXES:
        raise SweepError(f"storage {shown!r}: expected sqlite:///PATH, journal:PATH or a database URL "
                         "such as postgresql://user:pass@host:5432/db")
    engine = _engine_kwargs(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if sweep is not None:  # (a local import: trials imports this module)
                from gancore.sweep.trials import RetryFromCheckpoint

                kwargs = dict(heartbeat_interval=sweep.heartbeat_interval, grace_period=sweep.grace_period,
                              heartbeat_stale_trial_callback=RetryFromCheckpoint(sweep.max_retry))
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
        every = sweep.base.eval.every_images if sweep.base.train.max_images else sweep.base.eval.every
        return optuna.pruners.HyperbandPruner(min_resource=p["min_resource"] or every,
                                              max_resource=sweep.base.train.max_images or "auto",
                                              reduction_factor=p["reduction_factor"])
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
