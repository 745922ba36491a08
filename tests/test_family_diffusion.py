"""Diffusion family: U-Net / report denoiser shapes and one step, the Gaussian process (closed-form q(x_t | x_0),
schedules), deterministic DDIM, guidance, RNG hygiene of sampling, bit-identical resume, tiny end-to-end runs."""

import math

import numpy as np
import pytest
import torch

from gancore.train import state as ckpt
from gancore.config import load_config
from gancore.families.base import Batch, StepContext
from gancore.families.diffusion import Diffusion, GaussianDiffusion, ReportDenoiser, beta_schedule
from gancore.registry import FAMILIES, MODELS
from gancore.train.loop import fit
from conftest import ROOT, needs_cifar, state_diffs, tiny


pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.torch_threads


TINY_UNET = ["model.arch=unet", "model.ngf=8", "diffusion.channel_mult=[1,2]", "diffusion.num_res_blocks=1"]


def _cfg(*over: str, config: str | None = None):
    return load_config(ROOT / config if config else None, [*TINY_UNET, *over])


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The U-Net starts with zero output layers (eps = 0 everywhere); give every weight a random value so
    comparisons between predictions mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _unet(cfg, shape=(3, 16, 16), classes=10):
    return MODELS["unet"](cfg.model, shape, classes, diffusion=cfg.diffusion)["denoiser"]


def _adam_first_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> list[torch.Tensor]:
    """Backward and one step of a fresh Adam, checked against its closed form: bias-corrected m_hat = g and
    v_hat = g^2, so each weight moves by -lr g / (|g| + eps). Returns the gradients."""
    params = [p for group in opt.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    opt.step()
    lr, eps = opt.param_groups[0]["lr"], opt.param_groups[0]["eps"]
    for p, p0, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), p0 - lr * g / (g.abs() + eps), rtol=0, atol=1e-3 * lr)
    return grads


# -- networks ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", [True, False])
def test_unet_shape_and_one_step(attention):
    torch.manual_seed(0)
    cfg = _cfg(f"diffusion.attention={str(attention).lower()}", "optim.beta1=0.9", "optim.lr_g=1e-3")
    fam = Diffusion(cfg, (3, 16, 16), 10)
    net = fam.networks["denoiser"]
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    assert net(x, torch.tensor([0, 10, 500, 999]), y).shape == (4, 3, 16, 16)
    assert net.class_emb.num_embeddings == 11 and fam.null_class == 10
    assert any(type(m).__name__ == "Attention" for m in net.modules()) == attention
    assert torch.equal(net(x, torch.tensor([0, 10, 500, 999]), y), torch.zeros_like(x))  # zero-initialised output
    torch.manual_seed(1)
    loss, stats = fam.phases[0].loss(Batch(x, y[:4].clamp(max=9)), StepContext())
    assert set(stats) == {"Loss/mse", "Loss/total"} and loss.ndim == 0 and stats["Loss/mse"] == loss.detach()
    # eps_theta = 0, so the loss is the mean square of the step's noise: t ~ U{0..T-1} first, then eps ~ N(0, I)
    torch.manual_seed(1)
    torch.randint(0, fam.process.T, (4,))
    assert loss.item() == pytest.approx(torch.randn_like(x).pow(2).mean().item(), rel=1e-6)
    grads = _adam_first_step(fam.optimizers["denoiser"], loss)
    # only the output convolution's weights get a gradient through a zero output layer; it moves by lr per weight
    out_conv = net.out[-1]
    moved = {id(p) for p, g in zip(net.parameters(), grads) if g.any()}
    assert moved == {id(out_conv.weight), id(out_conv.bias)}


def test_unet_rejects_indivisible_size():
    from gancore.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible by 2\\^3"):
        _unet(_cfg("diffusion.channel_mult=[1,2,2,2]"), shape=(1, 28, 28))


