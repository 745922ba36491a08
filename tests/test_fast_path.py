"""The fast path (train.compile, gancore/train/fast.py) against the plain loop; GPU-only parts skip with a reason on CPU.

Stated tolerances.
- The static step (what `cudagraph` captures on a GPU; on a CPU it runs uncaptured) is bit-identical to the plain
  loop on a CPU: networks, optimiser states, EMA and the loss history, for every family, through a resume.
- torch.compile, one step: losses and gradients equal eager ones within 1e-4 (relative to the largest gradient) --
  inductor may reorder floating-point reductions, nothing more.
- Fifty fp32 steps, compiled or captured vs eager: Adam turns last-bit differences in near-zero gradients into
  full +-lr updates and a GAN amplifies them, so the weights drift apart slowly: each network's weights stay within
  5 % (relative L2 norm of the difference; 1.2-1.4 % measured on the CPU for compile vs eager) and the per-epoch mean
  losses within 1 % (4e-4 measured).
"""

import pytest
import torch

from gancore.train import state as ckpt
from gancore.train import fast
from gancore.config import load_config
from gancore.train.ema import EMA
from gancore.families.base import Batch, StepContext
from gancore.families.base import adam_options
from gancore.registry import FAMILIES
from gancore.train.stats import StatsAccumulator
from gancore.train.loop import fit
from conftest import may_skip, needs_mnist, tiny

STEPS = 50
RTOL_GRAD, RTOL_WEIGHTS, RTOL_LOSS = 1e-4, 5e-2, 1e-2
_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture)")


def needs_cuda(test):
    """Skipped without a CUDA GPU: the one skip CI (a CPU machine) accepts, with the Inception-weights test."""
    return may_skip(_no_cuda(test))


# ----------------------------------------------------------------------------------------------------------------
# The plan: what each mode does on which machine, and the one-line reason for every fallback


def test_plan_per_mode_and_machine():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert fast.plan("none", gpu, 1, "no") == fast.Plan(False, False, False)
    assert fast.plan("compile", gpu, 1, "no") == fast.Plan(True, False, False)
    assert fast.plan("cudagraph", gpu, 1, "bf16") == fast.Plan(False, True, True)
    assert fast.plan("compile_cudagraph", gpu, 1, "no") == fast.Plan(True, True, True)
    p = fast.plan("cudagraph", cpu, 1, "no")
    assert (p.static_step, p.capture) == (True, False) and "need a CUDA device" in p.notice
    p = fast.plan("cudagraph", gpu, 1, "fp16")
    assert (p.static_step, p.capture) == (False, False) and "mixed_precision=bf16" in p.notice
    p = fast.plan("compile_cudagraph", gpu, 4, "no")
    assert (p.compile, p.static_step, p.capture) == (True, False, False) and "4 processes" in p.notice
    for p in (fast.plan("cudagraph", cpu, 1, "no"), fast.plan("cudagraph", gpu, 1, "fp16")):
        assert "\n" not in p.notice


