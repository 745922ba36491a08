"""The GPU path's logic without a GPU: CUDA-graph capture, replay and the capture-failure fallback of
gancore/train/fast.py's StaticStep run on the CPU against fakes of the CUDA graph/stream API; fp16's GradScaler
state through a stop and resume; `train.channels_last` through a stop and resume.

The fake graph behaves as a CUDA graph does where it matters to fast.py: capture records the aten ops the step
runs (a TorchDispatchMode) and leaves every tensor that existed before it, and the RNG, as they were (a capture
computes nothing); `replay()` re-runs the recorded ops on the same tensors (the graph's fixed addresses: the
static input buffers, parameters, optimiser state, statistics blocks), so a step that forgot to copy a batch
into its buffer, replaced a buffer instead of writing into it, or baked a host value into the capture diverges
from the plain loop. A host read while capturing (`.item()`, `if tensor:`) raises, as on a capturing stream.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import may_skip, needs_mnist, state_diffs, tiny
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gancore.families import base
from gancore.train import fast
from gancore.train import loop
from gancore.train import state as ckpt
from gancore.train.loop import fit

pytestmark = [needs_mnist, may_skip, pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA machine captures for real (tests/test_fast_path.py)")]

aten = torch.ops.aten
# a small DCGAN on 16x16 MNIST (BatchNorm, conv, transposed conv): 4 steps per epoch of batch 32
SMALL = ("model.arch=dcgan", "data.image_size=16", "model.nz=16", "model.ngf=8", "model.ndf=8",
         "train.snapshot_epochs=[]", "track.image_every=1000")
STATE_KEYS = ("step", "networks", "optimizers", "ema", "scaler", "loader", "history", "epoch_stats")
CAPTURE_ERROR = "operation not permitted when stream is capturing"


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    """The ops of one capture, for replay; what they write in memory that existed before is restored on exit."""

    HOST_READS = (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default)
    # writes its schema does not declare: BatchNorm's running statistics (running_mean, running_var)
    UNDECLARED_WRITES = {aten.native_batch_norm.default: (3, 4)}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []  # (op, args, kwargs, [(recorded output, its index in the op's outputs)])
        self.fresh: set[int] = set()  # storages the capture allocated (the graph's own pool)
        self.saved: dict[int, tuple] = {}  # storage -> (storage, its bytes before the capture first wrote it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.HOST_READS:
            raise RuntimeError(f"CUDA error: {CAPTURE_ERROR} (fake graph: {func} reads a tensor on the host)")
        if func.namespace == "profiler":  # record_function markers: not kernels
            return func(*args, **kwargs)
        written = [(i, a) for i, a in enumerate(func._schema.arguments)
                   if (a.alias_info and a.alias_info.is_write) or i in self.UNDECLARED_WRITES.get(func, ())]
        for i, a in written:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            for t in tree_leaves(value):
                if torch.is_tensor(t) and _ptr(t) and _ptr(t) not in self.fresh and _ptr(t) not in self.saved:
                    self.saved[_ptr(t)] = (t.untyped_storage(), t.untyped_storage().clone())
        out = func(*args, **kwargs)
        inputs = {_ptr(t) for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        copy_back = []  # outputs in memory of their own: recomputed and copied back in place at replay
        for i, t in enumerate(tree_leaves(out)):
            if torch.is_tensor(t) and _ptr(t) not in inputs:
                copy_back.append((t, i))
                self.fresh.add(_ptr(t))
        self.ops.append((func, args, kwargs, copy_back))
        return out

    def restore(self) -> None:
        for storage, before in self.saved.values():
            storage.copy_(before)


class FakeGraph:
    """torch.cuda.CUDAGraph: `replay()` re-runs the captured ops on the tensors the capture used."""

    def __init__(self) -> None:
        self.ops: list[tuple] | None = None
        self.replays = 0
        graphs.append(self)

    @torch.no_grad()
    def replay(self) -> None:
        assert self.ops is not None, "replay() of a graph that was never captured"
        for func, args, kwargs, copy_back in self.ops:
            new = func(*args, **kwargs)
            if copy_back:
                leaves = tree_leaves(new)
                for recorded, i in copy_back:
                    recorded.copy_(leaves[i])
        self.replays += 1


graphs: list[FakeGraph] = []


@contextlib.contextmanager
def fake_graph(graph: FakeGraph, pool=None, stream=None, capture_error_mode: str = "global"):
    """torch.cuda.graph: the body runs under the recorder; afterwards memory and RNG are as before it."""
    rng = torch.get_rng_state()
    recorder = _Recorder()
    try:
        with recorder:
            yield graph
    finally:
        recorder.restore()
        torch.set_rng_state(rng)
    graph.ops = recorder.ops


class FakeStream:
    def wait_stream(self, other: "FakeStream") -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA graph/stream API fast.py calls, faked; the plan is the CUDA device's; Adam is fused for every run
    of the test, the plain reference included (its step counter read in the kernel, as fused capturable Adam on a
    GPU; the CPU's default Adam reads it with .item(), and its capture fails). Yields what the fakes saw."""
    seen = {"side_stream_steps": 0}
    graphs.clear()

    @contextlib.contextmanager
    def stream(s):
        seen["side_stream_steps"] += 1
        yield

    for name, fake in {"CUDAGraph": FakeGraph, "graph": fake_graph, "Stream": FakeStream, "stream": stream,
                       "current_stream": lambda device=None: FakeStream(), "synchronize": lambda device=None: None
                       }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    real_plan, real_adam = fast.plan, base.adam_options
    on_cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fast, "plan", lambda mode, device, world, mp: real_plan(mode, on_cuda, world, mp))
    monkeypatch.setattr(base, "adam_options", lambda mode: {**real_adam(mode), "fused": True})
    yield seen