def test_report_denoiser_shape_and_one_step():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/cifar10_denoiser_report.yaml", ["model.ngf=8"])
    assert cfg.optim.lr_g == 1e-3 and cfg.train.epochs == 5 and FAMILIES["denoiser_report"] is ReportDenoiser
    fam = ReportDenoiser(cfg, (3, 16, 16), 10)
    net = fam.networks["denoiser"]
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 9])
    assert net(x, y).shape == (4, 3, 16, 16)

    def by_hand(v: torch.Tensor) -> torch.Tensor:  # the module docstring's layout, from the same weights
        F, relu = torch.nn.functional, torch.relu
        e = relu(F.conv2d(relu(F.conv2d(v, net.enc[0].weight, net.enc[0].bias, padding=1)),
                          net.enc[2].weight, net.enc[2].bias, padding=1))
        h = relu(F.conv2d(e, net.down[0].weight, net.down[0].bias, stride=2, padding=1))
        h = h + net.class_emb.weight[y][:, :, None, None]
        h = relu(F.conv2d(h, net.mid[0].weight, net.mid[0].bias, padding=1))
        h = relu(F.conv_transpose2d(h, net.up[0].weight, net.up[0].bias, stride=2, padding=1))
        d = relu(F.conv2d(torch.cat([h, e], 1), net.dec[0].weight, net.dec[0].bias, padding=1))
        return F.conv2d(d, net.dec[2].weight, net.dec[2].bias, padding=1)

    with torch.no_grad():
        torch.testing.assert_close(net(x, y), by_hand(x), rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    loss, stats = fam.phases[0].loss(Batch(x, y), StepContext())
    torch.manual_seed(1)  # the step's one draw: the noise added at sigma
    with torch.no_grad():
        want = (by_hand(x + fam.sigma * torch.randn_like(x)) - x).pow(2).mean()
    assert fam.sigma == 0.5 and stats["Loss/mse"] == loss.detach()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    grads = _adam_first_step(fam.optimizers["denoiser"], loss)
    assert all(g.any() for g in grads)  # every weight learns from the first batch


# -- the process ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_closed_form(schedule):
    """Empirical mean and variance of x_t over 20000 draws vs sqrt(abar_t) x0 and 1 - abar_t (5 standard errors)."""
    proc = GaussianDiffusion(1000, schedule)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([-0.9, 0.0, 0.3, 1.0]).repeat(n, 1)  # (n, 4): four pixel values, n draws each
    for t_ in (0, 99, 499, 999):
        abar = proc.alphas_cumprod[t_].item()
        xt = proc.q_sample(x0, torch.full((n,), t_), torch.randn(x0.shape, generator=g)).double()
        mean, var = xt.mean(0), xt.var(0)
        mean_want = math.sqrt(abar) * x0[0].double()
        se_mean = math.sqrt((1 - abar) / n)
        se_var = (1 - abar) * math.sqrt(2 / (n - 1))
        assert torch.all((mean - mean_want).abs() < 5 * se_mean), (t_, mean, mean_want)
        assert torch.all((var - (1 - abar)).abs() < 5 * se_var), (t_, var, 1 - abar)


def test_schedules():
    """alpha_bar_t against closed forms written out here in float64 numpy: linear, the product of
    1 - beta_i with beta_i = (1000/T) (1e-4 + i (0.02 - 1e-4) / (T - 1)) (Ho et al.; improved-diffusion's 1000/T);
    cosine, the telescoped f(t + 1) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008, up to the last
    step, whose beta (1 at alpha_bar = 0) is clipped to 0.999 (Nichol & Dhariwal)."""
    for T in (1000, 100):
        i = np.arange(T, dtype=np.float64)
        beta = (1000 / T) * (1e-4 + i * (0.02 - 1e-4) / (T - 1))
        ab = GaussianDiffusion(T, "linear").alphas_cumprod
        assert ab.dtype == torch.float64 and ab.shape == (T,)
        np.testing.assert_allclose(beta_schedule("linear", T).numpy(), beta, rtol=1e-12)
        np.testing.assert_allclose(ab.numpy(), [np.prod(1 - beta[: t + 1]) for t in range(T)], rtol=1e-10)
    assert GaussianDiffusion(1000, "linear").alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)

    s_, T = 0.008, 1000
    f = np.cos((np.arange(T + 1) / T + s_) / (1 + s_) * np.pi / 2) ** 2
    cos = GaussianDiffusion(T, "cosine").alphas_cumprod.numpy()
    clipped = 1 - f[1:] / f[:-1] > 0.999
    assert clipped.tolist() == [False] * (T - 1) + [True]  # only the last beta is clipped
    np.testing.assert_allclose(cos[:-1], f[1:T] / f[0], rtol=1e-10)
    assert cos[-1] == pytest.approx(cos[-2] * (1 - 0.999), rel=1e-12)
    middle = np.cos((0.5 + s_) / (1 + s_) * np.pi / 2) ** 2 / np.cos(s_ / (1 + s_) * np.pi / 2) ** 2
    assert cos[499] == pytest.approx(middle, rel=1e-10)  # ~0.494: the cos^2 schedule crosses 1/2 near the middle


