"""The fast path (`train.compile`): fewer kernel launches, no host syncs, one CUDA graph per training step.

    none               the plain loop of gancore/train/loop.py (the reference for exactness)
    compile            torch.compile every network (inductor kernels); the loop itself unchanged
    cudagraph          the whole step -- every phase's forward, backward and optimiser step, the EMA update and the
                       statistics -- captured once in a CUDA graph and replayed: one launch per step instead of
                       hundreds, so a small model is no longer bound by the CPU issuing kernels
    compile_cudagraph  both: compiled networks inside the captured step

A captured step needs static shapes (DeviceLoader drops the last partial batch; each batch is copied into a fixed
buffer before the replay), data already on the device (DeviceLoader), an optimiser whose step counter lives on the
device (fused Adam with capturable=True), statistics summed on the device into fixed accumulators (read every
`train.log_every` steps) and an EMA whose decay warm-up is computed on the device. What cannot be captured falls
back with one line saying why:

- no CUDA device: the same static step runs uncaptured (CPU machines, tests);
- fp16: the GradScaler reads an inf/NaN flag on the host at every step (use bf16, which needs no scaler);
- several processes: DDP's gradient all-reduce hooks are not captured here (the plain step runs);
- a phase that reads a tensor on the host (`.item()`, `if tensor:`) or allocates on the CPU: the capture fails
  and the step runs uncaptured from then on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from gancore.config import CAPTURED, COMPILED



@dataclass(frozen=True)
class Plan:
    """What the trainer does for one `train.compile` mode on one machine."""

    compile: bool  # torch.compile the networks
    static_step: bool  # run steps through StaticStep (fixed buffers, on-device statistics)
    capture: bool  # capture StaticStep in a CUDA graph after a few warm-up steps
    notice: str | None = None  # one line for the user when the mode could not be honoured in full


def plan(mode: str, device: torch.device, world: int, mixed_precision: str) -> Plan:
    """The fast-path plan for `mode` on `device` with `world` processes; explains every fallback in `notice`."""
    compile_ = mode in COMPILED
    if mode not in CAPTURED:
        return Plan(compile_, False, False)
    why = None
    if world > 1:
        why = f"not captured with {world} processes (DDP's all-reduce hooks); running the plain step"
    elif mixed_precision == "fp16":
        why = ("not captured under fp16 (its GradScaler reads an overflow flag on the host every step); running "
               "the plain step; train.mixed_precision=bf16 can be captured")
    if why:
        return Plan(compile_, False, False, f"train.compile={mode}: {why}")
    if device.type != "cuda":
        return Plan(compile_, True, False, f"train.compile={mode}: CUDA graphs need a CUDA device; the same static "
                                            f"step runs uncaptured on {device.type}")
    return Plan(compile_, True, True)


def setup(cfg: Any, networks: dict[str, nn.Module], device: torch.device, world: int, is_main: bool) -> Plan:
    """The run's plan, applied to its networks before Accelerate wraps them: notices (main process), channels_last,
    torch.compile, cuDNN autotuning."""
    p = plan(cfg.train.compile, device, world, cfg.train.mixed_precision)
    for notice in (p.notice, precision_notice(device, cfg.train.mixed_precision)):
        if is_main and notice:
            print(notice, flush=True)
    if cfg.train.channels_last:
        to_channels_last(networks)
    if p.compile:
        compile_networks(networks, is_main, cfg.train.compile)
    if device.type == "cuda" and cfg.train.compile != "none":
        torch.backends.cudnn.benchmark = True  # static shapes: autotune each convolution once
    return p


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it); True when unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def precision_notice(device: torch.device, mixed_precision: str) -> str | None:
    """A one-line warning for a precision that will crawl on this device, else None (the run goes on as asked)."""
    if device.type == "cpu" and mixed_precision == "bf16" and not cpu_has_bf16():
        return ("train.mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated and "
                "many times slower than fp32 (the MNIST DCGAN step: ~25x on a 2-core AVX2 CPU); use "
                "train.mixed_precision=no here")
    if device.type == "cpu" and mixed_precision == "fp16":  # Accelerate makes neither an autocast nor a scaler
        return ("train.mixed_precision=fp16: on a CPU Accelerate trains in plain fp32 (no fp16 autocast, no "
                "gradient scaler), so the run goes on in fp32; use train.mixed_precision=no here to say so")
    return None


def restore_adam_options(opt: torch.optim.Optimizer, options: dict[str, Any]) -> None:
    """After `load_state_dict` (which copies the saved run's flags into the param groups): this run's flags, and
    Adam's step counters where these flags want them (on the parameter's device when fused/capturable, else CPU)."""
    opt = getattr(opt, "optimizer", opt)  # Accelerate's wrapper
    for group in opt.param_groups:
        group.update(options)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device if on_device else "cpu")


def compile_networks(nets: dict[str, nn.Module], notify: bool, mode: str) -> None:
    """torch.compile every network's forward in place (state_dict keys stay unchanged for checkpoints).

    Where compilation is impossible (no C++ compiler, an unsupported op), dynamo falls back to eager per graph.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # fall back to eager instead of failing the run
    for net in nets.values():
        net.compile()
    if notify:
        print(f"train.compile={mode}: networks compiled with torch.compile (first steps are slow while it compiles)")


