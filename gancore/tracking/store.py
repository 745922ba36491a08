"""The MLflow store: which one (URI), is it there, a client on it, its experiments, opening a run to record into (new
or resumed) with what it already holds, and what a run ran with (tags).

Store selection: `track.uri`, else `$MLFLOW_TRACKING_URI`, else a SQLite database `./mlruns/mlflow.db` with artifacts
in `./mlruns/artifacts`. The same store is what `make ui` serves and what `jobs/runs.py` lists.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import logging
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gancore.config import Config, hyperparams
from gancore.errors import TrackingError

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"  # relative to the working directory, git-ignored
PROBE_TIMEOUT_S = 3.0  # an unreachable server must fail in seconds, not after MLflow's minutes of retries


# ----------------------------------------------------------------------------------------------------------------
# Which store, and is it there


# what MLflow's tracking store accepts (a bare path is a file store)
URI_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{(Path.cwd() / DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri else "file"
    if scheme not in URI_SCHEMES:
        raise TrackingError(f"tracking URI {uri!r} has an unsupported scheme {scheme!r}; use one of "
                            f"{', '.join(s + '://' for s in URI_SCHEMES)} (track.uri, --uri or MLFLOW_TRACKING_URI)")
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative paths are relative to the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]).resolve()


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingError within `timeout` s when an http(s) tracking server does not answer."""
    if not _is_http(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered (auth / proxy / old server without /health): reachable, let MLflow talk to it
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        why = " ".join(str(reason).split()) or type(e).__name__
        raise TrackingError(
            f"cannot reach MLflow tracking server at {uri} ({why}); start it, fix track.uri / MLFLOW_TRACKING_URI, "
            "or run with track.enabled=false"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Clients and errors


def one_line(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters (MLflow's can be pages of SQL)."""
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Turn an MlflowException inside the block into a one-line TrackingError naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise TrackingError(f"MLflow store {uri}: {one_line(e)}") from None


def mlflow_client(uri: str) -> Any:
    """The one place an MlflowClient is made."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise db creation/migration and experiment creation between processes sharing a local SQLite store."""
    db = _sqlite_path(uri)
    if db is None:  # a server or database service does its own locking
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_store(uri: str | None, experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id) for `experiment` in the store, creating both if needed (multi-process safe)."""
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(uri)
    check_reachable(uri)
    db = _sqlite_path(uri)
    # Our own SQLite stores keep artifacts beside the database, so `make ui` finds them whatever the cwd.
    artifact_location = (db.parent / "artifacts").as_uri() if db is not None else None
    try:
        with store_errors(uri), _store_lock(uri):
            client = mlflow_client(uri)
            exp = client.get_experiment_by_name(experiment)  # first call creates / migrates the database
            if exp is None:
                try:
                    return client, client.create_experiment(experiment, artifact_location=artifact_location)
                except MlflowException:
                    exp = client.get_experiment_by_name(experiment)  # another process (or server) won the race
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return client, exp.experiment_id
    except OSError as e:
        raise TrackingError(f"MLflow store {uri} is not usable ({one_line(e)}); fix track.uri or the folder's permissions") from None


def existing_client(uri: str | None) -> tuple[Any, str]:
    """(client, resolved URI) on an existing store; never creates an empty database just to read nothing."""
    uri = resolve_uri(uri)
    check_reachable(uri)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db}; train a run first, or pass --uri / set MLFLOW_TRACKING_URI")
    return mlflow_client(uri), uri


def get_run(client: Any, run_id: str, uri: str, missing: str | None = None, prefix: bool = False) -> Any:
    """The run `run_id` (`prefix`: or the one run whose id starts with it, as the runs table shows 8 characters), or
    a one-line TrackingError (`missing`, else a default) when the store has no such run or the prefix is ambiguous."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        pass
    if prefix and re.fullmatch(r"[0-9a-f]{4,31}", run_id):  # a prefix: look through the store's runs
        exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        found = [r for r in client.search_runs(exps, run_view_type=ViewType.ALL, max_results=50000)
                 if r.info.run_id.startswith(run_id)] if exps else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TrackingError(f"run id prefix {run_id!r} matches {len(found)} runs in {uri} "
                                f"({', '.join(r.info.run_id[:12] for r in found[:3])} ...); give more characters")
    raise TrackingError(missing or f"MLflow run {run_id!r} not found in {uri}") from None


def open_run_info(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """A run's id, name, status, start/end time (ms; end None while running), experiment, artifact URI, run_dir,
    params, tags and last metric values."""
    client, uri = existing_client(uri)
    run = get_run(client, run_id, uri)
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "run_dir": run.data.tags.get("gancore.run_dir"),
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
    }


# ----------------------------------------------------------------------------------------------------------------
# A run to record into: created, or reopened to resume (what it already holds is not logged twice)

NEVER = -(2**62)  # "no step logged yet"


def metric_last_steps(client: Any, run: Any) -> dict[str, int]:
    """Last step per metric key already stored in `run` (each key's history read once)."""
    last: dict[str, int] = {}
    for key in run.data.metrics:
        hist = client.get_metric_history(run.info.run_id, key)
        if hist:
            last[key] = max(m.step for m in hist)
    return last


def stored_image_steps(client: Any, run_id: str) -> dict[str, set[int]]:
    """Steps per image key in the store (MLflow names them images/<key, / as ~>+step+<N>+...)."""
    found: dict[str, set[int]] = {}
    for info in client.list_artifacts(run_id, "images"):
        parts = Path(info.path).name.split("+")
        if len(parts) > 2 and parts[1] == "step" and parts[2].lstrip("-").isdigit():
            found.setdefault(parts[0].replace("~", "/"), set()).add(int(parts[2]))
    return found


@dataclass
class OpenedRun:
    """A run ready to record into, and what its first records are."""

    client: Any
    run_id: str
    params: dict[str, str]  # the hyper-parameters to log (a resumed run: only the keys it lacks; params are immutable)
    tags: dict[str, str]  # tags to log (a new run got them from create_run: none)
    metric_last: dict[str, int]  # metric key -> last step the store holds (empty for a new run)
    image_last: dict[str, int]  # image key -> last step the store holds


def open_run(uri: str, experiment: str, cfg: Config, run_dir: Path, run_id: str | None = None,
             tags: dict[str, str] | None = None) -> OpenedRun:
    """Create a run of `experiment` for `cfg` (or reopen `run_id` when resuming: RUNNING again, resume count + 1)."""
    client, experiment_id = open_store(uri, experiment)
    all_tags = {**run_tags(cfg, run_dir), **{k: str(v) for k, v in (tags or {}).items()}}
    params = {k: str(v) for k, v in hyperparams(cfg).items()}  # MLflow stores param values as strings
    with store_errors(uri):
        if run_id is None:
            run = client.create_run(experiment_id, run_name=cfg.name, tags=all_tags)
            return OpenedRun(client, run.info.run_id, params, {}, {}, {})
        run = get_run(client, run_id, uri, f"cannot resume MLflow run {run_id}: not found in {uri}")
        existing = dict(run.data.params)
        # Read each history once so replayed steps after a crash are not logged twice.
        metric_last = metric_last_steps(client, run)
        image_last: dict[str, int] = {}
        with contextlib.suppress(Exception):  # no images yet / artifact store without listing
            image_last = {k: max(v) for k, v in stored_image_steps(client, run_id).items()}
        all_tags["gancore.resume_count"] = str(int(run.data.tags.get("gancore.resume_count", "0")) + 1)
        client.update_run(run_id, status="RUNNING")
    # Params are immutable: on resume only new keys are logged (run length may legitimately change).
    changed = sorted(k for k in params if k in existing and existing[k] != params[k])
    if changed:
        log.warning("resumed run keeps its original params for: %s", ", ".join(changed))
    return OpenedRun(client, run_id, {k: v for k, v in params.items() if k not in existing}, all_tags,
                     metric_last, image_last)


# ----------------------------------------------------------------------------------------------------------------
# Run tags


def _git(*args: str) -> str | None:
    """Output of a git command run in gancore's own checkout (the code that ran), None without git/repo."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def run_tags(cfg: Config, run_dir: Path | None = None) -> dict[str, str]:
    """Where and with what code a run ran: git, host, preset, family, world size, precision, versions, Slurm ids."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {
        "gancore.preset": cfg.name,
        "gancore.family": cfg.family,
        "gancore.world_size": os.environ.get("WORLD_SIZE", "1"),
        "gancore.mixed_precision": cfg.train.mixed_precision,
        "gancore.host": socket.gethostname(),
        "gancore.git_commit": commit or "unknown",
        "gancore.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "gancore.version": _version("gancore"),
        "gancore.torch_version": _version("torch"),
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
    }
    with contextlib.suppress(Exception):  # no passwd entry in some containers
        tags["mlflow.user"] = getpass.getuser()
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the UI shows this one on the run page
    if run_dir is not None:
        tags["gancore.run_dir"] = str(Path(run_dir).resolve())
    for env, tag in (
        ("SLURM_JOB_ID", "gancore.slurm_job_id"),
        ("SLURM_ARRAY_JOB_ID", "gancore.slurm_array_job_id"),
        ("SLURM_ARRAY_TASK_ID", "gancore.slurm_array_task_id"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
