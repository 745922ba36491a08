"""gancore: one trainer for GANs, VAEs, GANomaly and diffusion models, tracked in MLflow."""

__version__ = "0.1.0"
