"""The diffusion families' config section (`diffusion.*`; the families are gancore/families/diffusion.py: diffusion
and denoiser_report; the U-Net and the report's denoiser read it too). No torch: gancore/config.py composes it into
Config, and a run logs it only when family is diffusion or denoiser_report."""

from __future__ import annotations

from dataclasses import dataclass

from gancore.options import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, infra, key


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = key(1000, AT_LEAST_1)  # T
    # beta schedule: linear (Ho et al. 1e-4..0.02 at T=1000) | cosine (Nichol & Dhariwal)
    schedule: str = key("linear", choices=("linear", "cosine"))
    p_uncond: float = key(0.1, PROBABILITY)  # label dropout for classifier-free guidance
    guidance: float = infra(1.0, NON_NEGATIVE)  # sampling guidance scale (1 = conditional, no extra guidance)
    sampler: str = infra("ddim", choices=("ddim", "ddpm"))
    sample_steps: int = infra(50, AT_LEAST_1)  # DDIM steps
    ddim_eta: float = infra(0.0, NON_NEGATIVE)  # DDIM noise scale eta (0 = deterministic given the initial noise)
    # U-Net (model.arch=unet; base width = model.ngf)
    # width multiplier per resolution level (each after the first halves H, W)
    channel_mult: tuple[int, ...] = key((1, 2, 2), AT_LEAST_1)
    num_res_blocks: int = key(2, AT_LEAST_1)  # residual blocks per level
    attention: bool = True  # self-attention at the lowest resolution (and in the middle block)
    dropout: float = key(0.1, FRACTION)  # dropout inside residual blocks (Ho et al. CIFAR-10: 0.1)
    # the report's one-level denoiser (family denoiser_report)
    sigma: float = key(0.5, POSITIVE)  # the single fixed noise level, in [-1, 1] image units
