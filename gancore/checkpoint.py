"""Full-state checkpoints: written atomically, read with weights_only=True, found by step.

A checkpoint holds everything a bit-identical resume needs: networks, optimisers, grad scaler, EMA, every RNG
state, the loader's data position, the step, the MLflow run id, the resolved config and the loss history.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gancore.errors import CheckpointError

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def save(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (weights_only: no code runs); a missing or corrupt file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a gancore checkpoint "
                              f"({type(e).__name__}); resume from an earlier one in its folder") from None
    if not isinstance(state, dict) or "networks" not in state:
        raise CheckpointError(f"{str(path)!r} is not a gancore checkpoint (no 'networks' entry)")
    return state


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors/tuples that weights_only can read."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(_tuples(s["python"]))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples; a saved state may come back with lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