@needs_mnist
def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line(tmp_path, capsys, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(fast, "cpu_has_bf16", lambda: False)
    note = fast.precision_notice(cpu, "bf16")
    assert "no native bf16" in note and "train.mixed_precision=no" in note and "\n" not in note
    assert fast.precision_notice(cpu, "no") is None and fast.precision_notice(gpu, "bf16") is None
    fit(tiny("train.mixed_precision=bf16", "train.max_steps=1"), out=tmp_path / "run")  # the run goes on, warned
    assert capsys.readouterr().out.count("no native bf16") == 1
    monkeypatch.setattr(fast, "cpu_has_bf16", lambda: True)
    assert fast.precision_notice(cpu, "bf16") is None


@needs_mnist
def test_fp16_on_a_cpu_says_in_one_line_that_it_trains_in_fp32(tmp_path, capsys):
    from gancore.train.loop import _accelerator

    acc = _accelerator(tiny("train.mixed_precision=fp16"))  # what the notice says, from Accelerate itself
    assert acc.scaler is None and not acc.native_amp
    note = fast.precision_notice(torch.device("cpu"), "fp16")
    assert "plain fp32" in note and "train.mixed_precision=no" in note and "\n" not in note
    assert fast.precision_notice(torch.device("cuda", 0), "fp16") is None
    fit(tiny("train.mixed_precision=fp16", "train.max_steps=1"), out=tmp_path / "run")
    assert capsys.readouterr().out.count("plain fp32") == 1


def test_adam_options_and_restore_after_load():
    cfg = load_config(None, ["model.arch=mlp", "model.nz=8", "train.compile=cudagraph"])
    fam = FAMILIES["gan"](cfg, (1, 28, 28), 10)
    opt = fam.optimizers["D"]
    expected = {"fused": True, "capturable": True} if torch.cuda.is_available() else {"fused": None, "capturable": False}
    assert {k: opt.param_groups[0][k] for k in expected} == expected
    # a checkpoint written by a fused Adam (a GPU run) resumed by a plain one: this run's flags come back and the
    # step counter moves to where the plain Adam keeps it (the CPU)
    p = torch.nn.Parameter(torch.randn(5))
    fused = torch.optim.Adam([p], lr=0.1, fused=True)
    p.grad = torch.ones(5)
    fused.step()
    plain = torch.optim.Adam([p], lr=0.1)
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is True  # what load_state_dict does on its own
    fast.restore_adam_options(plain, adam_options("none"))
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["capturable"] is False
    assert plain.state[p]["step"].device.type == "cpu" and float(plain.state[p]["step"]) == 1.0
    plain.step()
    assert float(plain.state[p]["step"]) == 2.0


def test_draws_per_step_counts_fresh_batches():
    from gancore.families.base import Phase

    fam = FAMILIES["gan"](load_config(None, ["model.arch=mlp", "model.nz=8", "optim.d_iters=3"]), (1, 28, 28), 10)
    assert fam.draws_per_step() == 3  # D x 3 with a fresh batch each; G reuses the last one
    loss = fam.d_loss
    fam.phases = [Phase("A", "D", loss, repeats=2, fresh_batch=False), Phase("B", "G", loss, repeats=2)]
    assert fam.draws_per_step() == 3  # the first phase has no batch yet: one draw, then B's two
    fam.phases = [Phase("A", "D", loss, fresh_batch=False)]
    assert fam.draws_per_step() == 1


# ----------------------------------------------------------------------------------------------------------------
# The pieces the captured step is made of: on-device statistics and EMA


def test_stats_blocks_match_hand_computed_means():
    acc = StatsAccumulator()
    keys = ("Loss/D", "D/acc")
    for v in ([1.0, 0.5], [3.0, 1.0], [2.0, 0.0]):
        acc.add_block(keys, torch.tensor(v))
    acc.add_block(("Loss/G",), torch.tensor([4.0]))
    acc.add_counts({"Loss/D": 3, "D/acc": 3, "Loss/G": 1})
    buffer = acc.blocks[keys]
    state = acc.state_dict()
    assert {k: float(v) for k, v in state["sums"].items()} == {"Loss/D": 6.0, "D/acc": 1.5, "Loss/G": 4.0}
    assert acc.read() == {"D/acc": 0.5, "Loss/D": 2.0, "Loss/G": 4.0}
    assert acc.blocks[keys] is buffer and buffer.tolist() == [0.0, 0.0]  # zeroed in place, never replaced
    assert acc.read() == {}
    # sums from a checkpoint continue inside the first block that holds their key
    resumed = StatsAccumulator()
    resumed.load_state_dict(state)
    resumed.add_block(keys, torch.tensor([1.0, 1.0]))
    resumed.add_counts({"Loss/D": 1, "D/acc": 1})
    assert resumed.read() == {"D/acc": 2.5 / 4, "Loss/D": 7.0 / 4, "Loss/G": 4.0}


def test_ema_device_counter_matches_the_host_formula():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, decay=0.9)
    shadow = [p.detach().clone() for p in net.parameters()]
    for t in range(20):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.9, (1 + t) / (10 + t))
        torch._foreach_lerp_(shadow, [p.detach() for p in net.parameters()], 1 - d)
    assert ema.num_updates == 20
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow.parameters()))
    again = EMA(net, decay=0.9)
    again.load_state_dict(ema.state_dict())  # the counter travels as extra state, as in older checkpoints
    assert again.num_updates == 20 and "updates" not in ema.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# The static step equals the plain loop, bit for bit, for every family (and across a resume)

