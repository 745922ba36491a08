"""Experiment tracking behind a small interface: the trainer records, a sender sends.

The trainer only calls `Tracker` methods; off the main process or with track.enabled=false it gets a NullTracker.
`MLflowTracker` is the recorder: it opens the run (store.open_run: new, or resumed), drops what a resumed run already
holds, and hands every record to the run dir's outbox (outbox.py) and its background Sender (sender.py), so a
tracking server that comes and goes never blocks or ends the training; what a run could not deliver is sent later by
`python jobs/sync.py RUN_DIR`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gancore.config import Config, save_yaml
from gancore.errors import TrackingError
from gancore.tracking.outbox import Outbox, describe
from gancore.tracking.sender import Sender, quick_http_failures, reason
from gancore.tracking.store import (
    NEVER,
    existing_client,
    get_run,
    metric_last_steps,
    one_line,
    open_run,
    resolve_uri,
    store_errors,
)
from gancore.tracking.system import SystemMetrics, dataset_entry

log = logging.getLogger(__name__)

_IMAGE_KEY_OK = re.compile(r"[^A-Za-z0-9_\-./ ]")  # characters MLflow refuses in image keys


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

    def log_generator(self, family: Any) -> None:
        """A finished run's generator (EMA when on) as the MLflow model `generator` (gancore/tracking/models.py)."""

    def log_dataset(self, data: Any, x: Any, y: Any, context: str = "train") -> None:
        """The run's data (a DataConfig and its uint8 images/labels) as an MLflow dataset input with a content digest."""

    def flush(self) -> None:
        """Send what is queued."""

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close the run (status FINISHED | FAILED | KILLED)."""


class NullTracker(Tracker):
    """Does nothing: off the main process, or tracking disabled."""


def _image_key(key: str) -> str:
    return _IMAGE_KEY_OK.sub("_", key)


class MLflowTracker(Tracker):
    """Records into one MLflow run through the run dir's outbox: every record is appended to disk, then a Sender
    (sender.py) delivers it in the background. With the server away, finish() waits up to
    $GANCORE_TRACK_FINISH_WAIT_S for it, then leaves the rest in the outbox for `python jobs/sync.py RUN_DIR`.
    """

    def __init__(self, uri: str | None = None, experiment: str = "gancore") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.client: Any = None
        self.run_dir: Path | None = None
        self.outbox: Outbox | None = None
        self.kept: Path | None = None  # the outbox left behind by finish() when the server did not come back
        self._metric_last: dict[str, int] = {}  # metric key -> last step logged before this session
        self._image_last: dict[str, int] = {}
        self._finished = False
        self._sender: Sender | None = None
        self._system: SystemMetrics | None = None
        self._deferred_model: Any = None  # the family whose generator waits for the server (log_generator)

    def start(self, cfg: Config, run_dir: Path, run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (or reopen `run_id` when resuming); log params (the run family's hyper-parameters) and tags. Returns the run id."""
        quick_http_failures()
        run_dir = Path(run_dir)
        left = Outbox.find(run_dir)
        if left is not None and left.header().get("run_id") != run_id:
            raise TrackingError(
                f"{left.dir} holds tracking data of MLflow run {left.header().get('run_id')} not yet delivered; "
                f"send it first with: python jobs/sync.py {run_dir}, or train into another --out"
            )
        if left is not None:
            left.lock()  # a live process still delivering it: a one-line error before the run is touched
        run = open_run(self.uri, self.experiment, cfg, run_dir, run_id, tags)
        self.client, self.run_id, self.run_dir, self.kept, self._finished = run.client, run.run_id, run_dir, None, False
        self._metric_last, self._image_last = run.metric_last, run.image_last
        # From here on everything goes through the outbox; a resumed run first delivers what its last session left.
        self.outbox = left or Outbox.create(run_dir, self.run_id, self.uri)
        pending = self.outbox.pending() if left else []
        for rec in pending:  # they will be delivered: a replayed step after them is not logged a second time
            if rec.get("kind") == "metrics":
                for k in rec["values"]:
                    self._metric_last[k] = max(self._metric_last.get(k, NEVER), int(rec["step"]))
            elif rec.get("kind") == "image":
                self._image_last[rec["key"]] = max(self._image_last.get(rec["key"], NEVER), int(rec["step"]))
        self._sender = Sender(self.client, self.run_id, self.uri, self.outbox, pending)
        self._put({"kind": "params_tags", "params": run.params, "tags": run.tags})
        with tempfile.TemporaryDirectory() as tmp:
            save_yaml(cfg, Path(tmp) / "config.yaml")
            self._put({"kind": "artifact", "name": "config.yaml", "artifact_path": None,
                       "file": self.outbox.copy_file(Path(tmp) / "config.yaml", "config.yaml")})
        self._sender.start()
        if cfg.track.system_metrics:
            self._start_system_metrics()
        return self.run_id

    def _start_system_metrics(self) -> None:
        """MLflow's system-metrics monitors, logged through the outbox like everything else (see SystemMetrics).

        A resumed run goes on after its last system step. In a multi-process run (only the main process logs) the
        keys and the tag gancore.system_metrics_node say which node was measured: system/<node>/...
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        node = os.environ.get("MLFLOW_SYSTEM_METRICS_NODE_ID") or (
            f"node{os.environ.get('GROUP_RANK') or os.environ.get('NODE_RANK') or os.environ.get('SLURM_NODEID', '0')}"
            if world > 1 else None)
        first = 1 + max((s for k, s in self._metric_last.items() if k.startswith("system/")), default=-1)
        try:
            self._system = SystemMetrics(self.log_metrics, first, node, self.run_id, self.uri)
        except Exception as e:  # noqa: BLE001 - a machine psutil cannot read must not stop the training
            log.warning("MLflow system metrics off: %s", one_line(e))
            return
        self.set_tags({"gancore.system_metrics_node": f"{node or 'node0'} ({socket.gethostname()})"})
        self._system.start()

    # -- what the trainer calls: hand a record to the outbox and the sender, return

    def _put(self, rec: dict[str, Any]) -> None:
        if self._sender is not None and not self._finished:
            self._sender.put(rec)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step`; steps at or below an already-logged step of a resumed run are dropped."""
        step = int(step)
        values = {k: float(v) for k, v in metrics.items() if step > self._metric_last.get(k, NEVER)}
        if values:
            self._put({"kind": "metrics", "step": step, "time": int(time.time() * 1000), "values": values})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An HWC uint8 image shown by step in the UI's image chart (stored under the run's images/ artifacts)."""
        key, step = _image_key(key), int(step)
        if step <= self._image_last.get(key, NEVER) or self.outbox is None:
            return
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]  # PIL has no HxWx1 mode
        try:
            rel = self.outbox.save_array(f"{key.replace('/', '~')}+{step}+{time.monotonic_ns()}", image)
        except OSError as e:
            log.warning("sample grid %s at step %d not kept for MLflow (%s)", key, step, one_line(e))
            return
        self._put({"kind": "image", "key": key, "step": step, "time": int(time.time() * 1000), "file": rel})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (or a folder's files) stored with the run; sent from its place in the run dir."""
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags in one request."""
        self._put({"kind": "params_tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dataset(self, data: Any, x: Any, y: Any, context: str = "train") -> None:
        """The run's data as an MLflow dataset input (the UI's Datasets column), through the outbox."""
        self._put({"kind": "dataset", "context": context, **dataset_entry(data, x, y)})

    def log_generator(self, family: Any) -> None:
        """Log the generator as runs:/<run id>/generator (registered as track.register_model when set) once what is
        queued is delivered; with the server away or refusing it, skip it with a one-line warning (never fails)."""
        if self.run_id is None or self._finished or self._sender is None:
            return
        from gancore.tracking.models import log_generator_model

        self.flush()
        if self._sender.in_outage:  # the outage was warned about once: log it in finish(), if it comes back
            self._deferred_model = family
            return
        try:
            log_generator_model(self.uri, self.run_id, family, family.cfg.track.register_model)
            return
        except Exception as e:  # noqa: BLE001 - the run's training is done and saved: never fail it here
            why = reason(e)
        log.warning("generator of run %s not logged as an MLflow model (%s); its checkpoint in %s samples with: "
                    "python jobs/generate.py %s", self.run_id, why, self.run_dir, self.run_dir)

    def flush(self) -> None:
        """Send what is queued and wait for it, unless the server is away (then it stays queued; training goes on)."""
        if self._sender is not None:
            self._sender.flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver everything and close the run (status FINISHED | FAILED | KILLED); with the server away for longer
        than $GANCORE_TRACK_FINISH_WAIT_S, keep the rest in the outbox and say so in one line."""
        if self.client is None or self.run_id is None or self._finished or self._sender is None:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._system is not None:  # its last sample goes out before the status
            self._system.stop()
            self._system = None
        self._put({"kind": "status", "status": status})
        left = self._sender.close()
        self._finished = True
        assert self.outbox is not None
        family, self._deferred_model = self._deferred_model, None
        if not left:
            self.outbox.remove()
            if family is not None:  # the server is back: the generator deferred during the outage goes now
                self._finished = False
                self.log_generator(family)
                self._finished = True
            return
        self.outbox.close()
        self.kept = self.outbox.dir
        model = "" if family is None else " (not the generator model: jobs/generate.py samples from the run dir)"
        log.warning("MLflow server at %s did not come back: %s of run %s%s kept in %s; send them with: "
                    "python jobs/sync.py %s", self.uri, describe(left), self.run_id, model, self.kept, self.run_dir)


