"""Sending a run's outbox records (outbox.py) to the MLflow store: while the run trains (`Sender`, a background
thread) or afterwards (`sync_run_dir`, for `python jobs/sync.py RUN_DIR`).

The training thread never waits on the network. When the server goes away, the Sender warns once, keeps retrying
with backoff and delivers everything once it is back; `close()` waits up to $GANCORE_TRACK_FINISH_WAIT_S for it,
then leaves the rest in the outbox for jobs/sync.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gancore.errors import TrackingError
from gancore.tracking.outbox import OUTBOX_DIR, Delivery, Outbox, describe, next_batch
from gancore.tracking.store import check_reachable, get_run, mlflow_client, one_line, store_errors

log = logging.getLogger(__name__)

FLUSH_EVERY_METRICS = 1000  # queued values that trigger a background send (MLflow's per-request metric limit)
FLUSH_EVERY_S = 10.0  # ... or seconds since the last send, so the UI's curves stay live
HTTP_MAX_RETRIES = 2  # MLflow client's own retries per request (its default 7 with backoff 2 takes ~4 minutes)
HTTP_TIMEOUT_S = 10  # per request; MLflow's default is 120
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0  # our retries during an outage: backoff between probes of the server
FINISH_WAIT_S = 60.0  # how long close() waits for an absent server before leaving the rest in the outbox
REFUSED_TRIES = 3  # a send the (reachable) store rejects this often is dropped with a warning


def _env_s(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def quick_http_failures() -> None:
    """One failed request takes seconds, not MLflow's minutes of retries: the Sender retries for as long as needed.

    setdefault: a value the user exported wins.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


def reason(e: Exception) -> str:
    """The short cause of a failed send (MLflow wraps urllib3's 'Max retries exceeded ... Connection refused')."""
    text = one_line(e)
    for cause in ("Connection refused", "timed out", "Name or service not known", "Connection reset",
                  "Remote end closed connection", "Connection aborted"):
        if cause.lower() in text.lower():
            return cause.lower()
    return text[:120]


