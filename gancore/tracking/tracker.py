"""Experiment tracking behind a small interface (MLflow implementation: see issue "MLflow tracking").

The trainer only calls `Tracker` methods; off the main process or with track.enabled=false it gets a NullTracker.
Which store a run goes to, and the tags saying what it ran with: store.py. A tracking server that comes and goes
(issue #20): everything logged goes through the run dir's outbox (outbox.py) and a background sender, so an outage
never blocks or ends the training, and what a run could not deliver is sent later by `python jobs/sync.py RUN_DIR`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from gancore.config import Config, hyperparams, save_yaml
from gancore.errors import TrackingError
from gancore.tracking.outbox import Delivery, Outbox, describe, next_batch
from gancore.tracking.system import SystemMetrics, dataset_entry
from gancore.tracking.store import (
    check_reachable,
    existing_client,
    get_run,
    one_line,
    open_store,
    resolve_uri,
    run_tags,
    store_errors,
)

log = logging.getLogger(__name__)

FLUSH_EVERY_METRICS = 1000  # queued values that trigger a background send (MLflow's per-request metric limit)
FLUSH_EVERY_S = 10.0  # ... or seconds since the last send, so the UI's curves stay live
HTTP_MAX_RETRIES = 2  # MLflow client's own retries per request (its default 7 with backoff 2 takes ~4 minutes)
HTTP_TIMEOUT_S = 10  # per request; MLflow's default is 120
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0  # our retries during an outage: backoff between probes of the server
FINISH_WAIT_S = 60.0  # how long finish() waits for an absent server before leaving the rest in the outbox
REFUSED_TRIES = 3  # a send the (reachable) store rejects this often is dropped with a warning
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


def _env_s(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def _quick_http_failures() -> None:
    """One failed request takes seconds, not MLflow's minutes of retries: our sender retries for as long as needed.

    setdefault: a value the user exported wins.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