def make_tracker(cfg: Config, is_main: bool) -> Tracker:
    """The tracker for this process."""
    if not is_main or not cfg.track.enabled:
        return NullTracker()
    return MLflowTracker(cfg.track.uri, cfg.track.experiment)


def _new_metrics(metrics: dict[str, float], step: int, last: dict[str, int]) -> list[Any]:
    """mlflow Metric entities for `metrics` at `step`, leaving out keys already logged at `step` or later."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    step = int(step)
    return [Metric(k, float(v), now_ms, step) for k, v in metrics.items() if step > last.get(k, NEVER)]


def log_to_run(run_id: str, metrics: dict[str, float], step: int, uri: str | None = None,
               protocol: tuple[str, str] | None = None) -> None:
    """Log `metrics` at `step` into the existing run `run_id` (e.g. a later evaluation), leaving its status as it is.

    As on resume, a key already logged at `step` or later is not logged again. `protocol`: (tag key, JSON) of how the
    metrics were measured (gancore.metrics.protocol); a run whose metrics of that name were measured otherwise (another
    extractor file, reference set, ...) is refused before anything is logged, so one key never mixes two protocols.
    """
    import json

    client, uri = existing_client(uri)
    run = get_run(client, run_id, uri)
    if protocol is not None and protocol[0] in run.data.tags and run.data.tags[protocol[0]] != protocol[1]:
        old, new = json.loads(run.data.tags[protocol[0]]), json.loads(protocol[1])
        differ = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k))
        raise TrackingError(f"run {run_id} holds {protocol[0].rsplit('.', 1)[-1]} metrics measured under another "
                            f"protocol ({differ}); evaluate with the same settings or do not log (--no-log)")
    with store_errors(uri):
        batch = _new_metrics(metrics, step, metric_last_steps(client, run))
        if batch:
            client.log_batch(run_id, metrics=batch)
        if protocol is not None and batch:
            client.set_tag(run_id, *protocol)
