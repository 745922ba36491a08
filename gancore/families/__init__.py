"""Families the trainer drives (see base.py); each module registers itself in FAMILIES."""

from gancore.families import gan  # noqa: F401  (registration)
from gancore.families import diffusion  # noqa: F401  (registration: diffusion, denoiser_report)
from gancore.families import ganomaly, vae  # noqa: F401  (registration: vae, ganomaly)
