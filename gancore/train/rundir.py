"""A run directory: its layout has one owner (`RunDir`), and so has the choice of where a run writes.

    <run dir>/checkpoints/step_XXXXXXXX.pt   the newest train.keep_checkpoints, by step (RunDir.step_path / step_of)
    <run dir>/checkpoints/best.pt            the best-FID checkpoint, outside the rotation (RunDir.best)
    <run dir>/snapshots/epoch_XXX.png        the report's sample grids, and <G>_epoch_XXX.pt the generator's weights
    <run dir>/samples/step_XXXXXXXX.png      the fixed-noise grid logged to the tracker, by step
    <run dir>/tracking_run.json              the MLflow run as soon as it exists (a kill before the first
                                             checkpoint must not cost a second run)

Which checkpoint a run directory means (jobs/eval.py, jobs/generate.py, jobs/slim.py, sweeps' confirmation):
its best.pt when it has one, else its newest step checkpoint (`RunDir.meant`). Resuming always continues from the
newest step checkpoint (`RunDir.latest`). Imports no torch at module level: jobs/ check arguments with it first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gancore.config import Config, resume_differences, to_dict
from gancore.errors import CheckpointError, GancoreError
from gancore.io import atomic_write, temp_name_pattern

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
BEST = "best.pt"
TRACKING_RUN = "tracking_run.json"
SNAPSHOTS = "snapshots"
SAMPLES = "samples"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")
MEANS = "its best.pt when it has one, else its newest step checkpoint"  # what --help says a run directory gives


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory, by name. RunDir("runs/x").step_path(40) ->
    runs/x/checkpoints/step_00000040.pt, and RunDir.step_of(that path) -> 40."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CKPT_DIR

    @property
    def best(self) -> Path:
        """The best-FID checkpoint (may not exist)."""
        return self.checkpoints_dir / BEST

    @property
    def tracking_run(self) -> Path:
        return self.path / TRACKING_RUN

    @property
    def snapshots_dir(self) -> Path:
        return self.path / SNAPSHOTS

    def step_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:08d}.pt"

    @staticmethod
    def step_of(path: str | Path) -> int | None:
        """The step of a step checkpoint's file (step_00000040.pt -> 40); None for any other name (best.pt)."""
        m = _STEP_RE.search(Path(path).name)
        return int(m.group(1)) if m else None

    @staticmethod
    def of_checkpoint(path: str | Path) -> RunDir | None:
        """The run directory a checkpoint file sits in (<run dir>/checkpoints/NAME), or None for a file elsewhere."""
        p = Path(path)
        return RunDir(p.parent.parent) if p.parent.name == CKPT_DIR else None

    def step_checkpoints(self) -> list[Path]:
        """The run's step checkpoints, oldest first."""
        d = self.checkpoints_dir
        if not d.is_dir():
            return []
        found = [(step, p) for p in d.iterdir() if (step := self.step_of(p)) is not None]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest step checkpoint (what a resume continues), or None."""
        ckpts = self.step_checkpoints()
        return ckpts[-1] if ckpts else None

    def meant(self) -> Path | None:
        """The checkpoint a command given this run directory reads: best.pt when present, else the latest."""
        return self.best if self.best.is_file() else self.latest()

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` step checkpoints, and temp files a killed writer left behind."""
        for p in self.step_checkpoints()[:-keep] if keep > 0 else []:
            p.unlink(missing_ok=True)
        for pattern in (temp_name_pattern("step_*.pt"), temp_name_pattern(BEST)):  # only rank 0 writes, one at a time
            for p in self.checkpoints_dir.glob(pattern):
                p.unlink(missing_ok=True)

    def snapshot_grid(self, epoch: int) -> Path:
        return self.snapshots_dir / f"epoch_{epoch:03d}.png"

    def snapshot_weights(self, network: str, epoch: int) -> Path:
        return self.snapshots_dir / f"{network}_epoch_{epoch:03d}.pt"

    def save_snapshot(self, network: str, epoch: int, weights: dict[str, Any]) -> Path:
        """The generator's weights at the end of `epoch`, written atomically (a kill leaves the old file or none)."""
        import torch

        return atomic_write(self.snapshot_weights(network, epoch), lambda fh: torch.save(weights, fh))

    def sample_grid(self, step: int) -> Path:
        return self.path / SAMPLES / f"step_{step:08d}.png"

    def sample_grids(self) -> list[Path]:
        """The fixed-noise sample grids, oldest first."""
        return sorted((self.path / SAMPLES).glob("step_*.png"))


def torch_archive(path: str | Path, fix: str) -> Path:
    """`path`, once checked to be a torch.save archive (other files fail deep inside the unpickler); else a one-line
    CheckpointError ending in `fix`. Checkpoints found by step are not checked: a resume falls back from a torn one."""
    p = Path(path)
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"checkpoint {str(p)!r} is not a gancore checkpoint (not a torch.save archive); {fix}")
    return p


def checkpoint_file(target: str | Path) -> Path:
    """A checkpoint file, or the checkpoint a run directory means (RunDir.meant), checked cheaply: a missing file
    or one that is not a torch archive is a one-line CheckpointError before anything is loaded."""
    p = Path(target)
    if p.is_dir():
        found = RunDir(p).meant()
        if found is None:
            raise CheckpointError(f"no checkpoints in {p}/{CKPT_DIR}; pass a run dir that holds some or a "
                                  "checkpoint file")
        p = found
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} not found; pass a checkpoint file (.pt) or a run dir")
    return torch_archive(p, f"pass a file from a run's {CKPT_DIR}/ folder")


