"""Evaluate a trained model after the fact: `jobs/eval.py RUN_ID | RUN_DIR | CKPT` -> metrics, logged into its run.

A run directory (or a run id's directory) gives the checkpoint it means: its best.pt when it has one, else its
newest (gancore.train.rundir.RunDir.meant)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gancore.errors import CheckpointError, MetricsError
from gancore.device import torch_device
from gancore.train.rundir import checkpoint_file

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_target(target: str, uri: str | None = None) -> tuple[Path, str | None]:
    """(checkpoint path, MLflow run id or None) for a run id, a run directory or a checkpoint file."""
    p = Path(target)
    if p.exists():
        return checkpoint_file(p), None
    if _RUN_ID.match(target):
        from gancore.tracking import open_run_info

        info = open_run_info(target, uri)
        run_dir = info["run_dir"]
        if not run_dir or not Path(run_dir).is_dir():
            raise CheckpointError(f"run {target}'s directory {run_dir!r} is not on this machine; pass a checkpoint path")
        path, _ = resolve_target(run_dir)
        return path, target
    raise CheckpointError(f"{target!r} is neither a checkpoint file, a run directory nor an MLflow run id")


def chunk_sampler(family: Any, seed: int) -> Callable[[int], Callable[[int], torch.Tensor]]:
    """i -> the sampler of chunk i of an evaluation: its own generator, seeded from (seed, i)."""
    def sampler(i: int) -> Callable[[int], torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return lambda b: family.to_uint8(family.sample(b, inputs=family.fixed_inputs(b, g)))
    return sampler


def evaluate_checkpoint(target: str, n: int | None = None, extractor: str | None = None, device: str | None = None,
                        log: bool = True, uri: str | None = None, seed: int = 0,
                        real_split: str | None = None) -> tuple[dict[str, float], str | None]:
    """FID/IS/KID/PR of a trained generator; logged into its MLflow run (at the checkpoint's step) when known.

    `real_split` (train | test) measures against that split instead of the run's eval.real_split; the metric keys
    then end in it (fid_inception_10k_test), so numbers against two references never share a key."""
    from gancore.metrics import MetricKey, evaluate
    from gancore.train.state import load_family

    if n is not None and n <= 0:
        raise MetricsError(f"-n {n}: the number of generated samples must be positive")
    path, run_id = resolve_target(target, uri)
    dev = torch_device(device or "auto")
    family, cfg, state = load_family(path, dev)
    if real_split is not None:
        from gancore.config import SPLITS, replace

        if real_split not in SPLITS:
            raise MetricsError(f"--real-split {real_split!r}: expected {' or '.join(SPLITS)}")
        cfg = replace(cfg, **{"eval.real_split": real_split})
    run_id = run_id or state.get("run_id")
    # features cached per chunk, keyed by the checkpoint's content and the seed: an interrupted run continues
    from gancore.io import cache_dir
    from gancore.metrics.extractors import file_digest

    folder = cache_dir() / "eval_features" / f"{file_digest(path)[:16]}-seed{seed}"
    n = n or cfg.eval.n_samples or 10000
    values = evaluate(cfg, None, dev, extractor=extractor, n=n, progress=True,
                      resumable=(chunk_sampler(family, seed), folder))
    if real_split:  # the keys name the reference: fid_inception_10k_test
        values = {dataclasses.replace(MetricKey.parse(k), split=real_split).name: v for k, v in values.items()}
    if log and run_id and cfg.track.enabled:
        from gancore.metrics import protocol, protocol_tag
        from gancore.tracking import log_to_run

        ((key, proto),) = protocol_tag(protocol(cfg, extractor, n, ema=family.ema is not None), real_split).items()
        log_to_run(run_id, values, int(state["step"]), uri or cfg.track.uri, protocol=(key, proto))
    return values, run_id