def to_channels_last(nets: dict[str, nn.Module]) -> None:
    """NHWC weights (4-d tensors only): convolutions then produce NHWC outputs, which cuDNN's tensor-core kernels
    prefer under bf16/fp16 (no layout transposes)."""
    for net in nets.values():
        net.to(memory_format=torch.channels_last)


class StaticStep:
    """The trainer's step function run over fixed buffers, with nothing that reads a value on the host.

    Each call draws the step's real batches from the loader and copies them into fixed input buffers, then runs
    the trainer's `one_step(draw, report, autocast)` (phases, EMA) with `draw` serving those buffers in order and
    `report` adding each phase's statistics into the accumulators' fixed on-device blocks. On a CUDA device
    (`capture=True`) the first WARMUP calls run on a side stream (lazy initialisation, cuDNN autotuning,
    compilation, Adam's state), the next call is captured into one CUDA graph, and every later call is a copy of
    the inputs plus one `graph.replay()`. Uncaptured, it computes bit-for-bit what the plain step computes.
    """

    WARMUP = 3

    def __init__(self, one_step: Callable, family, loader, draws: int, accumulators: list, capture: bool, mode: str,
                 notify: Callable[[str], None] = print):
        from accelerate.utils import AutocastKwargs

        self.one_step, self.family, self.loader, self.draws = one_step, family, loader, draws
        self.accumulators = accumulators
        self.capture, self.mode, self.notify = capture, mode, notify
        # autocast's weight-cast cache is not needed across phases; recast inside each phase (graph-local memory)
        self.autocast = AutocastKwargs(cache_enabled=False)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.counts: dict[str, int] = {}  # statistics reported per step (known once the body has run)
        self.graph: Any = None
        self._side: Any = None  # the warm-up stream
        self.calls = 0

    # ------------------------------------------------------------------------------------------------------------
    def __call__(self) -> None:
        batches = [self.loader.next() for _ in range(self.draws)]
        if self.inputs is None:
            self.inputs = [(x.clone(), y.clone()) for x, y in batches]  # the fixed buffers the graph reads
        else:
            for (sx, sy), (x, y) in zip(self.inputs, batches):
                sx.copy_(x, non_blocking=True)
                sy.copy_(y, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.calls >= self.WARMUP:
            self._capture()
        elif self.capture:
            self._on_side_stream()
        else:
            self._body()
        self.calls += 1
        for acc in self.accumulators:
            acc.add_counts(self.counts)

    def _body(self) -> None:
        """one_step over the fixed buffers, statistics into the fixed blocks."""
        inputs = iter(self.inputs)
        counts: dict[str, int] = {}

        def draw():
            return self.family.prepare(*next(inputs))

        def report(stats: dict[str, torch.Tensor]) -> None:
            keys = tuple(stats)
            values = torch.stack([v.detach().float() for v in stats.values()])
            for acc in self.accumulators:
                acc.add_block(keys, values)
            for key in keys:
                counts[key] = counts.get(key, 0) + 1

        self.one_step(draw, report, self.autocast)
        self.counts = counts

    def _on_side_stream(self) -> None:
        # warm-up must not run on the stream that will later be captured (PyTorch's CUDA-graph recipe)
        if self._side is None:
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        """Record the step into a CUDA graph and replay it (the recording itself computes nothing)."""
        torch.cuda.synchronize()
        for opt in self.family.optimizers.values():
            opt.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (MLflow's async logger, say) do not break the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._body()
        except Exception as e:  # data-dependent control flow, a host read, an unsupported op ...
            with contextlib.suppress(Exception):  # an invalidated capture is not sticky: the context stays usable
                torch.cuda.synchronize()
            self.capture = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.notify(f"train.compile={self.mode}: the step could not be captured in a CUDA graph ({first[:160]}); "
                        "it runs uncaptured from here")
            self._body()
            return
        self.graph = graph
        graph.replay()
