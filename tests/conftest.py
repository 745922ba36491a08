"""Shared fixtures: the data directory (../shared/data by default) and tiny configs."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers (pytest-xdist): one core each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("GANCORE_DATA", str(SHARED))
os.environ.setdefault("MPLBACKEND", "Agg")
DATA = Path(os.environ["GANCORE_DATA"])


# CI switches (.ci/run sets all four): what a developer's machine may lack is skipped there, but in CI a skip would
# hide a broken setup, so it fails. GANCORE_REQUIRE_DATA=1: a missing dataset fails, and so does every other skip
# except those marked `may_skip` (no GPU). GANCORE_REQUIRE_PG=1: the PostgreSQL tests fail when GANCORE_TEST_PG_URL
# is unset. GANCORE_REQUIRE_INCEPTION=1: the FID Inception tests fail without the weights (.ci/run builds them with
# ../shared/weights/make-fid-inception.sh). GANCORE_REQUIRE_SLURM=1: see test_slurm.py.
REQUIRE_DATA = os.environ.get("GANCORE_REQUIRE_DATA") == "1"
REQUIRE_PG = os.environ.get("GANCORE_REQUIRE_PG") == "1"
PG_URL = os.environ.get("GANCORE_TEST_PG_URL")


def have_mnist() -> bool:
    return (DATA / "mnist.npz").is_file()


def have_cifar() -> bool:
    return (DATA / "cifar10" / "test.npz").is_file()


def _inception_file() -> Path:
    """The FID Inception weights where torch-fidelity looks (before any test changes TORCH_HOME)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


INCEPTION = _inception_file()


# resource -> (present?, why not, the switch that makes its absence a failure)
_NEEDS = {
    "mnist": (have_mnist, f"MNIST not found at {DATA}/mnist.npz (set GANCORE_DATA)", "GANCORE_REQUIRE_DATA"),
    "cifar": (have_cifar, f"CIFAR-10 not found under {DATA}/cifar10 (set GANCORE_DATA)", "GANCORE_REQUIRE_DATA"),
    "pg": (lambda: bool(PG_URL), "GANCORE_TEST_PG_URL not set (.ci/run starts PostgreSQL and sets it)",
           "GANCORE_REQUIRE_PG"),
    "inception": (INCEPTION.is_file, f"FID Inception weights not at {INCEPTION} "
                  "(PYTHON=.venv/bin/python bash ../shared/weights/make-fid-inception.sh)", "GANCORE_REQUIRE_INCEPTION"),
}
needs_mnist = pytest.mark.needs("mnist")
needs_cifar = pytest.mark.needs("cifar")
needs_pg = pytest.mark.needs("pg")
needs_inception = pytest.mark.needs("inception")
may_skip = pytest.mark.may_skip  # the only skip CI accepts: no CUDA GPU


def _pytest_timeout(item) -> float:
    """The test's pytest-timeout in seconds (its `timeout` marker, else --timeout, else pyproject's; 0: none)."""
    mark = item.get_closest_marker("timeout")
    if mark is not None:
        return float(mark.kwargs.get("timeout", mark.args[0] if mark.args else 0) or 0)
    return float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)


