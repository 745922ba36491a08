"""Networks, one file per architecture; each file registers its builders in MODELS.

A builder is called as `MODELS[name](model_cfg, image_shape=(C, H, W), num_classes)` and returns a dict of
networks (GAN builders: {"G": ..., "D": ...}).
"""

from gancore.models import dcgan, mlp, sngan  # noqa: F401  (registration)
from gancore.models import denoiser, unet  # noqa: F401  (registration: diffusion family)
from gancore.models import ganomaly, vae  # noqa: F401  (registration: vae_conv, ganomaly)