# ----------------------------------------------------------------------------------------------------------------
# Where a run writes


def _writable_dir(d: Path) -> Path:
    """`d` itself, once checked: a directory (or creatable as one) that this process may write into."""
    if d.exists() and not d.is_dir():
        raise GancoreError(f"run directory {str(d)!r} is an existing file; pass --out with a new or existing directory")
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GancoreError(f"cannot create run directory {str(d)!r}: {str(parent)!r} is a file; pass --out with "
                           "a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GancoreError(f"cannot write run directory {str(d)!r}: no write permission in {str(parent)!r}; "
                           "pass --out with a writable directory")
    return d


RUN_MARKERS = ("config.yaml", TRACKING_RUN, CKPT_DIR)  # what a run writes into its directory first
SWEEP_MARKERS = ("optuna.db", "trials.csv", "best.yaml")  # a sweep directory's own files (gancore/sweep/), beside
_TRIAL_RE = re.compile(r"trial_\d+$")  # its trial_NNNN run dirs


def not_a_run_dir(d: Path, strict: bool) -> str | None:
    """Why `d` cannot be a run's directory, or None: a sweep's directory never is; with `strict` (--resume auto,
    which continues whatever run is there) neither is a folder that holds files but nothing a run writes."""
    if not d.is_dir():
        return None
    names = sorted(p.name for p in d.iterdir())
    sweep = [n for n in names if n in SWEEP_MARKERS or _TRIAL_RE.match(n)]
    if sweep:
        return (f"{d} is a sweep's directory (it holds {', '.join(sweep[:3])}); pass --out with a run directory of "
                f"its own, e.g. --out {d / 'retrain'}")
    if strict and names and not set(names) & set(RUN_MARKERS):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (f"{d} is not a run directory (it holds {shown} and no {CKPT_DIR}/ or config.yaml); pass --out with "
                "an existing run's directory, a new one or an empty one")
    return None


def resolve_run_dir(cfg: Config, out: str | Path | None, resume: str | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None). Never reuses a run dir that holds checkpoints by accident.

    Every path problem (--out naming a file, an unwritable parent, a missing checkpoint, a directory that is not a
    run's) is raised here, before the run writes anything. `--resume auto` that finds no checkpoint says in one
    line that it starts a new run, and where (a first start under Slurm, which always passes it, says so too).
    """
    if out is not None:
        _writable_dir(Path(out))
        problem = not_a_run_dir(Path(out), strict=resume == "auto")
        if problem:
            raise CheckpointError(problem)
    if resume and resume != "auto":
        path = Path(resume)
        if path.is_dir():
            found = RunDir(path).latest()
            if found is None:
                raise CheckpointError(f"no checkpoints in {path}/{CKPT_DIR}; pass a checkpoint file or a run dir")
            return _writable_dir(path), found
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} not found; pass --resume auto, a checkpoint file or a "
                                  "run dir")
        return _writable_dir(Path(out) if out else path.parent.parent), torch_archive(
            path, "resume from another file in its folder or start a new run")
    if resume == "auto":
        if out:
            found = RunDir(out).latest()
            if found is None:
                state = "does not exist yet" if not Path(out).exists() else "holds no checkpoint yet"
                log.warning("--resume auto: %s %s; starting a new run there (from step 0)", out, state)
            return Path(out), found
        candidates = sorted(Path("runs").glob(f"{cfg.name}-*"), key=lambda p: p.stat().st_mtime)
        with_ckpt = [p for p in candidates if RunDir(p).latest()]
        if with_ckpt:
            return _writable_dir(with_ckpt[-1]), RunDir(with_ckpt[-1]).latest()
    run_dir = _writable_dir(Path(out) if out else Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
    if RunDir(run_dir).latest() is not None and resume != "auto":
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                              "or --out NEW_DIR for a new one")
    if resume == "auto":
        log.warning("--resume auto: no runs/%s-*/ holds a checkpoint; starting a new run in %s (from step 0)",
                    cfg.name, run_dir)
    return run_dir, None


def record_tracking_run(run_dir: Path, run_id: str, uri: str, cfg: Config) -> None:
    """Note the run dir's MLflow run (store, experiment, hyper-parameters) the moment it exists: the checkpoints
    carry the run id too, but a kill before the first one must not cost a second MLflow run on --resume auto."""
    atomic_write(RunDir(run_dir).tracking_run, json.dumps(
        {"run_id": run_id, "uri": uri, "experiment": cfg.track.experiment, "config": to_dict(cfg)}, indent=1))


def unsaved_tracking_run(run_dir: Path, uri: str, cfg: Config) -> str | None:
    """The MLflow run of a run dir whose first session was killed before its first checkpoint, when the same store,
    experiment and hyper-parameters start it again; else None (a new MLflow run)."""
    try:
        rec = json.loads(RunDir(run_dir).tracking_run.read_text())
        same = rec["uri"] == uri and rec["experiment"] == cfg.track.experiment and not resume_differences(rec["config"], cfg)
        return str(rec["run_id"]) if same else None
    except (OSError, ValueError, KeyError, TypeError, GancoreError):  # no record, or one from another version
        return None
