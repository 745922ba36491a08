"""Shared fixtures: the data directory (../shared/data by default) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers (pytest-xdist): one core each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("GANCORE_DATA", str(SHARED))
os.environ.setdefault("MPLBACKEND", "Agg")
DATA = Path(os.environ["GANCORE_DATA"])


def have_mnist() -> bool:
    return (DATA / "mnist.npz").is_file()


def have_cifar() -> bool:
    return (DATA / "cifar10" / "test.npz").is_file()


needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST not found at {DATA}/mnist.npz (set GANCORE_DATA)")
needs_cifar = pytest.mark.skipif(not have_cifar(), reason=f"CIFAR-10 not found under {DATA}/cifar10 (set GANCORE_DATA)")


def tiny(*overrides: str, config: str | None = "configs/quickstart.yaml"):
    """A few-step config on a small MNIST subset, no progress bar, tracking off unless overridden."""
    from gancore.config import load_config

    base = ["data.subset=128", "optim.batch_size=32", "train.epochs=2", "train.log_every=1",
            "train.progress=false", "track.enabled=false", "train.snapshot_epochs=[1,2]",
            "train.loss_ranges=[[1,1],[2,2]]", "train.grid_size=16", "track.image_every=4",
            "train.checkpoint_every=1000"]
    return load_config(ROOT / config if config else None, [*base, *overrides])


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/ and mlruns/ never land in the checkout."""
    monkeypatch.chdir(tmp_path)


# Parallel runs (`make test`: pytest -n 2 --dist loadfile --no-loadscope-reorder). Each test file is one unit of
# work, so module- and session-scoped fixtures (a trained extractor, an MLflow server, a reference run) are built
# once, and all Slurm tests live in test_slurm.py, so only one worker submits to the single-node cluster at a time.
# (loadgroup would be finer, but pytest-xdist 3.8 cannot set group ids on pytest 9.2's node ids.) Files go out in
# this order, the longest first, so that no worker is left with a long one at the end.
_FIRST = ("tests/test_slurm.py", "tests/test_sweep.py", "tests/test_metrics.py", "tests/test_fast_path.py")


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
