"""Diffusion on the one trainer (the process is one object, the network another).

Owns: the Gaussian diffusion process (`beta_schedule`, `GaussianDiffusion`) and the two families that train a
denoiser (`diffusion`, `denoiser_report`), their samplers, figures and metrics.

`GaussianDiffusion` is the process: beta schedule, q(x_t | x_0), the eps-prediction loss with label dropout for
classifier-free guidance, ancestral DDPM and DDIM sampling. It knows nothing of networks beyond calling
`model(x_t, t, y)`. Two families drive it or its report-era predecessor:

    diffusion        class-conditional DDPM (Ho et al. 2020) with a U-Net (model.arch=unet); one phase "denoise";
                     the denoiser is the generator, so train.ema_decay gives the EMA sampler
    denoiser_report  the report's model: a one-level conditional denoiser trained at ONE fixed noise level
                     (diffusion.sigma) to output the clean image, MSE, Adam; it does not generate from noise, so
                     its "samples" are held-out images denoised from a fixed noisy batch

All randomness of a training step comes from torch's global RNG (saved in checkpoints, so resume is exact);
sampling draws only from the fixed inputs and generators seeded from them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gancore.config import Config
from gancore.errors import ConfigError, DataError
from gancore.families.base import Batch, Family, Phase, Stats, StepContext, eval_mode, labelled_grid, load_test_split
from gancore.progress import track
from gancore.registry import FAMILIES, MODELS


# ----------------------------------------------------------------------------------------------------------------
# The process


def beta_schedule(name: str, T: int) -> torch.Tensor:
    """beta_1..beta_T (float64): linear (Ho et al.: 1e-4..0.02 at T=1000, scaled by 1000/T for other T, as in
    improved-diffusion) or cosine (Nichol & Dhariwal: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008)."""
    if name == "linear":
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)  # T < 50: beta <= 1
    if name == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # clipped: beta_T would be 1 (alpha_bar_T = 0)
    raise ConfigError(f"diffusion.schedule: unknown schedule {name!r}; use linear or cosine")


class GaussianDiffusion:
    """The forward process q(x_t | x_0) and the reverse samplers, with eps-prediction. t is 0-based (0..T-1)."""

    def __init__(self, timesteps: int, schedule: str = "linear"):
        if timesteps < 1:
            raise ConfigError(f"diffusion.timesteps must be >= 1 (got {timesteps})")
        self.T = timesteps
        betas = beta_schedule(schedule, timesteps)
        alphas = 1 - betas
        ac = torch.cumprod(alphas, 0)  # alpha_bar_t
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)  # beta~_t of q(x_{t-1} | x_t, x_0)
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, ac, ac_prev
        # float64 tables; float32 copies per device are made on first use
        self._tables = {
            "sqrt_ac": ac.sqrt(), "sqrt_1m_ac": (1 - ac).sqrt(),
            "sqrt_recip_ac": (1 / ac).sqrt(), "sqrt_recipm1_ac": (1 / ac - 1).sqrt(),
            # beta~_0 = 0: log-variance of step 0 borrows beta~_1 (improved-diffusion); step 0 adds no noise anyway
            "post_logvar": (torch.log(torch.cat([post_var[1:2], post_var[1:]])) if timesteps > 1
                            else torch.zeros(1, dtype=torch.float64)),
            "post_c1": betas * ac_prev.sqrt() / (1 - ac),
            "post_c2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
            "ac": ac,
        }
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """table[t] as float32 (B, 1, ..., 1) on t's device (no host sync)."""
        key = (name, t.device)
        if key not in self._on:
            self._on[key] = self._tables[name].to(device=t.device, dtype=torch.float32)
        return self._on[key][t].view(-1, *([1] * (ndim - 1)))

    # -- forward process ---------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), with the given standard noise."""
        return self._at("sqrt_ac", t, x0.ndim) * x0 + self._at("sqrt_1m_ac", t, x0.ndim) * noise

    def training_loss(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None, p_uncond: float = 0.0,
                      null_class: int | None = None) -> tuple[torch.Tensor, Stats]:
        """The simple loss of Ho et al.: || eps - eps_theta(x_t, t, y) ||^2 at a uniform t; labels are replaced by
        `null_class` with probability p_uncond (classifier-free guidance trains both models in one network)."""
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        if null_class is not None:
            if y is None:
                y = torch.full((b,), null_class, dtype=torch.long, device=x0.device)
            elif p_uncond > 0:
                y = torch.where(torch.rand(b, device=x0.device) < p_uncond, torch.full_like(y, null_class), y)
        eps = model(self.q_sample(x0, t, noise), t, y)
        mse = F.mse_loss(eps.float(), noise)
        return mse, {"Loss/mse": mse.detach(), "Loss/total": mse.detach()}

    # -- reverse process ---------------------------------------------------------------------------------------
    @staticmethod
    def guided_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance: float = 1.0,
                   null_class: int | None = None) -> torch.Tensor:
        """eps = eps_uncond + s (eps_cond - eps_uncond); s = 1 is the conditional prediction (one pass)."""
        if guidance == 1.0 or y is None or null_class is None:
            return model(x, t, y)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def _x0_eps(self, model, x, t, y, guidance, null_class) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0 estimate clipped to [-1, 1], the eps consistent with it)."""
        eps = self.guided_eps(model, x, t, y, guidance, null_class).float()
        x0 = (self._at("sqrt_recip_ac", t, x.ndim) * x - self._at("sqrt_recipm1_ac", t, x.ndim) * eps).clamp(-1, 1)
        eps = (self._at("sqrt_recip_ac", t, x.ndim) * x - x0) / self._at("sqrt_recipm1_ac", t, x.ndim)
        return x0, eps

    @torch.no_grad()
    def p_sample_loop(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor | None, *, guidance: float = 1.0,
                      null_class: int | None = None, generator: torch.Generator | None = None,
                      progress: bool = False) -> torch.Tensor:
        """Ancestral sampling x_T = noise -> x_0 through all T steps of p(x_{t-1} | x_t) (posterior variance)."""
        if generator is None:
            raise ValueError("p_sample_loop needs a generator (sampling must not draw from the global RNG)")
        x = noise.float()
        for i in track(range(self.T - 1, -1, -1), "DDPM sampling", self.T, progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x0, _ = self._x0_eps(model, x, t, y, guidance, null_class)
            mean = self._at("post_c1", t, x.ndim) * x0 + self._at("post_c2", t, x.ndim) * x
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device)
                x = mean + (0.5 * self._at("post_logvar", t, x.ndim)).exp() * z
            else:
                x = mean
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spread over 0..T-1 (both ends included), descending."""
        ts = torch.linspace(0, self.T - 1, max(1, min(steps, self.T))).round().long().unique()
        return ts.flip(0).tolist()

    @torch.no_grad()
    def ddim_sample_loop(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor | None, steps: int,
                         eta: float = 0.0, *, guidance: float = 1.0, null_class: int | None = None,
                         generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """DDIM (Song et al.) over `steps` timesteps; eta = 0 is deterministic given the initial noise."""
        if eta > 0 and generator is None:
            raise ValueError("DDIM with eta > 0 needs a generator (sampling must not draw from the global RNG)")
        x = noise.float()
        ts = self.ddim_timesteps(steps)
        for k in track(range(len(ts)), "DDIM sampling", len(ts), progress):
            t = torch.full((x.shape[0],), ts[k], dtype=torch.long, device=x.device)
            x0, eps = self._x0_eps(model, x, t, y, guidance, null_class)
            if k == len(ts) - 1:
                x = x0  # alpha_bar_prev = 1
                break
            t_prev = torch.full_like(t, ts[k + 1])
            a, a_prev = self._at("ac", t, x.ndim), self._at("ac", t_prev, x.ndim)
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The families


def _build_denoiser(cfg: Config, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    # builders take the diffusion section as a keyword: the U-Net's level layout lives there
    return MODELS[cfg.model.arch](cfg.model, image_shape, num_classes, diffusion=cfg.diffusion)["denoiser"]


class _Denoising(Family):
    """What both denoising families share: one network D(x, y) (model.arch), one Adam, one phase on `self.loss`."""

    generator_name = "denoiser"
    headline = ("Loss/mse",)

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        net = _build_denoiser(cfg, image_shape, num_classes)
        self.networks = {"denoiser": net}
        self.optimizers = {"denoiser": self.adam(net.parameters(), cfg.optim.lr_g)}
        self.phases = [Phase("denoise", "denoiser", self.loss)]


@FAMILIES.register("diffusion")
class Diffusion(_Denoising):
    """Class-conditional DDPM: one network eps_theta(x_t, t, y), one phase, sampled by DDIM or ancestral DDPM."""

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.process = GaussianDiffusion(cfg.diffusion.timesteps, cfg.diffusion.schedule)
        self.null_class = num_classes  # the label embedding's extra row

    def loss(self, batch: Batch, ctx: StepContext):
        return self.process.training_loss(self.networks["denoiser"], batch.x, batch.y, self.cfg.diffusion.p_uncond,
                                          self.null_class)

    # -- sampling ----------------------------------------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        noise = torch.randn(n, *self.image_shape, generator=generator)  # x_T
        y = self.grid_labels(n)
        seed = torch.randint(0, 2 ** 62, (1,), generator=generator)  # seeds the per-step noise (DDPM, DDIM eta > 0)
        return {"noise": noise, "y": y, "seed": seed}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        inputs = self.sample_inputs(n, generator, inputs)
        d, dev = self.cfg.diffusion, self.device
        noise, y = inputs["noise"][:n].to(dev), inputs["y"][:n].to(dev)
        g = torch.Generator(device=dev).manual_seed(int(inputs["seed"][0]) if "seed" in inputs else 0)
        common = dict(guidance=d.guidance, null_class=self.null_class, generator=g, progress=self.cfg.train.progress)
        net = self.sampler_network()
        with eval_mode(net):
            if d.sampler == "ddim":
                return self.process.ddim_sample_loop(net, noise, y, d.sample_steps, d.ddim_eta, **common)
            return self.process.p_sample_loop(net, noise, y, **common)

    # -- reporting ---------------------------------------------------------------------------------------------
    def figures(self, out_dir: Path, data: dict) -> list[Path]:
        """samples_per_class.png (one row per class, 8 columns) and forward_process.png (q(x_t | x_0) at a few t)."""
        out_dir = Path(out_dir)
        g = torch.Generator().manual_seed(self.cfg.train.seed + 777)
        rows, cols = min(self.num_classes, 10), 8
        inputs = self.fixed_inputs(rows * cols, g)
        inputs["y"] = torch.arange(rows).repeat_interleave(cols)
        x = self.to_uint8(self.sample(rows * cols, inputs=inputs))
        d = self.cfg.diffusion
        how = f"DDIM {d.sample_steps} steps" if d.sampler == "ddim" else f"DDPM {self.process.T} steps"
        paths = [labelled_grid(x, cols, out_dir / "samples_per_class.png",
                               f"samples per class ({how}, guidance {d.guidance:g})",
                               row_labels=[str(c) for c in range(rows)])]

        x0 = self.prepare(data["x"][:6], None).x  # (6, C, H, W) in [-1, 1]
        T = self.process.T
        ts = sorted({round(f * (T - 1)) for f in (0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)})
        noise = torch.randn(x0.shape, generator=g)
        cols_t = [self.process.q_sample(x0, torch.full((x0.shape[0],), t), noise) for t in ts]  # same noise per t
        grid = torch.stack(cols_t, 1).flatten(0, 1)  # (6 * len(ts), C, H, W): one row per image
        paths.append(labelled_grid(self.to_uint8(grid), len(ts), out_dir / "forward_process.png",
                                   f"forward process q(x_t | x_0), {d.schedule} schedule, T={T}",
                                   col_labels=[f"t={t + 1}" for t in ts]))
        return paths


@FAMILIES.register("denoiser_report")
class ReportDenoiser(_Denoising):
    """The report's model: D(x + sigma eps, y) -> x at ONE fixed sigma, MSE, Adam. Not a generative sampler: its
    `sample` denoises a fixed noisy batch of held-out images (the dataset's test split), one per class in turn."""

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.sigma = cfg.diffusion.sigma
        self._heldout: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, batch: Batch, ctx: StepContext):
        noisy = batch.x + self.sigma * torch.randn_like(batch.x)
        mse = F.mse_loss(self.networks["denoiser"](noisy, batch.y).float(), batch.x)
        return mse, {"Loss/mse": mse.detach(), "Loss/total": mse.detach()}

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean uint8 images and labels of the test split (the training data where the dataset has no split)."""
        if self._heldout is None:
            from gancore.data import load_images

            try:
                self._heldout = load_test_split(self.cfg, 0, every_class=False)
            except DataError:
                self._heldout = load_images(self.cfg.data)
        return self._heldout

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, labels = self.heldout()
        y = self.grid_labels(n)
        idx = torch.empty(n, dtype=torch.long)
        for c in range(self.num_classes):
            want = (y == c).nonzero().flatten()
            pool = (labels == c).nonzero().flatten()
            if len(pool) == 0:  # a class the held-out set lacks: any image, with its own label
                pool = torch.arange(len(labels))
            idx[want] = pool[torch.randint(len(pool), (len(want),), generator=generator)]
        x0 = self.prepare(x[idx], None).x
        return {"x0": x0, "noise": torch.randn(x0.shape, generator=generator), "y": labels[idx]}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        inputs = self.sample_inputs(n, generator, inputs)
        dev = self.device
        noisy = inputs["x0"][:n].to(dev) + self.sigma * inputs["noise"][:n].to(dev)
        net = self.sampler_network()
        with eval_mode(net):
            return net(noisy, inputs["y"][:n].to(dev)).float()

    def figures(self, out_dir: Path, data: dict) -> list[Path]:
        """denoise_examples.png: held-out images, one per class: clean / noisy (sigma) / denoised rows."""
        k = min(self.num_classes, 10)
        inputs = self.fixed_inputs(k, torch.Generator().manual_seed(self.cfg.train.seed + 777))
        noisy = inputs["x0"] + self.sigma * inputs["noise"]
        out = self.sample(k, inputs=inputs).cpu()
        rows = torch.cat([self.to_uint8(inputs["x0"]), self.to_uint8(noisy), self.to_uint8(out)])
        return [labelled_grid(rows, k, Path(out_dir) / "denoise_examples.png",
                              f"one-level denoiser at sigma={self.sigma:g} (held-out images)",
                              col_labels=[str(int(c)) for c in inputs["y"]], row_labels=["clean", "noisy", "denoised"])]

    def evaluate(self, data: dict) -> dict[str, float]:
        """PSNR (dB, images in [0, 1]) of the noisy input and of the output against 1000 held-out images."""
        inputs = self.fixed_inputs(1000, torch.Generator().manual_seed(self.cfg.train.seed + 778))
        noisy = inputs["x0"] + self.sigma * inputs["noise"]
        out = torch.cat([self.sample(250, inputs={k: v[i:i + 250] for k, v in inputs.items()}).cpu()
                         for i in range(0, 1000, 250)])

        def psnr(a: torch.Tensor) -> float:  # range 2 on [-1, 1] = range 1 on [0, 1]
            return float(10 * torch.log10(4 / F.mse_loss(a.clamp(-1, 1), inputs["x0"])))

        return {"psnr_noisy_test1k": psnr(noisy), "psnr_denoised_test1k": psnr(out)}
