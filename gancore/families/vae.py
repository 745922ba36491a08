"""The VAE family (owns: the ELBO terms, the VAE family object, its test-set metrics and figures): an encoder
and a decoder trained on one ELBO phase per step (the MNIST VAE report).

    loss per image = sum over pixels of (x_hat - x)^2 + beta * KL(q(z|x) || N(0, I)), averaged over the batch
    pixels live in [0, 1] (sigmoid decoder), not the GANs' [-1, 1]

The decoder is the family's generator (`generator_name`): its weights are the run's snapshots, its EMA copy (when
on) decodes samples. End of run: figures and `vae_test_*` metrics on the test split (see `evaluate`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gancore.config import Config
from gancore.families.base import (EVAL_BATCH, Batch, Family, Phase, StepContext, eval_mode, load_test_split,
                                   save_figure, titled_rows, unwrap)
from gancore.registry import FAMILIES, MODELS

EVAL_SEED = 1234  # the one z draw per test image behind vae_test_elbo, fixed so the metric is repeatable


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row: 0.5 * sum(sigma^2 + mu^2 - 1 - log sigma^2). (B, nz) -> (B,)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(dim=1)


def reconstruction_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Summed squared error per image: (B, C, H, W) x 2 -> (B,)."""
    return (x_hat - x).pow(2).flatten(1).sum(dim=1)