def _assert_same(a_path, b_path, keys=STATE_KEYS) -> tuple[dict, dict]:
    a, b = ckpt.load(a_path), ckpt.load(b_path)
    for key in keys:
        assert state_diffs(a[key], b[key]) == [], key
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# Capture and replay, a stop and resume between them


@pytest.mark.parametrize("epochs,over", [(4, ()), (8, ("optim.d_iters=2", "loss.name=wgan_gp", "model.batchnorm=g",
                                                     "train.ema_decay=0.9"))], ids=["dcgan", "wgan_gp-d_iters2-ema"])
def test_captured_step_replays_bit_identical_to_the_plain_loop(tmp_path, capsys, fake_cuda, one_thread, epochs, over):
    plain = fit(tiny(*SMALL, f"train.epochs={epochs}", *over), out=tmp_path / "plain")  # 16 steps
    assert graphs == []  # the plain loop captures nothing
    cfg = tiny(*SMALL, f"train.epochs={epochs}", "train.compile=cudagraph", *over)
    total, stop = plain.total_steps, plain.total_steps // 2 + 1  # a stop mid-epoch
    part = fit(cfg, out=tmp_path / "captured", stop_after=stop)
    assert part.status == "stopped"
    resumed = fit(cfg, out=tmp_path / "captured", resume="auto")
    assert resumed.status == "finished" and resumed.step == plain.step == total == 16
    # each session: WARMUP steps on the side stream, one capture (replayed at once), a replay per later step
    warm = fast.StaticStep.WARMUP
    assert fake_cuda["side_stream_steps"] == 2 * warm
    assert [g.replays for g in graphs] == [stop - warm, total - stop - warm]
    assert all(len(g.ops) > 100 for g in graphs)  # forward, backward, Adam, EMA, statistics
    out = capsys.readouterr().out
    assert "could not be captured" not in out and "need a CUDA device" not in out
    _assert_same(plain.checkpoint, resumed.checkpoint)


def test_replay_reads_the_static_input_buffers(tmp_path, fake_cuda, one_thread, monkeypatch):
    """The fake can fail: a step that hands the graph a fresh tensor instead of copying into its buffer trains on
    the capture's batch forever and parts from the plain loop."""
    plain = fit(tiny(*SMALL, "train.epochs=2"), out=tmp_path / "plain")
    call = fast.StaticStep.__call__

    def rebinds_the_buffers(self):
        if self.inputs is not None:
            self.inputs = [(x.clone(), y.clone()) for x, y in self.inputs]  # new memory: the graph never sees it
        call(self)

    monkeypatch.setattr(fast.StaticStep, "__call__", rebinds_the_buffers)
    broken = fit(tiny(*SMALL, "train.epochs=2", "train.compile=cudagraph"), out=tmp_path / "broken")
    assert graphs[0].replays == plain.total_steps - fast.StaticStep.WARMUP
    a, b = ckpt.load(plain.checkpoint), ckpt.load(broken.checkpoint)
    assert state_diffs(a["networks"], b["networks"]) != []


