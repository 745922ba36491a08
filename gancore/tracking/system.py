"""What a run records about its data and its machine: the dataset input entry (name, digest, profile) and MLflow's
system metrics sampled on a thread of ours, so that they go through the outbox like every other record."""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import numpy as np

from gancore.tracking.store import one_line

log = logging.getLogger(__name__)

def _as_bytes(a: Any) -> memoryview:
    a = a.numpy() if hasattr(a, "numpy") else a  # a CPU torch tensor or a numpy array
    return memoryview(np.ascontiguousarray(a)).cast("B")


def dataset_entry(data: Any, x: Any, y: Any) -> dict[str, Any]:
    """{"name", "digest", "source", "profile"} of a run's data: `data` a DataConfig, x uint8 (N, C, H, W), y (N,).

    The digest is the sha1 of the images and labels as trained on (after class filter, subset and resize), so two
    runs on different data never share it; hashing is ~1 GB/s (CIFAR-10's 50k images: ~0.15 s).
    """
    h = hashlib.sha1(f"{tuple(x.shape)}|{tuple(y.shape)}|".encode())
    h.update(_as_bytes(x))
    h.update(_as_bytes(y))
    name = f"{data.name}-{data.split}"
    if data.normal_class >= 0:
        name += f"-class{data.normal_class}"
    if data.subset:
        name += f"-first{data.subset}"
    if data.image_size:
        name += f"-{data.image_size}px"
    profile = {"num_images": int(x.shape[0]), "shape": list(x.shape[1:]), "split": data.split,
               "subset": data.subset, "normal_class": data.normal_class, "image_size": data.image_size}
    source = data.path or f"gancore.data:{data.name}/{data.split}"
    return {"name": name, "digest": h.hexdigest()[:32], "source": str(source), "profile": profile}


class SystemMetrics:
    """MLflow's own system-metrics monitors (CPU, memory, disk, network; NVIDIA/AMD GPUs when their libraries are
    installed) on a thread of ours: MLflow's SystemMetricsMonitor logs straight to the store and stops at the first
    failed request, while a run's metrics must go through the outbox to survive an outage."""

    def __init__(self, log_metrics: Any, first_step: int, node_id: str | None, run_id: str, uri: str) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # used for its monitors and settings only (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, ..._SAMPLES_BEFORE_LOGGING,
        # ..._NODE_ID); its constructor sends nothing, and its own thread (start()) is never started. Its INFO line
        # "Skip logging GPU metrics" on every GPU-less run would be a second stderr line beside a CLI's one-line error.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=uri)
        self.prefix = "system/" + (f"{self.monitor.node_id}/" if self.monitor.node_id else "")
        self.log_metrics, self.step = log_metrics, first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gancore-system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and log what was sampled since the last value (short runs still get one)."""
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        m = self.monitor
        try:
            while not self._stop.is_set():
                for _ in range(m.samples_before_logging):
                    m.collect_metrics()
                    if self._stop.wait(m.sampling_interval):
                        break
                values = m.aggregate_metrics()
                for mon in m.monitors:
                    mon.clear_metrics()
                self.log_metrics({self.prefix + k: v for k, v in values.items()}, self.step)
                self.step += 1
        except Exception as e:  # noqa: BLE001 - a sensor that fails ends the sampling, never the run
            log.warning("MLflow system metrics stopped: %s", one_line(e))