@FAMILIES.register("vae")
class VAE(Family):
    generator_name = "decoder"
    headline = ("Loss/total", "Loss/recon", "Loss/kl")

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        nets = MODELS[cfg.model.arch](cfg.model, image_shape, num_classes)
        self.networks = {"encoder": nets["encoder"], "decoder": nets["decoder"]}
        params = [*nets["encoder"].parameters(), *nets["decoder"].parameters()]
        self.optimizers = {"VAE": self.adam(params, cfg.optim.lr_g)}  # one Adam over both (report: 1e-3)
        self.nz = cfg.model.nz
        self.beta = cfg.vae.beta
        self.phases = [Phase("ELBO", "VAE", self.loss)]
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- data: pixels in [0, 1] ------------------------------------------------------------------------------
    def prepare(self, x_uint8: torch.Tensor, y: torch.Tensor | None) -> Batch:
        return Batch(x_uint8.float().div_(255.0), y)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8)

    # -- the objective ---------------------------------------------------------------------------------------
    def terms(self, x: torch.Tensor, generator: torch.Generator | None = None,
              encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        """(recon (B,), kl (B,), x_hat) for one reparameterised draw z = mu + sigma * eps per image."""
        encoder = self.networks["encoder"] if encoder is None else encoder
        decoder = self.networks["decoder"] if decoder is None else decoder
        mu, logvar = encoder(x)  # (B, nz) each
        if generator is None:
            eps = torch.randn_like(mu)  # the global RNG: checkpointed, so a resumed run draws the same eps
        else:
            eps = torch.randn(mu.shape, generator=generator, device=generator.device).to(mu.device)
        x_hat = decoder(mu + (0.5 * logvar).exp() * eps)
        return reconstruction_error(x_hat, x), kl_divergence(mu, logvar), x_hat

    def loss(self, batch: Batch, ctx: StepContext):
        recon, kl, _ = self.terms(batch.x)
        recon, kl = recon.mean(), kl.mean()  # per image: summed over pixels / latents, mean over the batch
        total = recon + self.beta * kl
        return total, {"Loss/total": total.detach(), "Loss/recon": recon.detach(), "Loss/kl": kl.detach()}

    # -- sampling: decode prior draws z ~ N(0, I) ------------------------------------------------------------
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"z": torch.randn(n, self.nz, generator=generator)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, inputs: dict | None = None) -> torch.Tensor:
        return self.decode(self.sample_inputs(n, generator, inputs)["z"][:n])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, nz) -> images in [0, 1] with the sampler decoder (its EMA copy when there is one)."""
        dec = self.sampler_network()
        with eval_mode(dec):
            return torch.cat([dec(c.to(self.device)) for c in z.split(EVAL_BATCH)])

    # -- end of run: test-set metrics and figures ------------------------------------------------------------
    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            self._test = load_test_split(self.cfg, self.cfg.vae.test_subset)
        return self._test

    def encode_means(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """Posterior means mu (N, nz) on the CPU for uint8 images."""
        enc = unwrap(self.networks["encoder"])
        with eval_mode(enc):
            return torch.cat([enc(self.prepare(c.to(self.device), None).x)[0].cpu() for c in x_uint8.split(EVAL_BATCH)])

    def evaluate(self, data: object) -> dict[str, float]:
        """On the test split, per image (one seeded z draw each):

        vae_test_recon: summed squared error; vae_test_kl: KL(q(z|x) || N(0, I));
        vae_test_elbo = -(recon + kl): the negative beta=1 training loss, higher is better (the MSE term is a
        fixed-variance Gaussian log-likelihood up to its constant, so this is the ELBO up to that constant).
        """
        x, _ = self.test_split()
        enc, dec = unwrap(self.networks["encoder"]), self.sampler_network()
        g = torch.Generator().manual_seed(EVAL_SEED)
        recon_sum, kl_sum = 0.0, 0.0
        with eval_mode(enc, dec):
            for c in x.split(EVAL_BATCH):
                recon, kl, _ = self.terms(self.prepare(c.to(self.device), None).x, g, enc, dec)
                recon_sum += float(recon.sum())
                kl_sum += float(kl.sum())
        n = len(x)
        return {"vae_test_elbo": -(recon_sum + kl_sum) / n, "vae_test_recon": recon_sum / n, "vae_test_kl": kl_sum / n}

    def figures(self, out_dir: Path, data: object) -> list[Path]:
        """Originals vs reconstructions, latent means by digit, the decoded 2-D manifold (nz == 2), prior samples."""
        from gancore import plots

        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        x, y = self.test_split()
        mu = self.encode_means(x)
        paths = []

        # originals (top) vs reconstructions from the posterior means (bottom), 16 test images
        k = min(16, len(x))
        rec = self.to_uint8(self.decode(mu[:k])).cpu()
        paths.append(titled_rows([(x[:k], "test images"), (rec, "reconstructions (z = mu)")],
                                 out_dir / "vae_reconstructions.png", figsize=(10, 1.9)))

        # the test set's posterior means, coloured by digit (PCA to 2-D when nz > 2)
        pts, axis = mu.numpy(), ("z1", "z2")
        if self.nz > 2:
            from sklearn.decomposition import PCA

            pts, axis = PCA(2).fit_transform(pts), ("PC1 of mu", "PC2 of mu")
        elif self.nz == 1:
            pts, axis = torch.cat([mu, torch.zeros_like(mu)], 1).numpy(), ("z1", "")
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=y.numpy(), cmap="tab10", s=3, alpha=0.7, vmin=-0.5, vmax=9.5)
        fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
        ax.set_xlabel(axis[0])
        ax.set_ylabel(axis[1])
        ax.set_title(f"latent means of {len(x)} test images")
        paths.append(save_figure(fig, out_dir / "vae_latent.png"))

        # the decoded manifold: a 20 x 20 grid of z at N(0, 1) quantiles 0.05..0.95 (only for a 2-D latent)
        if self.nz == 2:
            n = 20
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
            z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")  # rows: z2 from high (top) to low
            imgs = self.to_uint8(self.decode(torch.stack([z1.flatten(), z2.flatten()], 1))).cpu()
            fig, ax = plt.subplots(figsize=(8, 8))
            ax.imshow(plots.grid(imgs, nrow=n), extent=(float(q[0]), float(q[-1]), float(q[0]), float(q[-1])))
            ax.set_xlabel("z1")
            ax.set_ylabel("z2")
            ax.set_title("decoded latent manifold (N(0,1) quantiles 0.05-0.95)")
            paths.append(save_figure(fig, out_dir / "vae_manifold.png"))

        # samples from the prior (a seeded draw, independent of the training RNG)
        z = torch.randn(64, self.nz, generator=torch.Generator().manual_seed(EVAL_SEED))
        p = out_dir / "vae_prior_samples.png"
        plots.save_grid(self.to_uint8(self.decode(z)).cpu(), p, nrow=8)
        paths.append(p)
        return paths