def pytest_runtest_setup(item):
    limit = _pytest_timeout(item)  # pytest-timeout's clock started just before setup (func_only is false)
    helpers._test_deadline = time.monotonic() + limit - helpers.MARGIN_S if limit else None
    for mark in item.iter_markers("needs"):
        present, why, switch = _NEEDS[mark.args[0]]
        if not present():
            if os.environ.get(switch) == "1":
                pytest.fail(f"{switch}=1 but {why}", pytrace=False)
            pytest.skip(why)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (GANCORE_REQUIRE_DATA=1) a skip not marked may_skip is a failure: CI cannot pass by skipping."""
    report = yield
    if REQUIRE_DATA and report.skipped and not hasattr(report, "wasxfail") and not item.get_closest_marker("may_skip"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, where only GPU tests may skip "
                           f"(GANCORE_REQUIRE_DATA=1): {reason}")
    return report


def tiny(*overrides: str, config: str | None = "configs/quickstart.yaml"):
    """A few-step config on a small MNIST subset, no progress bar, tracking off unless overridden."""
    from gancore.config import load_config

    base = ["data.subset=128", "optim.batch_size=32", "train.epochs=2", "train.log_every=1",
            "train.progress=false", "track.enabled=false", "train.snapshot_epochs=[1,2]",
            "train.loss_ranges=[[1,1],[2,2]]", "train.grid_size=16", "track.image_every=4",
            "train.checkpoint_every=1000", "eval.n_samples=0", "eval.every=0"]  # no metrics unless a test asks (quickstart has them)
    return load_config(ROOT / config if config else None, [*base, *overrides])


def state_diffs(a, b, path: str = "") -> list[str]:
    """Paths where two nested checkpoint values differ; tensors compared exactly (dtype, shape, every bit)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in state_diffs(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in state_diffs(u, v, f"{path}[{i}]")]
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], log_dir: Path, world: int = 2, env: dict[str, str] | None = None) -> list:
    """`python jobs/train.py ARGS` as `world` ranks of one torch.distributed job (gloo, one thread each), started
    directly with the variables srun + slurm/train.sh give each task: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*."""
    import subprocess
    import sys

    port, procs = str(free_port()), []
    for rank in range(world):
        e = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
             **(env or {})}
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args], env=e,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs: list, log_dir: Path, timeout: float = 240) -> list[int]:
    """Every rank's exit code, all within `timeout` s (else every rank is killed and the logs are in the message)."""
    end, logs = time.monotonic() + timeout, [log_dir / f"rank{r}.log" for r in range(len(procs))]
    try:
        return [helpers.wait_exit(p, timeout=end - time.monotonic(), what=f"rank {rank} of {len(procs)}", log=logs)
                for rank, p in enumerate(procs)]
    finally:
        for p in procs:
            helpers.stop(p, grace=0)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with `n` intra-op threads, restored afterwards. One thread: the same kernels (the same bits) as the
    subprocesses' OMP_NUM_THREADS=1, and tiny tensors gain nothing from more (on the shared 2-core CI box under load,
    OpenMP spin-waits made test_family_diffusion.py take 170 s with 2 threads vs 24 s with 1, measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for this test (torch_threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a whole test file: `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/ and mlruns/ never land in the checkout."""
    monkeypatch.chdir(tmp_path)


# What tests may share through the cache: entries keyed by their content and written atomically, that are costly to
# build (decoded .npz arrays; trained domain extractors). Everything else (real-data statistics, trials per device)
# is per test.
SHARED_CACHE_ENTRIES = ("npz", "extractors")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test (and its subprocesses) gets its own $GANCORE_CACHE, so no test reads what another one computed;
    SHARED_CACHE_ENTRIES are links into the session's cache ($GANCORE_CACHE as the run was started with)."""
    from gancore.io import cache_dir

    shared, own = cache_dir(), tmp_path_factory.mktemp("gancore-cache")  # beside, not in, the test's folder
    for name in SHARED_CACHE_ENTRIES:
        (shared / name).mkdir(parents=True, exist_ok=True)
        (own / name).symlink_to(shared / name, target_is_directory=True)
    monkeypatch.setenv("GANCORE_CACHE", str(own))


# Parallel runs (`make test`: pytest -n 2 --dist loadfile --no-loadscope-reorder). Each test file is one unit of
# work, so module- and session-scoped fixtures (a trained extractor, an MLflow server, a reference run) are built
# once, and all Slurm tests live in test_slurm.py, so only one worker submits to the single-node cluster at a time.
# (loadgroup would be finer, but pytest-xdist 3.8 cannot set group ids on pytest 9.2's node ids.) Files go out in
# this order, the longest first, so that no worker is left with a long one at the end.
_FIRST = ("tests/test_slurm.py", "tests/test_sweep.py", "tests/test_metrics.py", "tests/test_fast_path.py",
          "tests/test_tracking_outage.py", "tests/test_faults.py", "tests/test_sweep_faults.py")


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