class MLflowTracker(Tracker):
    """Logs to MLflow through the run dir's outbox (outbox.py): every record is appended to disk, then a
    background thread delivers it (metrics in batches; images, artifacts, tags as they come).

    The training thread never waits on the network. When the server goes away, the sender warns once, keeps
    retrying with backoff and delivers everything once it is back; finish() waits up to
    $GANCORE_TRACK_FINISH_WAIT_S for it, then leaves the rest in the outbox for `python jobs/sync.py RUN_DIR`.
    """

    def __init__(self, uri: str | None = None, experiment: str = "gancore") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.client: Any = None
        self.run_dir: Path | None = None
        self.outbox: Outbox | None = None
        self.kept: Path | None = None  # the outbox left behind by finish() when the server did not come back
        self._resumed_last: dict[str, int] = {}  # metric key -> last step logged before this session
        self._image_last: dict[str, int] = {}
        self._finished = False
        self._cv = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()  # records in the outbox, not yet delivered
        self._queued_values = 0  # metric values in _queue
        self._thread: threading.Thread | None = None
        self._system: SystemMetrics | None = None
        self._deferred_model: Any = None  # the family whose generator waits for the server (log_generator)

    def start(self, cfg: Config, run_dir: Path, run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        """Create a run (or reopen `run_id` when resuming); log params (the run family's hyper-parameters) and tags. Returns the run id."""
        _quick_http_failures()
        run_dir = Path(run_dir)
        left = Outbox.find(run_dir)
        if left is not None and left.header().get("run_id") != run_id:
            raise TrackingError(
                f"{left.dir} holds tracking data of MLflow run {left.header().get('run_id')} not yet delivered; "
                f"send it first with: python jobs/sync.py {run_dir}, or train into another --out"
            )
        if left is not None:
            left.lock()  # a live process still delivering it: a one-line error before the run is touched
        self.client, experiment_id = open_store(self.uri, self.experiment)
        self._resumed_last, self._image_last, self.kept = {}, {}, None
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
        # From here on everything goes through the outbox; a resumed run first delivers what its last session left.
        self.run_dir = run_dir
        self.outbox = left or Outbox.create(run_dir, self.run_id, self.uri)
        pending = self.outbox.pending() if left else []
        self._queue, self._queued_values = deque(), 0
        self._finished, self._closing, self._flush_wanted = False, False, False
        self._give_up_at = float("inf")
        self._outage_since: float | None = None
        self._warned_append = False
        self._sender = Delivery(self.client, self.run_id, self.outbox)
        self._cursor = self.outbox.delivered()  # journal lines delivered
        self._verify = bool(pending)  # an earlier session's records may be in the store already
        self._last_send = time.monotonic()
        self._retry_max_s = _env_s("GANCORE_TRACK_RETRY_MAX_S", RETRY_MAX_S)
        self._finish_wait_s = _env_s("GANCORE_TRACK_FINISH_WAIT_S", FINISH_WAIT_S)
        for rec in pending:  # they will be delivered: a replayed step after them is not logged a second time
            self._enqueue(rec)
            if rec.get("kind") == "metrics":
                for k in rec["values"]:
                    self._resumed_last[k] = max(self._resumed_last.get(k, _NEVER), int(rec["step"]))
            elif rec.get("kind") == "image":
                self._image_last[rec["key"]] = max(self._image_last.get(rec["key"], _NEVER), int(rec["step"]))
        self._put({"kind": "params_tags", "params": {k: v for k, v in params.items() if k not in existing},
                   "tags": all_tags if run_id else {}})
        with tempfile.TemporaryDirectory() as tmp:
            save_yaml(cfg, Path(tmp) / "config.yaml")
            self._put({"kind": "artifact", "name": "config.yaml", "artifact_path": None,
                       "file": self.outbox.copy_file(Path(tmp) / "config.yaml", "config.yaml")})
        self._thread = threading.Thread(target=self._deliver_loop, name="gancore-tracking", daemon=True)
        self._thread.start()
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
        first = 1 + max((s for k, s in self._resumed_last.items() if k.startswith("system/")), default=-1)
        try:
            self._system = SystemMetrics(self.log_metrics, first, node, self.run_id, self.uri)
        except Exception as e:  # noqa: BLE001 - a machine psutil cannot read must not stop the training
            log.warning("MLflow system metrics off: %s", one_line(e))
            return
        self.set_tags({"gancore.system_metrics_node": f"{node or 'node0'} ({socket.gethostname()})"})
        self._system.start()

    # -- what the trainer calls: append to the outbox, queue for the sender, return

    def _enqueue(self, rec: dict[str, Any]) -> None:
        self._queue.append(rec)
        if rec.get("kind") == "metrics":
            self._queued_values += len(rec["values"])

    def _put(self, rec: dict[str, Any]) -> None:
        if self.outbox is None or self._finished:
            return
        with self._cv:  # one lock for journal and queue: the system-metrics thread logs too, and line N = record N
            try:
                self.outbox.append(rec)
            except OSError as e:  # a full disk must not end the run either: the record is still sent from memory
                if not self._warned_append:
                    log.warning("tracking outbox %s not writable (%s); records are kept in memory only",
                                self.outbox.dir, one_line(e))
                    self._warned_append = True
            self._enqueue(rec)
            self._cv.notify_all()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at `step`; steps at or below an already-logged step of a resumed run are dropped."""
        step = int(step)
        values = {k: float(v) for k, v in metrics.items() if step > self._resumed_last.get(k, _NEVER)}
        if values:
            self._put({"kind": "metrics", "step": step, "time": int(time.time() * 1000), "values": values})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An HWC uint8 image shown by step in the UI's image chart (stored under the run's images/ artifacts)."""
        key, step = _image_key(key), int(step)
        if step <= self._image_last.get(key, _NEVER) or self.outbox is None:
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
        if self.run_id is None or self._finished:
            return
        from gancore.tracking.models import log_generator_model

        self.flush()
        if self._outage_since is not None:  # the outage was warned about once: log it in finish(), if it comes back
            self._deferred_model = family
            return
        try:
            log_generator_model(self.uri, self.run_id, family, family.cfg.track.register_model)
            return
        except Exception as e:  # noqa: BLE001 - the run's training is done and saved: never fail it here
            why = _reason(e)
        log.warning("generator of run %s not logged as an MLflow model (%s); its checkpoint in %s samples with: "
                    "python jobs/generate.py %s", self.run_id, why, self.run_dir, self.run_dir)

    def flush(self) -> None:
        """Send what is queued and wait for it, unless the server is away (then it stays queued; training goes on)."""
        if self._thread is None:
            return
        with self._cv:
            self._flush_wanted = True
            self._cv.notify_all()
            while self._queue and self._outage_since is None and self._thread.is_alive():
                self._cv.wait(0.5)
            self._flush_wanted = False

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver everything and close the run (status FINISHED | FAILED | KILLED); with the server away for longer
        than $GANCORE_TRACK_FINISH_WAIT_S, keep the rest in the outbox and say so in one line."""
        if self.client is None or self.run_id is None or self._finished or self._thread is None:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._system is not None:  # its last sample goes out before the status
            self._system.stop()
            self._system = None
        self._put({"kind": "status", "status": status})
        with self._cv:
            self._closing = True
            self._give_up_at = time.monotonic() + self._finish_wait_s
            self._cv.notify_all()
        self._thread.join()
        self._finished = True
        assert self.outbox is not None
        family, self._deferred_model = self._deferred_model, None
        if not self._queue:
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
                    "python jobs/sync.py %s", self.uri, describe(list(self._queue)), self.run_id, model, self.kept,
                    self.run_dir)

    # -- the sender thread

    def _due(self) -> bool:
        """Whether the head of the queue should be sent now (metrics wait for a full batch or FLUSH_EVERY_S)."""
        if not self._queue:
            return False
        return (self._closing or self._flush_wanted or self._queued_values >= FLUSH_EVERY_METRICS
                or any(r.get("kind") != "metrics" for r in self._queue)
                or time.monotonic() - self._last_send >= FLUSH_EVERY_S)

    def _deliver_loop(self) -> None:
        refused = 0  # failed sends of the head batch while the server answers (a request it rejects)
        backoff = RETRY_MIN_S
        while True:
            with self._cv:
                while not self._due():
                    if self._closing and not self._queue:
                        return
                    self._cv.wait(timeout=min(FLUSH_EVERY_S, 1.0) if self._queue else None)
                batch = next_batch(self._queue)
                verify = self._verify
            try:
                self._sender.send(batch, verify)
            except Exception as e:  # noqa: BLE001 - nothing the store does may end the training run
                self._verify = True  # the request may have reached the store: check before sending again
                self._sender.forget()
                if self._server_answers():
                    refused += 1
                    if refused < REFUSED_TRIES:
                        time.sleep(RETRY_MIN_S)
                        continue
                    log.warning("MLflow refused %s of run %s (%s); not retried", describe(batch), self.run_id,
                                one_line(e))
                else:
                    if not self._wait_for_server(e, backoff):
                        return  # finish() gave up waiting: the rest stays in the outbox
                    backoff = min(backoff * 2, max(self._retry_max_s, RETRY_MIN_S))
                    continue
            refused, backoff = 0, RETRY_MIN_S
            with self._cv:
                for _ in batch:
                    rec = self._queue.popleft()
                    if rec.get("kind") == "metrics":
                        self._queued_values -= len(rec["values"])
                self._cursor += len(batch)
                delivered_upto = self._cursor
                self._last_send = time.monotonic()
                self._verify = False
                if self._outage_since is not None:
                    log.info("MLflow server at %s is back after %.0f s; sending what was kept", self.uri,
                             time.monotonic() - self._outage_since)
                    self._outage_since = None
                self._cv.notify_all()
            if self.outbox is not None:
                try:
                    self.outbox.mark_delivered(batch, delivered_upto)
                except OSError:  # a record sent twice later is left out by verification
                    pass

    def _server_answers(self) -> bool:
        try:
            check_reachable(self.uri)
            return True
        except TrackingError:
            return False

    def _wait_for_server(self, error: Exception, backoff: float) -> bool:
        """Outage: warn (once per outage), then wait until the server answers. False when finish() gives up."""
        with self._cv:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                self._cv.notify_all()  # a waiting flush() returns
                log.warning("MLflow server at %s unreachable (%s); training goes on, tracking data is kept in %s "
                            "and sent when the server is back", self.uri, _reason(error), self.outbox and self.outbox.dir)
        delay = backoff
        while True:
            with self._cv:
                if self._closing and time.monotonic() >= self._give_up_at:
                    return False
                wait = delay if not self._closing else min(delay, max(0.0, self._give_up_at - time.monotonic()))
                self._cv.wait(timeout=wait)
                if self._closing and time.monotonic() >= self._give_up_at:
                    return False
            if self._server_answers():
                return True
            delay = min(delay * 2, max(self._retry_max_s, RETRY_MIN_S))


def _reason(e: Exception) -> str:
    """The short cause of a failed send (MLflow wraps urllib3's 'Max retries exceeded ... Connection refused')."""
    text = one_line(e)
    for cause in ("Connection refused", "timed out", "Name or service not known", "Connection reset",
                  "Remote end closed connection", "Connection aborted"):
        if cause.lower() in text.lower():
            return cause.lower()
    return text[:120]


def make_tracker(cfg: Config, is_main: bool) -> Tracker:
    """The tracker for this process."""
    if not is_main or not cfg.track.enabled:
        return NullTracker()
    return MLflowTracker(cfg.track.uri, cfg.track.experiment)


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
        batch = _new_metrics(metrics, step, _metric_steps(client, run))
        if batch:
            client.log_batch(run_id, metrics=batch)
        if protocol is not None and batch:
            client.set_tag(run_id, *protocol)
