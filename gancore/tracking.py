"""Experiment tracking behind a small interface (MLflow implementation: see issue "MLflow tracking").

The trainer only calls `Tracker` methods; off the main process or with track.enabled=false it gets a NullTracker.

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
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from gancore.config import Config, flat, save_yaml
from gancore.errors import TrackingError

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"  # relative to the working directory, git-ignored
PROBE_TIMEOUT_S = 3.0  # an unreachable server must fail in seconds, not after MLflow's minutes of retries
FLUSH_EVERY_METRICS = 1000  # queued values that trigger a background send (MLflow's per-request metric limit)
FLUSH_EVERY_S = 10.0  # ... or seconds since the last send, so the UI's curves stay live
_IMAGE_KEY_OK = re.compile(r"[^A-Za-z0-9_\-./ ]")  # characters MLflow refuses in image keys


class Tracker:
    """Interface. Every method is cheap for the caller; implementations batch and send asynchronously."""

    run_id: str | None = None

    def start(self, cfg: Config, run_dir: Path, run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        """Create a run (or reopen `run_id` when resuming); log params (flat config) and tags. Returns the run id."""
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step`; steps at or below an already-logged step of a resumed run are dropped."""

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An HWC uint8 image shown by step in the UI (e.g. the fixed-noise sample grid)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or a folder's files) stored with the run."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags."""

    def flush(self) -> None:
        """Send what is queued."""

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close the run (status FINISHED | FAILED | KILLED)."""


class NullTracker(Tracker):
    """Does nothing: off the main process, or tracking disabled."""


# ----------------------------------------------------------------------------------------------------------------
# Store selection and setup


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


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


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def open_store(uri: str | None, experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id) for `experiment` in the store, creating both if needed (multi-process safe)."""
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(uri)
    check_reachable(uri)
    db = _sqlite_path(uri)
    # Our own SQLite stores keep artifacts beside the database, so `make ui` finds them whatever the cwd.
    artifact_location = (db.parent / "artifacts").as_uri() if db is not None else None
    try:
        with _store_lock(uri):
            client = _client(uri)
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
    except MlflowException as e:
        raise TrackingError(f"MLflow store {uri}: {_one_line(e)}") from None
    except OSError as e:
        raise TrackingError(f"MLflow store {uri} is not usable ({_one_line(e)}); fix track.uri or the folder's permissions") from None


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


def _image_key(key: str) -> str:
    return _IMAGE_KEY_OK.sub("_", key)


def _image_steps(client: Any, run_id: str) -> dict[str, int]:
    """Last step per image key already stored (MLflow names them images/<key with / as ~>+step+<N>+...)."""
    last: dict[str, int] = {}
    with contextlib.suppress(Exception):  # no images yet / artifact store without listing
        for info in client.list_artifacts(run_id, "images"):
            parts = Path(info.path).name.split("+")
            if len(parts) > 2 and parts[1] == "step" and parts[2].lstrip("-").isdigit():
                key = parts[0].replace("~", "/")
                last[key] = max(last.get(key, -(2**62)), int(parts[2]))
    return last


# ----------------------------------------------------------------------------------------------------------------
# The MLflow tracker


