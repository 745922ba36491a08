"""Evaluate a trained model after the fact: `jobs/eval.py RUN_ID | RUN_DIR | CKPT` -> metrics, logged into its run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gancore.train import state as ckpt
from gancore.errors import CheckpointError

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_target(target: str, uri: str | None = None) -> tuple[Path, str | None]:
    """(checkpoint path, MLflow run id or None) for a run id, a run directory or a checkpoint file."""
    p = Path(target)
    if p.is_file():
        return p, None
    if p.is_dir():
        best = p / ckpt.CKPT_DIR / "best.pt"
        found = best if best.is_file() else ckpt.latest(p)
        if found is None:
            raise CheckpointError(f"no checkpoints in {p}/{ckpt.CKPT_DIR}")
        return found, None
    if _RUN_ID.match(target):
        from gancore.tracking import open_run_info

        info = open_run_info(target, uri)
        run_dir = info["run_dir"]
        if not run_dir or not Path(run_dir).is_dir():
            raise CheckpointError(f"run {target}'s directory {run_dir!r} is not on this machine; pass a checkpoint path")
        path, _ = resolve_target(run_dir)
        return path, target
    raise CheckpointError(f"{target!r} is neither a checkpoint file, a run directory nor an MLflow run id")


def evaluate_checkpoint(target: str, n: int | None = None, extractor: str | None = None, device: str | None = None,
                        log: bool = True, uri: str | None = None, seed: int = 0) -> tuple[dict[str, float], str | None]:
    """FID/IS/KID/PR of a trained generator; logged into its MLflow run (at the checkpoint's step) when known."""
    from gancore.metrics import evaluate
    from gancore.train.state import load_family

    path, run_id = resolve_target(target, uri)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family, cfg, state = load_family(path, dev)
    run_id = run_id or state.get("run_id")
    g = torch.Generator().manual_seed(seed)
    sample = lambda b: family.to_uint8(family.sample(b, inputs=family.fixed_inputs(b, g)))  # noqa: E731
    values = evaluate(cfg, sample, dev, extractor=extractor, n=n or cfg.eval.n_samples or 10000, progress=True)
    if log and run_id and cfg.track.enabled:
        from gancore.tracking import log_to_run

        log_to_run(run_id, values, int(state["step"]), uri or cfg.track.uri)
    return values, run_id