class Sender:
    """Delivers one run's outbox records in order on a background thread: metrics in batches (FLUSH_EVERY_METRICS
    values or FLUSH_EVERY_S), images, artifacts and tags as they come.

    `pending`: records an earlier session left undelivered in `outbox`; they go first, verified against the store
    (they may be there already). The outage state (`in_outage`) is what flush() and the tracker ask.
    """

    def __init__(self, client: Any, run_id: str, uri: str, outbox: Outbox, pending: list[dict[str, Any]]) -> None:
        self.run_id, self.uri, self.outbox = run_id, uri, outbox
        self._delivery = Delivery(client, run_id, outbox)
        self._cv = threading.Condition()  # one lock for journal and queue: line N of the journal = record N
        self._queue: deque[dict[str, Any]] = deque()  # records in the outbox, not yet delivered
        self._queued_values = 0  # metric values in _queue
        self._closing = self._flush_wanted = False
        self._give_up_at = float("inf")
        self._outage_since: float | None = None
        self._warned_append = False
        self._cursor = outbox.delivered()  # journal lines delivered
        self._verify = bool(pending)  # an earlier session's records may be in the store already
        self._last_send = time.monotonic()
        self._retry_max_s = _env_s("GANCORE_TRACK_RETRY_MAX_S", RETRY_MAX_S)
        self._finish_wait_s = _env_s("GANCORE_TRACK_FINISH_WAIT_S", FINISH_WAIT_S)
        for rec in pending:
            self._enqueue(rec)
        self._thread = threading.Thread(target=self._loop, name="gancore-tracking", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_outage(self) -> bool:
        """Whether the server is away (warned about once; cleared by the first delivery after it is back)."""
        return self._outage_since is not None

    def put(self, rec: dict[str, Any]) -> None:
        """Append `rec` to the outbox and queue it for the thread (callable from any thread)."""
        with self._cv:  # the system-metrics thread logs too
            try:
                self.outbox.append(rec)
            except OSError as e:  # a full disk must not end the run either: the record is still sent from memory
                if not self._warned_append:
                    log.warning("tracking outbox %s not writable (%s); records are kept in memory only",
                                self.outbox.dir, one_line(e))
                    self._warned_append = True
            self._enqueue(rec)
            self._cv.notify_all()

    def flush(self) -> None:
        """Have what is queued sent and wait for it, unless the server is away (then it stays queued)."""
        with self._cv:
            self._flush_wanted = True
            self._cv.notify_all()
            while self._queue and self._outage_since is None and self._thread.is_alive():
                self._cv.wait(0.5)
            self._flush_wanted = False

    def close(self) -> list[dict[str, Any]]:
        """Deliver what is queued and stop, waiting at most $GANCORE_TRACK_FINISH_WAIT_S for an absent server;
        returns the records left undelivered (they stay in the outbox)."""
        with self._cv:
            self._closing = True
            self._give_up_at = time.monotonic() + self._finish_wait_s
            self._cv.notify_all()
        self._thread.join()
        return list(self._queue)

    # -- the thread

    def _enqueue(self, rec: dict[str, Any]) -> None:
        self._queue.append(rec)
        if rec.get("kind") == "metrics":
            self._queued_values += len(rec["values"])

    def _due(self) -> bool:
        """Whether the head of the queue should be sent now (metrics wait for a full batch or FLUSH_EVERY_S)."""
        if not self._queue:
            return False
        return (self._closing or self._flush_wanted or self._queued_values >= FLUSH_EVERY_METRICS
                or any(r.get("kind") != "metrics" for r in self._queue)
                or time.monotonic() - self._last_send >= FLUSH_EVERY_S)

    def _loop(self) -> None:
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
                self._delivery.send(batch, verify)
            except Exception as e:  # noqa: BLE001 - nothing the store does may end the training run
                self._verify = True  # the request may have reached the store: check before sending again
                self._delivery.forget()
                if self._server_answers():
                    refused += 1
                    if refused < REFUSED_TRIES:
                        time.sleep(RETRY_MIN_S)
                        continue
                    log.warning("MLflow refused %s of run %s (%s); not retried", describe(batch), self.run_id,
                                one_line(e))
                else:
                    if not self._wait_for_server(e, backoff):
                        return  # close() gave up waiting: the rest stays in the outbox
                    backoff = min(backoff * 2, max(self._retry_max_s, RETRY_MIN_S))
                    continue
            refused, backoff = 0, RETRY_MIN_S
            self._delivered(batch)

    def _delivered(self, batch: list[dict[str, Any]]) -> None:
        """`batch` (the head of the queue) is in the store (or dropped as refused): dequeue it, move the cursor."""
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
        """Outage: warn (once per outage), then wait until the server answers. False when close() gives up."""
        with self._cv:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                self._cv.notify_all()  # a waiting flush() returns
                log.warning("MLflow server at %s unreachable (%s); training goes on, tracking data is kept in %s "
                            "and sent when the server is back", self.uri, reason(error), self.outbox.dir)
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


# ----------------------------------------------------------------------------------------------------------------
# jobs/sync.py


def sync_run_dir(run_dir: str | Path, uri: str | None = None, on_progress: Callable[[int, int], None] | None = None) -> str:
    """Deliver a run dir's tracking outbox to its MLflow run; returns the one summary line. Idempotent.

    A TrackingError (one line) when the run dir has no outbox, the server cannot be reached, the run is not in
    the store, or another process holds the outbox.
    """
    run_dir = Path(run_dir)
    box = Outbox.find(run_dir)
    if box is None:
        why = "not a directory" if not run_dir.is_dir() else f"no {OUTBOX_DIR}/ in it"
        raise TrackingError(
            f"nothing to sync in {run_dir} ({why}); pass the run dir of a run that said it kept tracking data "
            "(its outbox is <run dir>/tracking_outbox)"
        )
    header = box.header()
    uri = uri or header["uri"]
    run_id = header["run_id"]
    box.lock()
    try:
        records = box.records()
        start = box.delivered()
        todo = records[start:]
        if not todo:
            return f"nothing to sync: all {len(records)} tracking records of MLflow run {run_id} are already in {uri}"
        check_reachable(uri)
        client = mlflow_client(uri)
        with store_errors(uri):
            get_run(client, run_id, uri, f"MLflow run {run_id} not found in {uri}; pass --uri with the store it was "
                                         "logged to")
            delivery = Delivery(client, run_id, box)
            done = start
            while done < len(records):
                batch = next_batch(records[done:])
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints run URLs on set_terminated
                        delivery.send(batch, verify=True)
                except TrackingError:
                    raise
                except Exception as e:  # noqa: BLE001 - whatever the store says becomes the one-line error
                    raise TrackingError(
                        f"sync of {run_dir} stopped after {done - start} of {len(todo)} records (MLflow at {uri}: "
                        f"{one_line(e)}); run it again, it goes on from there"
                    ) from None
                done += len(batch)
                box.mark_delivered(batch, done)
                if on_progress is not None:
                    on_progress(done - start, len(todo))
    finally:
        box.close()
    s = delivery.sent
    line = (f"synced {run_dir} to MLflow run {run_id} at {uri}: {s['metrics']} metric values, {s['image']} images, "
            f"{s['artifact']} artifacts" + (", run status" if s["status"] else "")
            + f"; {delivery.skipped} already there")
    if delivery.missing:
        line += f"; {len(delivery.missing)} files gone from disk (not sent): {', '.join(delivery.missing[:3])}"
    return line