SMALL_GANOMALY = ("model.ngf=8", "model.ndf=8", "model.nz=16", "ganomaly.test_subset=200")
FAMILY_RUNS = {
    "dcgan": lambda *o: tiny(*o),
    "mlp-bf16": lambda *o: tiny("model.arch=mlp", "train.mixed_precision=bf16", *o),  # autocast, no cast cache
    "wgan_gp-d_iters2-ema": lambda *o: tiny("optim.d_iters=2", "loss.name=wgan_gp", "model.batchnorm=g",
                                            "train.ema_decay=0.9", *o),
    "vae": lambda *o: tiny("vae.test_subset=100", *o, config="configs/mnist_vae.yaml"),
    "ganomaly": lambda *o: tiny(*SMALL_GANOMALY, *o, config="configs/mnist_ganomaly.yaml"),
    "ddpm": lambda *o: tiny("data.subset=64", "optim.batch_size=16", "train.grid_size=4", "model.ngf=8",
                            "diffusion.channel_mult=[1,2]", "diffusion.num_res_blocks=1", "diffusion.sample_steps=2",
                            "diffusion.timesteps=20", *o, config="configs/mnist_ddpm_tiny.yaml"),
}


def _diffs(a, b, path=""):
    if isinstance(a, dict):
        return [f"{path}: keys"] if set(a) != set(b) else [d for k in a for d in _diffs(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        return [f"{path}: length"] if len(a) != len(b) else \
            [d for i, (u, v) in enumerate(zip(a, b)) for d in _diffs(u, v, f"{path}[{i}]")]
    if torch.is_tensor(a):
        return [] if torch.equal(a, b) else [path]
    return [] if a == b else [path]



@needs_mnist
@pytest.mark.parametrize("name", list(FAMILY_RUNS))
def test_static_step_is_bit_identical_to_the_plain_loop(tmp_path, capsys, one_thread, name):
    make = FAMILY_RUNS[name]
    plain = fit(make("train.epochs=3"), out=tmp_path / "plain")
    cfg = make("train.epochs=3", "train.compile=cudagraph")
    part = fit(cfg, out=tmp_path / "static", stop_after=plain.total_steps // 2 + 1)  # stops mid-epoch
    assert part.status == "stopped"
    static = fit(cfg, out=tmp_path / "static", resume="auto")
    assert static.status == "finished" and static.step == plain.step
    if not torch.cuda.is_available():
        assert "CUDA graphs need a CUDA device; the same static step runs uncaptured" in capsys.readouterr().out
    a, b = ckpt.load(plain.checkpoint), ckpt.load(static.checkpoint)
    for key in ("networks", "optimizers", "ema", "loader", "history", "step"):
        assert _diffs(a[key], b[key]) == [], key


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: one step within 1e-4; fifty steps within the stated tolerances


def _grads(fam, batch):
    """Loss and flattened gradients of every phase of one step, without optimiser updates."""
    out, ctx = [], StepContext()
    for phase in fam.phases:
        for net in fam.networks.values():
            net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same noise inside each phase for both variants
        loss, _ = phase.loss(batch, ctx)
        loss.backward()
        params = [p for group in fam.optimizers[phase.optimizer].param_groups for p in group["params"]]
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    return out


@pytest.fixture
def dynamo():
    """torch._dynamo's counters, cleared; afterwards its suppress_errors flag (compile_networks sets it True: a failed
    compilation falls back to eager) is restored, so no later test inherits a silent fallback."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.config.suppress_errors = suppress
    torch._dynamo.reset()


def _assert_compiled(counters) -> None:
    """Dynamo captured graphs and the backend compiled them; a fallback to eager (suppress_errors) counts no 'ok'."""
    frames, aot = dict(counters["frames"]), dict(counters["aot_autograd"])
    assert frames.get("ok", 0) > 0 and aot.get("ok", 0) > 0, f"torch.compile fell back to eager: {frames}, {aot}"


def test_compiled_step_matches_eager_cpu(dynamo):
    cfg = load_config(None, ["model.arch=mlp", "model.nz=16"])
    torch.manual_seed(0)
    eager = FAMILIES["gan"](cfg, (1, 28, 28), 10)
    torch.manual_seed(0)
    comp = FAMILIES["gan"](cfg, (1, 28, 28), 10)
    for net in comp.networks.values():
        net.compile()
    batch = Batch(torch.rand(32, 1, 28, 28) * 2 - 1, torch.zeros(32, dtype=torch.long))
    for (le, ge), (lc, gc) in zip(_grads(eager, batch), _grads(comp, batch)):
        assert lc.item() == pytest.approx(le.item(), rel=RTOL_GRAD)
        assert (ge - gc).abs().max().item() <= RTOL_GRAD * ge.abs().max().item()
    _assert_compiled(dynamo)


def _run(tmp_path, mode, *over):
    cfg = tiny("model.arch=mlp", "data.subset=512", "optim.batch_size=32", f"train.max_steps={STEPS}",
               f"train.compile={mode}", "train.snapshot_epochs=[]", f"track.image_every={10**6}", *over)
    return ckpt.load(fit(cfg, out=tmp_path / mode).checkpoint)


def _assert_tracks(eager, fast_):
    for net in eager["networks"]:
        we = torch.cat([v.flatten().float() for v in eager["networks"][net].values() if v.is_floating_point()])
        wf = torch.cat([v.flatten().float() for v in fast_["networks"][net].values() if v.is_floating_point()])
        assert ((we - wf).norm() / we.norm()).item() <= RTOL_WEIGHTS, net
    for key in ("Loss/D", "Loss/G"):
        assert fast_["history"][key] == pytest.approx(eager["history"][key], rel=RTOL_LOSS), key


@needs_mnist
@pytest.mark.slow
def test_compiled_training_tracks_eager_fp32_cpu(tmp_path, dynamo):
    eager = _run(tmp_path, "none")
    assert not dynamo["frames"]  # the plain loop compiles nothing
    _assert_tracks(eager, _run(tmp_path, "compile"))
    _assert_compiled(dynamo)


# ----------------------------------------------------------------------------------------------------------------
# GPU: the captured step (skipped with a reason on CPU machines; its capture, replay and fallback logic also runs on
# the CPU against fakes of the CUDA graph API: tests/test_fast_path_fakes.py)


@needs_mnist
@needs_cuda
@pytest.mark.parametrize("mode", ["compile", "cudagraph", "compile_cudagraph"])
def test_fast_training_tracks_eager_fp32_gpu(tmp_path, mode, dynamo):
    _assert_tracks(_run(tmp_path, "none", "model.arch=dcgan_mnist"), _run(tmp_path, mode, "model.arch=dcgan_mnist"))
    if "compile" in mode:
        _assert_compiled(dynamo)


@needs_mnist
@needs_cuda
def test_captured_bf16_run_tracks_the_eager_bf16_run(tmp_path):
    over = ("model.arch=dcgan_mnist", "train.mixed_precision=bf16", "train.ema_decay=0.99")
    eager, captured = _run(tmp_path, "none", *over), _run(tmp_path, "cudagraph", *over)
    _assert_tracks(eager, captured)
    as_net = lambda st: {"networks": {"ema": st["ema"]}, "history": st["history"]}  # noqa: E731
    _assert_tracks(as_net(eager), as_net(captured))  # the EMA copy too


@needs_mnist
@needs_cuda
def test_capture_failure_falls_back_with_one_line(tmp_path, capsys, monkeypatch):
    from gancore.families.gan import GAN

    d_loss = GAN.d_loss

    def reads_the_host(self, batch, step):  # data-dependent control flow: cannot be captured
        loss, stats = d_loss(self, batch, step)
        return (loss * 2 if loss.item() > 100 else loss), stats

    monkeypatch.setattr(GAN, "d_loss", reads_the_host)
    eager = _run(tmp_path, "none", "model.arch=dcgan_mnist")
    capsys.readouterr()
    state = _run(tmp_path, "cudagraph", "model.arch=dcgan_mnist")
    out = capsys.readouterr().out
    assert "could not be captured in a CUDA graph" in out and "it runs uncaptured from here" in out
    assert state["step"] == STEPS
    _assert_tracks(eager, state)  # the run goes on as the plain step would


@needs_mnist
def test_vmapped_ensemble_is_k_separate_trainings():
    """bench/ensemble_speed.py's claim: K stacked DCGANs stepped under vmap = the K stepped one after another
    (float64: rounding only; float32: Adam magnifies rounding-size gradient differences, still small)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("ensemble_speed", ROOT / "bench" / "ensemble_speed.py")
    ens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ens)
    cpu = torch.device("cpu")
    data = ens._real_data(cpu)[:512]
    assert ens.check(2, 2, data, cpu, torch.float64, batch=16) < 1e-9
    assert ens.check(2, 2, data, cpu, torch.float32, batch=16) < 2e-3  # measured 1.8e-4
