"""The GANomaly family's config section (`ganomaly.*`; the family is gancore/families/ganomaly.py). No torch:
gancore/config.py composes it into Config, and a run logs it only when family=ganomaly."""

from __future__ import annotations

from dataclasses import dataclass

from gancore.options import NON_NEGATIVE, at_least, infra, key


@dataclass(frozen=True)
class GANomalyConfig:
    w_adv: float = key(1.0, NON_NEGATIVE)  # adversarial weight
    w_con: float = key(50.0, NON_NEGATIVE)  # contextual (L1 reconstruction) weight
    w_enc: float = key(1.0, NON_NEGATIVE)  # latent (z vs z_hat, L2) weight
    score: str = key("latent", choices=("latent", "recon"))  # anomaly score: latent ||z - z_hat||, recon ||x - x_hat||
    # discriminator: latent (MLP telling encoder codes z from N(0, I) draws; pushes z toward the prior) |
    # image (the GANomaly paper's conv D on x vs x_hat, feature-matching adversarial loss)
    disc: str = key("latent", choices=("latent", "image"))
    # AUROC / figures / grid inputs use the first N test images (all digits); 0 = all 10,000 (the reported numbers)
    test_subset: int = infra(0, at_least(0, "0 = all"))
