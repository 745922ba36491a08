"""Experiment tracking behind a small interface (MLflow implementation: see issue "MLflow tracking").

The trainer only calls `Tracker` methods; off the main process or with track.enabled=false it gets a NullTracker.
Which store a run goes to, and the tags saying what it ran with: store.py.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gancore.config import Config, hyperparams, save_yaml
from gancore.tracking.store import existing_client, get_run, one_line, open_store, resolve_uri, run_tags, store_errors

log = logging.getLogger(__name__)

FLUSH_EVERY_METRICS = 1000  # queued values that trigger a background send (MLflow's per-request metric limit)
FLUSH_EVERY_S = 10.0  # ... or seconds since the last send, so the UI's curves stay live
_IMAGE_KEY_OK = re.compile(r"[^A-Za-z0-9_\-./ ]")  # characters MLflow refuses in image keys
_NEVER = -(2**62)  # "no step logged yet"


class Tracker:
    """Interface. Every method is cheap for the caller; implementations batch and send asynchronously."""

    run_id: str | None = None

    def start(self, cfg: Config, run_dir: Path, run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        """Create a run (or reopen `run_id` when resuming); log params (the run family's hyper-parameters) and tags. Returns the run id."""
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
# What a run already holds (a resumed run must not log a step twice)


def _metric_steps(client: Any, run: Any) -> dict[str, int]:
    """Last step per metric key already stored in `run` (each key's history read once)."""
    last: dict[str, int] = {}
    for key in run.data.metrics:
        hist = client.get_metric_history(run.info.run_id, key)
        if hist:
            last[key] = max(m.step for m in hist)
    return last


def _new_metrics(metrics: dict[str, float], step: int, last: dict[str, int]) -> list[Any]:
    """mlflow Metric entities for `metrics` at `step`, leaving out keys already logged at `step` or later."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    step = int(step)
    return [Metric(k, float(v), now_ms, step) for k, v in metrics.items() if step > last.get(k, _NEVER)]


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
                last[key] = max(last.get(key, _NEVER), int(parts[2]))
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
        """Create a run (or reopen `run_id` when resuming); log params (the run family's hyper-parameters) and tags. Returns the run id."""
        from mlflow.entities import Param, RunTag

        self.client, experiment_id = open_store(self.uri, self.experiment)
        self._queue, self._pending, self._resumed_last, self._image_last = [], [], {}, {}
        all_tags = {**run_tags(cfg, run_dir), **{k: str(v) for k, v in (tags or {}).items()}}
        params = {k: str(v) for k, v in hyperparams(cfg).items()}  # MLflow stores param values as strings
        with store_errors(self.uri):
            if run_id is None:
                run = self.client.create_run(experiment_id, run_name=cfg.name, tags=all_tags)
                self.run_id = run.info.run_id
                existing: dict[str, str] = {}
            else:
                run = get_run(self.client, run_id, self.uri, f"cannot resume MLflow run {run_id}: not found in {self.uri}")
                self.run_id = run_id
                existing = dict(run.data.params)
                # Read each history once so replayed steps after a crash are not logged twice.
                self._resumed_last = _metric_steps(self.client, run)
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
        self._finished = False
        self._last_send = time.monotonic()
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step`; steps at or below an already-logged step of a resumed run are dropped."""
        self._queue += _new_metrics(metrics, step, self._resumed_last)
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
        if int(step) <= self._image_last.get(key, _NEVER):
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
            log.warning("MLflow metrics not logged: %s", one_line(e))

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
            log.warning("MLflow run %s not closed: %s", self.run_id, one_line(e))
        self._finished = True


def make_tracker(cfg: Config, is_main: bool) -> Tracker:
    """The tracker for this process."""
    if not is_main or not cfg.track.enabled:
        return NullTracker()
    return MLflowTracker(cfg.track.uri, cfg.track.experiment)


def log_to_run(run_id: str, metrics: dict[str, float], step: int, uri: str | None = None) -> None:
    """Log `metrics` at `step` into the existing run `run_id` (e.g. a later evaluation), leaving its status as it is.

    As on resume, a key already logged at `step` or later is not logged again.
    """
    client, uri = existing_client(uri)
    run = get_run(client, run_id, uri)
    with store_errors(uri):
        batch = _new_metrics(metrics, step, _metric_steps(client, run))
        if batch:
            client.log_batch(run_id, metrics=batch)
