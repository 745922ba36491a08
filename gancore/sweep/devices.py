"""Several trials per device: bench/trials_per_device.py measures the aggregate throughput of K training processes
sharing one device and records the best K here; `jobs/sweep.py --workers auto` (the default) starts that many local
workers per GPU. A small model leaves a big GPU mostly idle, so K > 1 can multiply trials per hour."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gancore.io import atomic_write, cache_dir

DEFAULT_TRIALS_PER_DEVICE = 2  # until a measurement exists for this device (the previous fixed default)


def device_name() -> str:
    """What a measurement is recorded under: the GPU's name, or `cpu-<cores>`."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{os.cpu_count()}"


def _trials_file() -> Path:
    return cache_dir() / "trials_per_device.json"


def record_trials_per_device(mode: str, table: dict[int, float],
                             extra: dict[str, Any] | None = None) -> tuple[int, Path]:
    """Store a measurement {K: aggregate images/s} for this device and mode; returns (best K, the file)."""
    best = max(table, key=lambda k: table[k])
    path = _trials_file()
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(device_name(), {})[mode] = {"best_k": best, "images_per_s": {str(k): v for k, v in table.items()},
                                                **(extra or {})}
    return best, atomic_write(path, json.dumps(data, indent=1))


def trials_per_device(mode: str) -> tuple[int, str]:
    """(K, where it came from): the measured best K for this device and train.compile mode (another mode's
    measurement on the same device if this one has none), else DEFAULT_TRIALS_PER_DEVICE."""
    path = _trials_file()
    try:
        data = json.loads(path.read_text()).get(device_name(), {}) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    entry = data.get(mode) or next(iter(data.values()), None)
    if entry and isinstance(entry.get("best_k"), int) and entry["best_k"] >= 1:
        return entry["best_k"], f"measured on {device_name()} ({path})"
    return DEFAULT_TRIALS_PER_DEVICE, "default; measure with bench/trials_per_device.py --save"
