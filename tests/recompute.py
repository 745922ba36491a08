"""Values a run logged, recomputed here from its checkpoint file (issue #25 item 4): a test compares what the run
recorded with these instead of asserting a range every value satisfies. The metric formulas themselves are checked
against numpy/scipy references in test_metric_references.py; what these check is that the number a run logged is
the one its weights at that step give."""

from __future__ import annotations

from pathlib import Path

import torch


def sample_quality(checkpoint: str | Path, metrics: tuple[str, ...] | None = None) -> dict[str, float]:
    """The training loop's evaluation redone on the checkpoint's weights: its cfg's n, extractor and metrics, the
    samples from the loop's seeded inputs (train.seed + 777, drawn afresh for each evaluation)."""
    from gancore.metrics import evaluate
    from gancore.train.state import load_family

    family, cfg, _ = load_family(checkpoint)
    g = torch.Generator().manual_seed(cfg.train.seed + 777)
    with torch.no_grad():
        return evaluate(cfg, lambda b: family.to_uint8(family.sample(b, inputs=family.fixed_inputs(b, g))), "cpu",
                        metrics=tuple(metrics or cfg.eval.metrics))


def class_accuracy_by_hand(checkpoint: str | Path, n_per_class: int = 50, batch: int = 25) -> dict[str, float]:
    """class_acc_<tag>_<c> and _mean of a conditional GAN's checkpoint, counted here: for each class c, n_per_class
    samples G(z, c) (z from the family's class-sampler seed 4321, `batch` per draw: the CPU evaluation batch), the
    share the domain classifier (LeNet for MNIST) labels c."""
    from gancore.metrics.classifier import FOR_DATASET, domain_spec, ensure_classifier, load_classifier, prepare
    from gancore.train.state import load_family

    family, cfg, _ = load_family(checkpoint)
    name = FOR_DATASET[cfg.data.name]
    spec = domain_spec(name)
    net = load_classifier(name, ensure_classifier(name))
    G = family.sampler_network()  # its EMA copy when there is one; eval mode (load_family)
    g = torch.Generator().manual_seed(4321)
    acc = []
    with torch.no_grad():
        for c in range(cfg.model.num_classes):
            right = 0
            for lo in range(0, n_per_class, batch):
                b = min(batch, n_per_class - lo)
                y = torch.full((b,), c, dtype=torch.long)
                x = G(torch.randn(b, cfg.model.nz, generator=g), y)  # tanh output in [-1, 1]
                x_u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                right += int((net(prepare(x_u8, spec)).argmax(1) == c).sum())
            acc.append(right / n_per_class)
    out = {f"class_acc_{spec.tag}_{c}": a for c, a in enumerate(acc)}
    out[f"class_acc_{spec.tag}_mean"] = sum(acc) / len(acc)
    return out


def checkpoint_eval(checkpoint: str | Path, n: int, extractor: str | None = None, seed: int = 0) -> dict[str, float]:
    """What jobs/eval.py (gancore.evaluation.evaluate_checkpoint) measures on a checkpoint, measured again without
    its per-checkpoint feature cache: the samples of chunk 0 of its seeded chunk sampler (n <= one chunk)."""
    from gancore.evaluation import chunk_sampler
    from gancore.metrics import evaluate
    from gancore.metrics.fidelity import CHUNK
    from gancore.train.state import load_family

    assert n <= CHUNK, "one chunk only"
    family, cfg, _ = load_family(checkpoint)
    with torch.no_grad():
        return evaluate(cfg, chunk_sampler(family, seed)(0), "cpu", extractor=extractor, n=n)


def first_test_images(cfg, subset):
    """The first `subset` test images of every class at the run's image size, and their digits."""
    import dataclasses

    from gancore.data import load_images

    return load_images(dataclasses.replace(cfg.data, split="test", subset=subset, normal_class=-1))


def ganomaly_metrics_by_sklearn(checkpoint) -> dict[str, float]:
    """auroc / average_precision: scikit-learn on scores computed here from G's outputs (latent: mean (z - z_hat)^2,
    recon: mean (x - x_hat)^2; pixels in [-1, 1]), every digit but the normal one positive."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from gancore.train.state import load_family

    family, cfg, _ = load_family(checkpoint)
    x, y = first_test_images(cfg, cfg.ganomaly.test_subset)
    with torch.no_grad():
        x = x.float() / 127.5 - 1
        x_hat, z, z_hat = family.networks["G"](x)
    err = (z - z_hat) if cfg.ganomaly.score == "latent" else (x - x_hat)
    scores = err.double().pow(2).flatten(1).mean(dim=1).numpy()
    anomalous = (y != cfg.data.normal_class).numpy()
    assert 0 < anomalous.sum() < len(anomalous)  # both classes in the test subset
    return {"auroc": roc_auc_score(anomalous, scores), "average_precision": average_precision_score(anomalous, scores)}


def fid_by_hand(x, y) -> float:
    """Fréchet distance of the Gaussians fitted to feature sets x (n, d) and y (m, d) (covariances 1/(n-1)), in
    float64 numpy without a matrix square root: with S1 = A A^T, S2 = B B^T (A = centred x^T / sqrt(n-1)), the
    eigenvalues of S1 S2 are the squared singular values of A^T B, so tr sqrtm(S1 S2) is the nuclear norm of the
    small (n, m) matrix A^T B. Exact for rank-deficient covariances (n < d) too."""
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a = (x - x.mean(0)).T / np.sqrt(len(x) - 1)  # (d, n)
    b = (y - y.mean(0)).T / np.sqrt(len(y) - 1)
    cross = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b) - 2 * cross)


def lenet_outputs(x_uint8: torch.Tensor, weights: str | Path) -> tuple:
    """(features (N, 84), logits (N, 10)) as float32 numpy of 28x28 grey uint8 images through the LeNet file
    `weights`, the pixels mapped to [-1, 1] here (x / 127.5 - 1), in one batch."""
    from gancore.metrics.nets import LeNet

    net = LeNet().eval()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    assert x_uint8.dtype == torch.uint8 and tuple(x_uint8.shape[1:]) == (1, 28, 28)
    with torch.no_grad():
        f = net.features(x_uint8.float() / 127.5 - 1)
        return f.numpy(), net.head(f).numpy()
