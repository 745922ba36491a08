"""The checkpoint: its layout (one owner), written atomically, read with weights_only=True, found by step.

A checkpoint holds everything a bit-identical resume needs: networks, optimisers, grad scaler, EMA, every RNG
state, the loader's data position, the step, the MLflow run id, the resolved config and the loss history.
A multi-process run (DDP) writes one checkpoint (rank 0, atomically) that also holds every rank's own state
under "ranks" (RNG states, loader position, partial epoch statistics; gathered to rank 0 first) and the number of
processes ("world_size"): each rank restores its own entry, and a resume with another number of processes is
refused (the per-rank noise streams and data shards would not continue).
`RunState` builds that dict and restores from it (the training loop); `load_family` rebuilds a trained family
for evaluation, generation and sweeps. The run directory's layout (step_XXXXXXXX.pt, best.pt, snapshots: `RunDir`)
and where a run writes and what it resumes (`resolve_run_dir`) belong to gancore/train/rundir.py.

Faults (README "Reliability"): every write is atomic (gancore.io.atomic_write), so a kill -9 loses at most the
steps since the last checkpoint. A write that fails (disk full, I/O error) is a one-line CheckpointError and
replaces nothing. A torn or corrupt newest checkpoint (a machine crash on a filesystem without atomic rename) is
set aside as <name>.corrupt and the resume falls back to the newest earlier one that reads, with a warning.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gancore.config import Config, from_dict, resume_differences, to_dict
from gancore.errors import CheckpointError
from gancore.families.base import Family
from gancore.io import atomic_write
from gancore.registry import FAMILIES
from gancore.train.ema import EMA
from gancore.train.fast import restore_adam_options
from gancore.train.rundir import (  # noqa: F401 (the layout's names, for the many callers of state)
    BEST,
    CKPT_DIR,
    TRACKING_RUN,
    RunDir,
    checkpoint_file,
    not_a_run_dir,
    record_tracking_run,
    resolve_run_dir,
    unsaved_tracking_run,
)
from gancore.train.stats import StatsAccumulator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# what every reader needs (load_family: config, shapes, networks; resume: the rest is read with .get or checked there)
REQUIRED_KEYS = ("networks", "config", "image_shape", "num_classes", "step")


class _KeepWriteError:
    """The file torch.save writes to, keeping the OSError of a failed write (torch re-raises it as a RuntimeError
    that names only a zip offset)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def save(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save through gancore.io.atomic_write: a kill or crash never leaves a half-written file.

    A write that fails (disk full, I/O error) leaves no temp file and replaces nothing; it is a one-line
    CheckpointError naming the file, the cause and the last good checkpoint (the run stops there).
    """
    path = Path(path)
    kept: _KeepWriteError | None = None

    def write(fh: Any) -> None:
        nonlocal kept
        kept = _KeepWriteError(fh)
        torch.save(state, kept)

    try:
        return atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        cause = kept.error if kept is not None and kept.error is not None else e
        if not isinstance(cause, OSError):
            raise  # not a write failure: a bug, keep its traceback
        reason = f"{type(cause).__name__}: {cause.strerror or cause}".replace("\n", " ")
        run_dir = RunDir.of_checkpoint(path)
        good = run_dir.latest() if run_dir is not None else None
        raise CheckpointError(f"checkpoint {path} not written ({reason}); nothing was replaced, the last good one is "
                              f"{good or 'none yet'}; free disk space or fix the folder, then continue with "
                              "--resume auto") from None


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
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a gancore checkpoint (no {', '.join(map(repr, missing))} "
                              "entry); pass a checkpoint written by gancore (<run dir>/checkpoints/*.pt)")
    return state


# the layout's own answers (RunDir), by run dir: what the loop's tests and tools call
def best_path(run_dir: Path) -> Path:
    return RunDir(run_dir).best


def step_path(run_dir: Path, step: int) -> Path:
    return RunDir(run_dir).step_path(step)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    return RunDir(run_dir).step_checkpoints()


def latest(run_dir: str | Path) -> Path | None:
    return RunDir(run_dir).latest()


def prune(run_dir: str | Path, keep: int) -> None:
    RunDir(run_dir).prune(keep)


def load_for_resume(path: Path, fallback: bool) -> tuple[Path, dict[str, Any], list[Path]]:
    """(checkpoint used, its state, unreadable newer ones). With `fallback` (`path` is its run's newest, picked
    automatically), a torn or corrupt `path` gives way to the newest earlier step checkpoint that reads; with none
    (or without `fallback`), the error of `path` stands."""
    try:
        return path, load(path), []
    except CheckpointError:
        step, run_dir = RunDir.step_of(path), RunDir.of_checkpoint(path)
        if not fallback or step is None or run_dir is None:
            raise
        bad = [path]
        for p in reversed(run_dir.step_checkpoints()):
            if RunDir.step_of(p) >= step:
                continue
            try:
                return p, load(p), bad
            except CheckpointError:
                bad.append(p)
        raise  # the error of `path` (the newest)


def set_aside(paths: list[Path]) -> None:
    """Rename unreadable checkpoints to <name>.corrupt: kept for a look, out of the rotation and of `latest`."""
    for p in paths:
        if p.is_file():
            p.rename(p.with_name(p.name + ".corrupt"))


def gather_ranks(accelerator: Any, mine: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's `mine` on every rank (a collective: all ranks call it), None for one process. Sent as torch.save
    bytes: all_gather_object's own pickling of tensors does not load back (torch 2.14)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return [unpack(b) for b in gather_object([pack(mine)])]


def pack(obj: Any) -> bytes:
    """`obj` (tensors, numbers, dicts) as torch.save bytes, to send between processes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


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


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Everything inside draws from the random streams and leaves them as they were (Python, NumPy, torch CPU and
    CUDA): for work that runs only sometimes (evaluations, grids, snapshots, a lazily built extractor), so that
    whether or when it ran never changes the training's numbers, and a resume stays bit-identical."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples; a saved state may come back with lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------------
# The run's state as a checkpoint dict


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
    eval_pending: bool = False  # the evaluation of `step` is due and not done (a stop signal ended it)
    epoch_stats: StatsAccumulator = field(default_factory=StatsAccumulator)

    def rank_state(self, loader: Any) -> dict[str, Any]:
        """What differs between the processes of a multi-process run: RNG states, data position, epoch sums."""
        return {"rng": rng_state(), "loader": loader.state_dict(), "epoch_stats": self.epoch_stats.state_dict()}

    def checkpoint(self, cfg: Config, family: Family, accelerator: Any, loader: Any, image_shape: tuple[int, ...],
                   num_classes: int, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint dict (see the module docstring); networks unwrapped from DDP. `ranks`: every process's
        rank_state (gathered to rank 0), for a multi-process run; None for one process (or the best-FID copy,
        which is for evaluation: resuming several processes from it re-derives ranks > 0's noise)."""
        return {
            "version": FORMAT_VERSION,
            "step": self.step,
            "world_size": accelerator.num_processes,
            "ranks": ranks,
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
            "eval_pending": self.eval_pending,  # a resume runs the evaluation of this step first
        }

    @classmethod
    def restore(cls, path: Path, cfg: Config, family: Family, accelerator: Any, loader: Any,
                fallback: bool = False) -> RunState:
        """Load every piece of state from checkpoint `path` into the family, accelerator and loader.

        `fallback`: `path` was picked as its run's newest; if it is torn or corrupt, the newest earlier one that
        reads is used instead (the unreadable ones are renamed <name>.corrupt) with a one-line warning.
        """
        used, state, unreadable = load_for_resume(Path(path), fallback)
        if unreadable and accelerator.is_main_process:
            set_aside(unreadable)
            log.warning("checkpoint %s torn or corrupt (renamed %s); resuming from the earlier %s (step %d)",
                        ", ".join(str(p) for p in unreadable), ", ".join(f"{p.name}.corrupt" for p in unreadable),
                        used, int(state["step"]))
        path = used
        if state.get("sampling_only"):
            raise CheckpointError(f"{path} is a sampling-only checkpoint (generator and EMA, written by jobs/slim.py) "
                                  "and cannot be resumed; resume from the full checkpoint it was made from")
        diffs = resume_differences(state["config"], cfg)
        if diffs:
            raise CheckpointError(f"{path} was trained with other hyper-parameters ({'; '.join(diffs)}); "
                                  "use the same config or start a new run")
        world = int(state.get("world_size") or 1)
        if world != accelerator.num_processes:
            raise CheckpointError(f"{path} was written by a {world}-process run and this run has "
                                  f"{accelerator.num_processes}; resume it with {world} process(es) "
                                  "(e.g. accelerate launch --num_processes N) or start a new run")
        mine = state["ranks"][accelerator.process_index] if state.get("ranks") else None
        for k, net in family.networks.items():
            accelerator.unwrap_model(net).load_state_dict(state["networks"][k])
        for k, opt in family.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
            restore_adam_options(opt, family.adam_options)
        if family.ema is not None and state.get("ema") is not None:
            family.ema.load_state_dict(state["ema"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        own = mine or state  # this rank's entry; one process (or no per-rank states): the top level
        loader.load_state_dict(own["loader"])
        set_rng_state(own["rng"])  # last: nothing after this may draw random numbers before the loop
        if mine is None and accelerator.process_index > 0:  # no per-rank states (best.pt): distinct fresh streams
            torch.manual_seed(cfg.train.seed + 7919 * accelerator.process_index + 104729 * int(state["step"]))
        run = cls(int(state["step"]), state.get("run_id"), state.get("history", {}), state.get("best", {}),
                  bool(state.get("eval_pending", False)))
        run.epoch_stats.load_state_dict(own["epoch_stats"])
        return run


def sampling_only(state: dict[str, Any], small: bool = False) -> dict[str, Any]:
    """The part of a checkpoint that sampling and evaluation read: the generator's weights (and its EMA), config,
    shapes, step and run id; no discriminator, optimiser, RNG or loader state (it cannot be resumed). What a GPU
    machine sends back so that the Inception FID can be computed elsewhere (jobs/slim.py).

    `small`: only the weights the sampler uses (the EMA copy when there is one, else the generator), floating
    tensors in float16: a file to commit beside a results row (DCGAN-MNIST: about 1.7 MB). Measure the row's number
    on this file, since rounding to float16 moves FID a little."""
    g = FAMILIES[from_dict(state["config"]).family].generator_name  # a class attribute: nothing is built
    if g not in state["networks"]:
        raise CheckpointError(f"the checkpoint has no generator {g!r}; pass a checkpoint written by gancore")
    keep = ("version", "step", "run_id", "config", "image_shape", "num_classes", "ema", "best")
    out = {**{k: state.get(k) for k in keep}, "networks": {g: state["networks"][g]}, "sampling_only": True}
    if small:
        half = lambda d: {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
                          for k, v in d.items()}
        out["networks"] = {} if out["ema"] is not None else {g: half(out["networks"][g])}
        out["ema"] = half(out["ema"]) if out["ema"] is not None else None
    return out


def load_family(path: str | Path, device: str | torch.device = "cpu") -> tuple[Family, Config, dict]:
    """A trained family (networks and EMA restored, eval mode) from a checkpoint file or a run dir (the checkpoint
    it means: RunDir.meant)."""
    path = checkpoint_file(path) if Path(path).is_dir() else Path(path)
    state = load(path, map_location=device)
    cfg = from_dict(state["config"])
    family = build_family(cfg, tuple(state["image_shape"]), int(state["num_classes"]))
    for k, net in family.networks.items():
        if k in state["networks"]:
            net.load_state_dict(state["networks"][k])
        elif k == family.generator_name and state.get("sampling_only") and state.get("ema") is not None:
            shadow = {n[len("shadow."):]: v for n, v in state["ema"].items() if n.startswith("shadow.")}
            net.load_state_dict(shadow)  # a small sampling-only file keeps the EMA copy alone (sampling_only)
        elif not state.get("sampling_only"):  # a sampling-only checkpoint leaves out what sampling does not use
            raise CheckpointError(f"{path} has no weights for network {k!r}; pass a checkpoint written by gancore")
        net.to(device).eval()
    if state.get("ema") is not None:
        family.ema = EMA(family.networks[family.generator_name], cfg.train.ema_decay)
        family.ema.load_state_dict(state["ema"])
        family.ema.to(device)
    return family, cfg, state
