"""The checkpoint: its layout (one owner), written atomically, read with weights_only=True, found by step.

A checkpoint holds everything a bit-identical resume needs: networks, optimisers, grad scaler, EMA, every RNG
state, the loader's data position, the step, the MLflow run id, the resolved config and the loss history.
`RunState` builds that dict and restores from it (the training loop); `load_family` rebuilds a trained family
for evaluation, generation and sweeps; `resolve_run_dir` decides where a run writes and what it resumes.

    <run dir>/checkpoints/step_XXXXXXXX.pt   the newest train.keep_checkpoints, by step
    <run dir>/checkpoints/best.pt            the best-FID checkpoint (outside the rotation)
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gancore.config import Config, from_dict, resume_differences, to_dict
from gancore.errors import CheckpointError
from gancore.families.base import Family
from gancore.io import atomic_write
from gancore.registry import FAMILIES
from gancore.train.ema import EMA
from gancore.train.fast import restore_adam_options
from gancore.train.stats import StatsAccumulator

CKPT_DIR = "checkpoints"
BEST = "best.pt"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def save(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save through gancore.io.atomic_write: a crash never leaves a half-written file."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


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


def best_path(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR / BEST


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


# ----------------------------------------------------------------------------------------------------------------
# Where a run writes, and the run's state as a checkpoint dict


def resolve_run_dir(cfg: Config, out: str | Path | None, resume: str | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None). Never reuses a run dir that holds checkpoints by accident."""
    if resume and resume != "auto":
        path = Path(resume)
        if path.is_dir():
            found = latest(path)
            if found is None:
                raise CheckpointError(f"no checkpoints in {path}/{CKPT_DIR}; pass a checkpoint file or a run dir")
            return path, found
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} not found")
        return (Path(out) if out else path.parent.parent), path
    if resume == "auto":
        if out:
            return Path(out), latest(out)
        candidates = sorted(Path("runs").glob(f"{cfg.name}-*"), key=lambda p: p.stat().st_mtime)
        with_ckpt = [p for p in candidates if latest(p)]
        if with_ckpt:
            return with_ckpt[-1], latest(with_ckpt[-1])
    run_dir = Path(out) if out else Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if latest(run_dir) is not None and resume != "auto":
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                              "or --out NEW_DIR for a new one")
    return run_dir, None


def build_family(cfg: Config, image_shape: tuple[int, int, int], num_classes: int) -> Family:
    return FAMILIES[cfg.family](cfg, image_shape, num_classes)


@dataclass
class RunState:
    """What the loop carries from step to step besides the networks: the step, the MLflow run id, the per-epoch loss
    history, the best sample-quality value so far and the current epoch's partial statistics."""

    step: int = 0
    run_id: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)  # {key, value, step} of the best FID so far
    epoch_stats: StatsAccumulator = field(default_factory=StatsAccumulator)

    def checkpoint(self, cfg: Config, family: Family, accelerator: Any, loader: Any, image_shape: tuple[int, ...],
                   num_classes: int) -> dict[str, Any]:
        """The checkpoint dict (see the module docstring); networks unwrapped from DDP."""
        return {
            "version": FORMAT_VERSION,
            "step": self.step,
            "run_id": self.run_id,
            "config": to_dict(cfg),
            "image_shape": list(image_shape),
            "num_classes": num_classes,
            "networks": {k: accelerator.unwrap_model(n).state_dict() for k, n in family.networks.items()},
            "optimizers": {k: o.state_dict() for k, o in family.optimizers.items()},
            "ema": family.ema.state_dict() if family.ema is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng_state(),
            "loader": loader.state_dict(),
            "history": self.history,
            "epoch_stats": self.epoch_stats.state_dict(),  # a mid-epoch stop keeps the epoch's partial sums
            "best": self.best,
        }

    @classmethod
    def restore(cls, path: Path, cfg: Config, family: Family, accelerator: Any, loader: Any) -> RunState:
        """Load every piece of state from checkpoint `path` into the family, accelerator and loader."""
        state = load(path)
        diffs = resume_differences(state["config"], cfg)
        if diffs:
            raise CheckpointError(f"{path} was trained with other hyper-parameters ({'; '.join(diffs)}); "
                                  "use the same config or start a new run")
        for k, net in family.networks.items():
            accelerator.unwrap_model(net).load_state_dict(state["networks"][k])
        for k, opt in family.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
            restore_adam_options(opt, family.adam_options)
        if family.ema is not None and state.get("ema") is not None:
            family.ema.load_state_dict(state["ema"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before the loop
        if accelerator.process_index > 0:  # only rank 0's RNG is saved: other ranks re-derive distinct streams
            torch.manual_seed(cfg.train.seed + 7919 * accelerator.process_index + 104729 * int(state["step"]))
        run = cls(int(state["step"]), state.get("run_id"), state.get("history", {}), state.get("best", {}))
        run.epoch_stats.load_state_dict(state["epoch_stats"])
        return run


def load_family(path: str | Path, device: str | torch.device = "cpu") -> tuple[Family, Config, dict]:
    """A trained family (networks and EMA restored, eval mode) from a checkpoint file or a run dir."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoints in {path}/{CKPT_DIR}")
        path = found
    state = load(path, map_location=device)
    cfg = from_dict(state["config"])
    family = build_family(cfg, tuple(state["image_shape"]), int(state["num_classes"]))
    for k, net in family.networks.items():
        net.load_state_dict(state["networks"][k])
        net.to(device).eval()
    if state.get("ema") is not None:
        family.ema = EMA(family.networks[family.generator_name], cfg.train.ema_decay)
        family.ema.load_state_dict(state["ema"])
        family.ema.to(device)
    return family, cfg, state