# ----------------------------------------------------------------------------------------------------------------
# A step that cannot be captured: one line, then the plain step, bit-identical


def test_capture_failure_prints_one_line_and_runs_on_bit_identical(tmp_path, capsys, fake_cuda, one_thread,
                                                                   monkeypatch):
    from gancore.families.gan import GAN

    d_loss = GAN.d_loss

    def reads_the_host(self, batch, step):  # data-dependent control flow: cannot be captured
        loss, stats = d_loss(self, batch, step)
        return (loss * 2 if loss.item() > 100 else loss), stats

    monkeypatch.setattr(GAN, "d_loss", reads_the_host)
    plain = fit(tiny(*SMALL, "train.epochs=3"), out=tmp_path / "plain")
    capsys.readouterr()
    captured = fit(tiny(*SMALL, "train.epochs=3", "train.compile=cudagraph"), out=tmp_path / "fallback")
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not be captured" in line]
    assert lines == [f"train.compile=cudagraph: the step could not be captured in a CUDA graph (CUDA error: "
                     f"{CAPTURE_ERROR} (fake graph: aten._local_scalar_dense.default reads a tensor on the host)); "
                     "it runs uncaptured from here"]
    assert len(graphs) == 1 and graphs[0].ops is None and graphs[0].replays == 0  # never replayed
    assert captured.step == plain.step
    _assert_same(plain.checkpoint, captured.checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# fp16: the GradScaler's state through a stop and resume


def test_grad_scaler_state_survives_a_stop_and_resume(tmp_path, monkeypatch, one_thread):
    """Accelerate makes no GradScaler on a CPU (fp16 there is plain fp32: accelerator.scaler is None), so each run
    is handed the scaler Accelerate makes on a GPU, torch.amp.GradScaler, with a short growth interval: the scale
    doubles every 5 overflow-free updates and the growth tracker counts the updates since. Every optimiser step
    updates it (Accelerate's AcceleratedOptimizer.step): two updates per GAN step (D, then G)."""
    make = loop._accelerator

    def with_scaler(cfg):
        accelerator = make(cfg)
        assert accelerator.scaler is None  # what Accelerate does on a CPU (this test's reason to exist)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=5)
        return accelerator

    monkeypatch.setattr(loop, "_accelerator", with_scaler)
    cfg = tiny(*SMALL, "train.epochs=3", "train.mixed_precision=fp16")  # 12 steps
    full = fit(cfg, out=tmp_path / "full")
    part = fit(cfg, out=tmp_path / "part", stop_after=7)
    # 7 steps = 14 updates: two doublings, 4 updates since
    assert ckpt.load(part.checkpoint)["scaler"] == {"scale": 16.0 * 2 ** 2, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                    "growth_interval": 5, "_growth_tracker": 4}
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")
    a, _ = _assert_same(full.checkpoint, resumed.checkpoint)
    # 24 updates: four doublings, 4 since (a resume that restarted the scaler would end at 16 * 2 ** 2, 0 since)
    assert a["step"] == 12 and (a["scaler"]["scale"], a["scaler"]["_growth_tracker"]) == (16.0 * 2 ** 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# train.channels_last: NHWC weights, trained and resumed bit-identically


def test_channels_last_trains_and_resumes_bit_identical(tmp_path, one_thread):
    cfg = tiny(*SMALL, "train.epochs=3", "train.channels_last=true", "train.ema_decay=0.9")
    full = fit(cfg, out=tmp_path / "full")
    part = fit(cfg, out=tmp_path / "part", stop_after=5)
    assert part.status == "stopped"
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")
    a, b = _assert_same(full.checkpoint, resumed.checkpoint)
    nchw = ckpt.load(fit(tiny(*SMALL, "train.epochs=3", "train.ema_decay=0.9"), out=tmp_path / "nchw").checkpoint)
    for state in (a, b):  # the layout travelled: every 4-d weight with more than one channel is NHWC, not NCHW
        convs = {k: w for net in state["networks"].values() for k, w in net.items() if w.dim() == 4}
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs.values())
        assert any(not w.is_contiguous() for w in convs.values())
    assert all(w.is_contiguous() for net in nchw["networks"].values() for w in net.values())
    assert a["history"]["Loss/D"] == pytest.approx(nchw["history"]["Loss/D"], rel=1e-3)  # the same training