def test_ddim_deterministic_and_seed_dependent():
    cfg = _cfg("diffusion.sampler=ddim", "diffusion.sample_steps=5", "train.progress=false")
    fam = Diffusion(cfg, (3, 16, 16), 10)
    _randomised(fam.networks["denoiser"])
    a = fam.sample(4, generator=torch.Generator().manual_seed(1))
    b = fam.sample(4, generator=torch.Generator().manual_seed(1))
    c = fam.sample(4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05
    assert a.shape == (4, 3, 16, 16) and a.abs().max() <= 1.0  # the last step returns the clipped x0 estimate
    # eta = 0: the per-step generator is never used, so the loop's output depends only on the initial noise
    proc, net = fam.process, fam.networks["denoiser"]
    noise, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert torch.equal(proc.ddim_sample_loop(net, noise, y, 5), proc.ddim_sample_loop(net, noise, y, 5))
    assert proc.ddim_timesteps(5) == [999, 749, 500, 250, 0]


def test_sampling_leaves_global_rng_alone():
    """Grids are drawn mid-training; sampling must not move torch's global RNG (resume would diverge)."""
    for sampler in ("ddim", "ddpm"):
        cfg = _cfg(f"diffusion.sampler={sampler}", "diffusion.timesteps=10", "diffusion.ddim_eta=0.5",
                   "diffusion.sample_steps=4", "train.progress=false")
        fam = Diffusion(cfg, (3, 16, 16), 10)
        _randomised(fam.networks["denoiser"])
        fam.networks["denoiser"].train()  # dropout must be off while sampling, and training mode restored
        inputs = fam.fixed_inputs(3, torch.Generator().manual_seed(5))
        state = torch.get_rng_state()
        a = fam.sample(3, inputs=inputs)
        assert torch.equal(state, torch.get_rng_state()), sampler
        assert torch.equal(a, fam.sample(3, inputs=inputs)), sampler  # stochastic sampler, seeded from the inputs
        assert fam.networks["denoiser"].training


def test_guidance_one_is_the_conditional_prediction():
    cfg = _cfg()
    net = _randomised(_unet(cfg))
    proc = GaussianDiffusion(100)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 99]), torch.tensor([0, 4, 7])
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        cond = net(x, t, y)
        assert torch.equal(proc.guided_eps(net, x, t, y, 1.0, null_class=10), cond)
        assert calls == [3, 3]  # s = 1: one conditional pass, no unconditional one
        uncond = net(x, t, torch.full_like(y, 10))
        guided = proc.guided_eps(net, x, t, y, 3.0, null_class=10)  # one batched (2B) pass
    hook.remove()
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert (guided - cond).abs().max() > 1e-3


def test_label_dropout_uses_the_null_class():
    proc = GaussianDiffusion(10)
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    torch.manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    proc.training_loss(model, torch.zeros(4000, 1, 2, 2), y, p_uncond=0.1, null_class=10)
    frac = (seen[0] == 10).float().mean().item()
    assert set(seen[0].unique().tolist()) == {0, 10} and abs(frac - 0.1) < 5 * math.sqrt(0.09 / 4000)
    proc.training_loss(model, torch.zeros(8, 1, 2, 2), None, p_uncond=0.1, null_class=10)
    assert torch.all(seen[1] == 10)  # unlabelled data: the unconditional model


# -- through the trainer -------------------------------------------------------------------------------------------

# the brief's tiny CIFAR-10 run, at 16x16 with a two-level U-Net to keep a 2-core CPU busy for seconds, not minutes
RUN = ["data.subset=64", "data.image_size=16", "optim.batch_size=16", "model.ngf=8", "diffusion.channel_mult=[1,2]",
       "diffusion.num_res_blocks=1", "diffusion.sample_steps=2", "train.grid_size=4"]