class MLflowTracker(Tracker):
    """Logs to MLflow; metrics are queued and sent in background batches, images and artifacts as they come."""

    def __init__(self, uri: str | None = None, experiment: str = "gancore") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.client: Any = None
        self._queue: list[Any] = []  # mlflow.entities.Metric
        self._pending: list[Any] = []  # RunOperations of background sends
        self._last_send = time.monotonic()
        self._resumed_last: dict[str, int] = {}  # metric key -> last step logged before this session
        self._image_last: dict[str, int] = {}
        self._finished = False

    def start(self, cfg: Config, run_dir: Path, run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (or reopen `run_id` when resuming); log params (flat config) and tags. Returns the run id."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        self.client, experiment_id = open_store(self.uri, self.experiment)
        self._queue, self._pending, self._resumed_last, self._image_last = [], [], {}, {}
        all_tags = {**run_tags(cfg, run_dir), **{k: str(v) for k, v in (tags or {}).items()}}
        params = {k: str(v) for k, v in flat(cfg).items()}  # MLflow stores param values as strings
        try:
            if run_id is None:
                run = self.client.create_run(experiment_id, run_name=cfg.name, tags=all_tags)
                self.run_id = run.info.run_id
                existing: dict[str, str] = {}
            else:
                try:
                    run = self.client.get_run(run_id)
                except MlflowException:
                    raise TrackingError(f"cannot resume MLflow run {run_id}: not found in {self.uri}") from None
                self.run_id = run_id
                existing = dict(run.data.params)
                # Read each history once so replayed steps after a crash are not logged twice.
                for key in run.data.metrics:
                    hist = self.client.get_metric_history(run_id, key)
                    if hist:
                        self._resumed_last[key] = max(m.step for m in hist)
                self._image_last = _image_steps(self.client, run_id)
                resumes = int(run.data.tags.get("gancore.resume_count", "0")) + 1
                all_tags["gancore.resume_count"] = str(resumes)
                self.client.update_run(run_id, status="RUNNING")
            # Params are immutable: on resume only new keys are logged (run length may legitimately change).
            changed = sorted(k for k in params if k in existing and existing[k] != params[k])
            if changed:
                log.warning("resumed run keeps its original params for: %s", ", ".join(changed))
            new_params = [Param(k, v) for k, v in params.items() if k not in existing]
            self.client.log_batch(
                self.run_id, params=new_params, tags=[RunTag(k, v) for k, v in all_tags.items()] if run_id else []
            )
            with tempfile.TemporaryDirectory() as tmp:
                save_yaml(cfg, Path(tmp) / "config.yaml")
                self.client.log_artifact(self.run_id, str(Path(tmp) / "config.yaml"))
        except MlflowException as e:
            raise TrackingError(f"MLflow store {self.uri}: {_one_line(e)}") from None
        self._finished = False
        self._last_send = time.monotonic()
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step`; steps at or below an already-logged step of a resumed run are dropped."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        step = int(step)
        for key, value in metrics.items():
            if step <= self._resumed_last.get(key, -(2**62)):
                continue
            self._queue.append(Metric(key, float(value), now_ms, step))
        if len(self._queue) >= FLUSH_EVERY_METRICS or time.monotonic() - self._last_send >= FLUSH_EVERY_S:
            self._send(synchronous=False)

    def _send(self, synchronous: bool) -> None:
        batch, self._queue = self._queue, []
        self._last_send = time.monotonic()
        if not batch or self.run_id is None:
            return
        op = self.client.log_batch(self.run_id, metrics=batch, synchronous=synchronous)
        if op is not None:
            self._pending.append(op)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An HWC uint8 image shown by step in the UI's image chart (stored under the run's images/ artifacts)."""
        key = _image_key(key)
        if int(step) <= self._image_last.get(key, -(2**62)):
            return
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]  # PIL has no HxWx1 mode
        self.client.log_image(self.run_id, image, key=key, step=int(step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or a folder's files) stored with the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags in one request."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        """Send what is queued and wait for background sends; a failure is logged, not raised (training goes on)."""
        if self.client is None:
            return
        pending, self._pending = self._pending, []
        errors = []
        for op in pending:
            try:
                op.wait()
            except Exception as e:
                errors.append(e)
        try:
            self._send(synchronous=True)
        except Exception as e:
            errors.append(e)
        # A tracking hiccup must not end a training run (its checkpoints are on disk): warn, go on.
        for e in errors:
            log.warning("MLflow metrics not logged: %s", _one_line(e))

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close the run (status FINISHED | FAILED | KILLED)."""
        if self.client is None or self.run_id is None or self._finished:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.flush()
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            log.warning("MLflow run %s not closed: %s", self.run_id, _one_line(e))
        self._finished = True


def make_tracker(cfg: Config, is_main: bool) -> Tracker:
    """The tracker for this process."""
    if not is_main or not cfg.track.enabled:
        return NullTracker()
    return MLflowTracker(cfg.track.uri, cfg.track.experiment)


# ----------------------------------------------------------------------------------------------------------------
# Reading runs back (jobs/runs.py, jobs/eval.py)


def _existing_client(uri: str | None) -> tuple[Any, str]:
    """A client on an existing store; never creates an empty database just to list nothing."""
    uri = resolve_uri(uri)
    check_reachable(uri)
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db}; train a run first, or pass --uri / set MLFLOW_TRACKING_URI")
    return _client(uri), uri


def open_run_info(run_id: str, uri: str | None = None) -> dict[str, Any]:
    """A run's id, name, status, experiment, artifact URI, run_dir, params, tags and last metric values."""
    from mlflow.exceptions import MlflowException

    client, uri = _existing_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"MLflow run {run_id!r} not found in {uri}") from None
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "artifact_uri": run.info.artifact_uri,
        "run_dir": run.data.tags.get("gancore.run_dir"),
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
    }


RUN_PARAMS = ("family", "model.arch", "optim.lr_g", "model.nz", "optim.d_iters")


def list_runs(experiment: str = "gancore", sort: str | None = None, limit: int = 20, uri: str | None = None) -> list[dict[str, Any]]:
    """Rows for the runs table: newest first, or by metric `sort` ascending (`-NAME`: descending)."""
    from mlflow.exceptions import MlflowException

    client, uri = _existing_client(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise TrackingError(f"no experiment {experiment!r} in {uri}; known: {known}")
        order = ["attributes.start_time DESC"]
        if sort:
            name, direction = (sort[1:], "DESC") if sort.startswith("-") else (sort, "ASC")
            order = [f"metrics.`{name}` {direction}"]
        runs = client.search_runs([exp.experiment_id], order_by=order, max_results=limit)
        rows = []
        for run in runs:
            metrics = run.data.metrics
            best = None
            for key in (k for k in metrics if k.startswith("fid_")):
                value = min(m.value for m in client.get_metric_history(run.info.run_id, key))
                if best is None or value < best[1]:
                    best = (key, value)
            rows.append({
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "params": {k: run.data.params.get(k) for k in RUN_PARAMS},
                "loss_d": metrics.get("Loss/D"),
                "loss_g": metrics.get("Loss/G"),
                "best_fid": best,
                "sort_value": metrics.get(sort.lstrip("-")) if sort else None,
            })
    except MlflowException as e:
        raise TrackingError(f"MLflow store {uri}: {_one_line(e)}") from None
    return rows


def runs_table(experiment: str = "gancore", sort: str | None = None, limit: int = 20, uri: str | None = None) -> Any:
    """A rich Table of an experiment's runs: key params, last losses, best FID."""
    from rich.table import Table

    rows = list_runs(experiment, sort, limit, uri)
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    table = Table(title=f"MLflow experiment {experiment!r} ({len(rows)} runs)")
    for col in ("run", "name", "status", *RUN_PARAMS, "Loss/D", "Loss/G", "best fid_*"):
        table.add_column(col, justify="right" if col in ("Loss/D", "Loss/G", "best fid_*") else "left")
    if sort and sort.lstrip("-") not in ("Loss/D", "Loss/G"):
        table.add_column(sort.lstrip("-"), justify="right")
    for r in rows:
        best = f"{r['best_fid'][1]:.4g} ({r['best_fid'][0]})" if r["best_fid"] else "-"
        cells = [r["run_id"][:8], r["name"] or "", r["status"], *(r["params"][k] or "-" for k in RUN_PARAMS)]
        cells += [fmt(r["loss_d"]), fmt(r["loss_g"]), best]
        if sort and sort.lstrip("-") not in ("Loss/D", "Loss/G"):
            cells.append(fmt(r["sort_value"]))
        table.add_row(*cells)
    return table
