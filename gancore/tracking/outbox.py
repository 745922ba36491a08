"""The tracking outbox: what a run logged, kept on disk until the MLflow store has it, and how a record is delivered.

Every record the tracker is given is appended here before the trainer goes on, and a background sender
(sender.py) delivers the records in order; a tracking server that goes away only delays delivery. What a run
could not deliver stays in the run dir, and `python jobs/sync.py RUN_DIR` (sender.sync_run_dir) sends it later.

    <run dir>/tracking_outbox/
        run.json        {"run_id", "uri"}: where the records go (atomic write)
        journal.jsonl   one JSON record per line, appended and flushed to the OS before log_* returns, so a
                        kill -9 loses nothing already written (a torn last line is ignored)
        cursor.json     {"delivered": N}: the first N journal lines are in the store (atomic write)
        files/          sample grids (.npy) and files the tracker copied (config.yaml); deleted once delivered
        .lock           flock held by whoever delivers: the run's tracker, or jobs/sync.py

Delivery is idempotent: after a failed send (the request may have reached the store) and in sync, a metric
(key, step) or an image step the store already holds is not logged again; artifacts overwrite themselves, params
with equal values and tags are accepted twice by MLflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np

from gancore.errors import TrackingError
from gancore.io import atomic_write
from gancore.tracking.store import stored_image_steps

log = logging.getLogger(__name__)

OUTBOX_DIR = "tracking_outbox"
MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_REQUEST = 100


def outbox_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / OUTBOX_DIR


class Outbox:
    """One run's on-disk journal of tracking records and how many of them are delivered."""

    def __init__(self, path: Path) -> None:
        self.dir = path
        self._journal: IO[str] | None = None
        self._lock: IO[str] | None = None

    # -- opening, locking, removing

    @classmethod
    def create(cls, run_dir: Path, run_id: str, uri: str) -> Outbox:
        """A new, empty outbox for `run_id` (locked by this process)."""
        box = cls(outbox_dir(run_dir))
        (box.dir / "files").mkdir(parents=True, exist_ok=True)
        box.lock()
        atomic_write(box.dir / "run.json", json.dumps({"run_id": run_id, "uri": uri}))
        atomic_write(box.dir / "cursor.json", json.dumps({"delivered": 0}))
        (box.dir / "journal.jsonl").touch()
        return box

    @classmethod
    def find(cls, run_dir: Path) -> Outbox | None:
        """The run dir's outbox, or None when it has none."""
        box = cls(outbox_dir(run_dir))
        return box if (box.dir / "run.json").is_file() else None

    def header(self) -> dict[str, str]:
        return json.loads((self.dir / "run.json").read_text())

    def lock(self) -> None:
        """Take the delivery lock; a TrackingError when another live process holds it."""
        if self._lock is not None:
            return
        fh = open(self.dir / ".lock", "a+")  # noqa: SIM115 - held open: the flock lasts as long as the file
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise TrackingError(
                f"{self.dir} is in use by another process (a training run still delivering it, or another sync); "
                "wait for it to end"
            ) from None
        self._lock = fh

    def close(self) -> None:
        """Flush the journal to disk and release the lock (the outbox stays)."""
        if self._journal is not None:
            self._journal.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def remove(self) -> None:
        """Delete the outbox (everything in it is delivered)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the journal

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line and hand it to the OS (a kill -9 after this keeps it)."""
        if self._journal is None:
            self._journal = open(self.dir / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self._journal.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._journal.flush()

    def save_array(self, name: str, array: np.ndarray) -> str:
        """Store an image array under files/ (atomic); returns its path relative to the outbox."""
        rel = f"files/{name}.npy"
        atomic_write(self.dir / rel, lambda fh: np.save(fh, array, allow_pickle=False))
        return rel

    def copy_file(self, src: Path, name: str) -> str:
        """Keep a copy of `src` under files/<name> (a file that may change or vanish before delivery)."""
        rel = f"files/{name}"
        atomic_write(self.dir / rel, src.read_bytes())
        return rel

    def delivered(self) -> int:
        try:
            return int(json.loads((self.dir / "cursor.json").read_text())["delivered"])
        except (OSError, ValueError, KeyError):
            return 0

    def records(self) -> list[dict[str, Any]]:
        """Every complete journal record, in order; a torn last line (a kill during a write) is cut off."""
        path = self.dir / "journal.jsonl"
        data = path.read_bytes() if path.is_file() else b""
        good = data.rfind(b"\n") + 1  # a last line without its newline was never completely written
        if good < len(data):
            with open(path, "r+b") as fh:
                fh.truncate(good)
        out = []
        for line in data[:good].decode("utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"kind": "corrupt"})  # keeps the line count (the cursor) right; delivery skips it
        return out

    def pending(self) -> list[dict[str, Any]]:
        """The records not yet delivered."""
        return self.records()[self.delivered() :]

    def mark_delivered(self, records: list[dict[str, Any]], upto: int) -> None:
        """The first `upto` journal lines are in the store; their outbox files are no longer needed."""
        atomic_write(self.dir / "cursor.json", json.dumps({"delivered": upto}))
        for rec in records:
            if rec.get("file"):
                (self.dir / rec["file"]).unlink(missing_ok=True)


def describe(records: list[dict[str, Any]]) -> str:
    """'12 metric values, 2 images, 3 artifacts, 1 tag/param batch, the run status' (what is left)."""
    n = {"metrics": 0, "image": 0, "artifact": 0, "params_tags": 0, "status": 0}
    for r in records:
        kind = r.get("kind")
        if kind in n:
            n[kind] += len(r["values"]) if kind == "metrics" else 1
    parts = [f"{n['metrics']} metric values", f"{n['image']} images", f"{n['artifact']} artifacts"]
    if n["params_tags"]:
        parts.append(f"{n['params_tags']} param/tag batches")
    if n["status"]:
        parts.append("the run status")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Sending records to the store


class Delivery:
    """Sends outbox records to one MLflow run; with verify=True, leaves out what the store already holds."""

    def __init__(self, client: Any, run_id: str, box: Outbox) -> None:
        self.client, self.run_id, self.box = client, run_id, box
        self._metric_steps: dict[str, set[int]] = {}  # key -> steps in the store (filled on demand when verifying)
        self._image_steps: dict[str, set[int]] | None = None
        self.sent = {"metrics": 0, "image": 0, "artifact": 0, "params_tags": 0, "dataset": 0, "status": 0}
        self.skipped = 0  # already in the store
        self.missing: list[str] = []  # artifacts whose files are gone

    def forget(self) -> None:
        """The store's state is unknown again (a send failed half-way): re-read it before the next verified send."""
        self._metric_steps, self._image_steps = {}, None

    def send(self, records: list[dict[str, Any]], verify: bool) -> None:
        """Deliver `records` (consecutive metrics records, or one other record); raises what the client raises."""
        if records[0].get("kind") == "metrics":
            self._send_metrics(records, verify)
            return
        for rec in records:
            getattr(self, f"_send_{rec.get('kind')}", self._send_unknown)(rec, verify)

    def _stored_steps(self, key: str) -> set[int]:
        if key not in self._metric_steps:
            self._metric_steps[key] = {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}
        return self._metric_steps[key]

    def _send_metrics(self, records: list[dict[str, Any]], verify: bool) -> None:
        from mlflow.entities import Metric

        batch = []
        for rec in records:
            step, ts = int(rec["step"]), int(rec["time"])
            for k, v in rec["values"].items():
                if verify and step in self._stored_steps(k):
                    self.skipped += 1
                    continue
                batch.append(Metric(k, float(v), ts, step))
        for i in range(0, len(batch), MAX_METRICS_PER_REQUEST):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_REQUEST])
        for m in batch:
            if m.key in self._metric_steps:
                self._metric_steps[m.key].add(m.step)
        self.sent["metrics"] += len(batch)

    def _stored_image_steps(self) -> dict[str, set[int]]:
        if self._image_steps is None:
            self._image_steps = stored_image_steps(self.client, self.run_id)
        return self._image_steps

    def _send_image(self, rec: dict[str, Any], verify: bool) -> None:
        key, step = rec["key"], int(rec["step"])
        if verify and step in self._stored_image_steps().get(key, set()):
            self.skipped += 1
            return
        path = self.box.dir / rec["file"]
        if not path.is_file():
            self.missing.append(str(path))
            return
        image = np.load(path, allow_pickle=False)
        self.client.log_image(self.run_id, image, key=key, step=step, timestamp=int(rec["time"]))
        if self._image_steps is not None:
            self._image_steps.setdefault(key, set()).add(step)
        self.sent["image"] += 1

    def _send_artifact(self, rec: dict[str, Any], verify: bool) -> None:
        path = self.box.dir / rec["file"] if rec.get("file") else Path(rec["path"])
        if not path.exists():
            self.missing.append(str(path))
            return
        artifact_path = rec.get("artifact_path")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif rec.get("file"):  # an outbox copy: upload it under its original name
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                named = Path(tmp) / rec["name"]
                shutil.copyfile(path, named)
                self.client.log_artifact(self.run_id, str(named), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        self.sent["artifact"] += 1

    def _send_params_tags(self, rec: dict[str, Any], verify: bool) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in rec.get("params", {}).items()]
        tags = [RunTag(k, v) for k, v in rec.get("tags", {}).items()]
        for i in range(0, max(len(params), len(tags)), MAX_PARAMS_TAGS_PER_REQUEST):
            j = slice(i, i + MAX_PARAMS_TAGS_PER_REQUEST)
            self.client.log_batch(self.run_id, params=params[j], tags=tags[j])
        self.sent["params_tags"] += 1

    def _send_dataset(self, rec: dict[str, Any], verify: bool) -> None:
        """The run's data as an MLflow dataset input (MLflow keeps one input per run and dataset: resent is no-op)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=rec["name"], digest=rec["digest"], source_type="gancore", source=rec["source"],
                     profile=json.dumps(rec["profile"]))
        self.client.log_inputs(self.run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", rec["context"])])])
        self.sent["dataset"] += 1

    def _send_status(self, rec: dict[str, Any], verify: bool) -> None:
        self.client.set_terminated(self.run_id, rec["status"])
        self.sent["status"] += 1

    def _send_unknown(self, rec: dict[str, Any], verify: bool) -> None:
        log.warning("tracking outbox %s: skipped an unreadable record %s", self.box.dir, str(rec)[:100])


def next_batch(queue: Any) -> list[dict[str, Any]]:
    """The records one send takes from the head of `queue`: consecutive metrics records (up to MLflow's per-request
    limit), or one other record."""
    if not queue:
        return []
    if queue[0].get("kind") != "metrics":
        return [queue[0]]
    batch, n = [], 0
    for rec in queue:
        if rec.get("kind") != "metrics" or (batch and n + len(rec["values"]) > MAX_METRICS_PER_REQUEST):
            break
        batch.append(rec)
        n += len(rec["values"])
    return batch