@needs_cifar
def test_resume_is_bit_identical(tmp_path):
    cfg = tiny(*RUN, "train.epochs=3", config="configs/cifar10_ddpm.yaml")  # EMA 0.9999, dropout 0.1, p_uncond 0.1: all on
    assert cfg.family == "diffusion" and cfg.train.ema_decay == 0.9999
    full = fit(cfg, out=tmp_path / "full")
    part = fit(cfg, out=tmp_path / "part", stop_after=5)
    assert part.status == "stopped" and part.step == 5
    resumed = fit(cfg, out=tmp_path / "part", resume="auto")
    assert resumed.status == "finished" and resumed.step == full.step == 12
    a, b = ckpt.load(full.checkpoint), ckpt.load(resumed.checkpoint)
    for key in ("networks", "optimizers", "ema", "loader", "history", "step"):
        assert state_diffs(a[key], b[key]) == [], key
    assert a["history"]["Loss/mse"] == b["history"]["Loss/mse"]


@needs_cifar
def test_tiny_end_to_end_writes_figures_and_generates(tmp_path):
    from gancore.generate import generate

    cfg = tiny(*RUN, "train.epochs=1", "diffusion.sampler=ddpm", "diffusion.timesteps=10",
               "diffusion.schedule=cosine", "diffusion.guidance=2", config="configs/cifar10_ddpm.yaml")
    r = fit(cfg, out=tmp_path / "run")
    d = r.run_dir
    assert r.status == "finished" and r.step == 4
    for rel in ["figures/samples_per_class.png", "figures/forward_process.png", "samples/step_00000004.png",
                "snapshots/epoch_001.png", "snapshots/denoiser_epoch_001.pt", "plots/loss_all.png"]:
        assert (d / rel).is_file(), rel
    out = generate(d, 12, tmp_path / "s.npz", batch_size=5)
    z = np.load(out)
    assert z["x"].shape == (12, 3, 16, 16) and z["x"].dtype == np.uint8
    assert z["y"].tolist() == [i % 10 for i in range(5)] * 2 + [0, 1]


@needs_cifar
def test_report_denoiser_end_to_end(tmp_path):
    cfg = tiny("data.subset=64", "data.image_size=16", "optim.batch_size=16", "model.ngf=8", "train.grid_size=10",
               "train.epochs=1", config="configs/cifar10_denoiser_report.yaml")
    r = fit(cfg, out=tmp_path / "run")
    assert r.status == "finished"
    assert (r.run_dir / "figures/denoise_examples.png").is_file()
    assert set(r.metrics) == {"psnr_noisy_test1k", "psnr_denoised_test1k"}
    # the noisy input's PSNR against its expectation in closed form (scipy): for a clean pixel x and noise
    # sigma * N(0, 1) clipped to [-1, 1], E[(clip(x + sigma n) - x)^2] integrates the squared error below -1, in
    # between and above +1; averaged over the same 1000 held-out images (0.77M pixels: the sample mean is within
    # ~0.01 dB of it)
    from scipy.stats import norm

    fam = ReportDenoiser(cfg, (3, 16, 16), 10)
    x = fam.fixed_inputs(1000, torch.Generator().manual_seed(cfg.train.seed + 778))["x0"].double().numpy().ravel()
    s = cfg.diffusion.sigma
    a, b = (-1 - x) / s, (1 - x) / s  # the noise (in sds) at which the pixel clips

    def partial_second_moment(lo, hi):  # E[n^2; lo < n < hi] for n ~ N(0, 1)
        return (norm.cdf(hi) - norm.cdf(lo)) + lo * norm.pdf(lo) - hi * norm.pdf(hi)

    mse = (s * s * partial_second_moment(a, b) + (1 + x) ** 2 * norm.cdf(a) + (1 - x) ** 2 * norm.sf(b)).mean()
    assert r.metrics["psnr_noisy_test1k"] == pytest.approx(10 * math.log10(4 / mse), abs=0.03)
    assert r.metrics["psnr_noisy_test1k"] > 10 * math.log10(4 / (s * s))  # clipping helps: above the unclipped


@needs_cifar
def test_report_denoiser_output_beats_its_noisy_input(tmp_path):
    """150 steps on 16x16 CIFAR-10 (~5 s) lift PSNR well above the noisy input's (measured 13.1 -> 19.8 dB); an
    untrained or broken denoiser stays at or below it (4 steps: 12.4 dB)."""
    cfg = tiny("data.subset=2048", "data.image_size=16", "optim.batch_size=32", "model.ngf=8", "train.grid_size=10",
               "train.max_steps=150", config="configs/cifar10_denoiser_report.yaml")
    m = fit(cfg, out=tmp_path / "run").metrics
    assert m["psnr_denoised_test1k"] > m["psnr_noisy_test1k"] + 4.0, m
