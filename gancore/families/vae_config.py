"""The VAE family's config section (`vae.*`; the family is gancore/families/vae.py). No torch: gancore/config.py
composes it into Config, and a run logs it only when family=vae."""

from __future__ import annotations

from dataclasses import dataclass

from gancore.options import NON_NEGATIVE, at_least, infra, key


@dataclass(frozen=True)
class VAEConfig:
    beta: float = key(1.0, NON_NEGATIVE)  # weight of the KL term (beta-VAE); 1 = the report's ELBO
    # end-of-run figures and vae_test_* metrics use the first N test images; 0 = all 10,000 (the reported numbers)
    test_subset: int = infra(0, at_least(0, "0 = all"))
