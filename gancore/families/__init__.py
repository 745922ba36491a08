"""Families the trainer drives; each module registers itself in FAMILIES (gancore/registry.py imports them).

    base.py       the Family interface, Phase, Batch, StepContext, and the helpers every family shares
    gan.py        gan: G and D with an adversarial loss object
    vae.py        vae: encoder + decoder on one ELBO phase
    ganomaly.py   ganomaly: anomaly detection trained on one normal class (AUROC)
    diffusion.py  the Gaussian diffusion process; diffusion (DDPM / DDIM) and denoiser_report
    *_config.py   a family's config section (vae.*, ganomaly.*, diffusion.*), composed into gancore.config.Config

The package itself imports nothing: gancore/config.py reads the *_config.py sections without loading torch.
"""
