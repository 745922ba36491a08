"""Families the trainer drives; each module registers itself in FAMILIES.

    base.py       the Family interface, Phase, Batch, StepContext, and the helpers every family shares
    gan.py        gan: G and D with an adversarial loss object
    vae.py        vae: encoder + decoder on one ELBO phase
    ganomaly.py   ganomaly: anomaly detection trained on one normal class (AUROC)
    diffusion.py  the Gaussian diffusion process; diffusion (DDPM / DDIM) and denoiser_report
"""

from gancore.families import gan  # noqa: F401  (registration)
from gancore.families import diffusion  # noqa: F401  (registration: diffusion, denoiser_report)
from gancore.families import ganomaly, vae  # noqa: F401  (registration: vae, ganomaly)
