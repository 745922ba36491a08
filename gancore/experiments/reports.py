"""The reference reports' numbers and the settings each preset must share with its report (issue #17).

`REPORTED` is the one place the published numbers live (results tables put gancore's numbers beside them);
`REPORT_SETTINGS` is what tests/test_config.py asserts of every report preset, so a preset cannot drift from
its report unnoticed. The reports measured Inception FID/IS; their protocol is named in `PROTOCOL`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    fid: float
    inception_score: float | None
    protocol: str  # how the report measured it, in words


CIFAR = "Inception FID/IS, 10k generated images, 25 epochs"
MNIST = "Inception FID/IS, 100 epochs"

REPORTED: dict[str, Reported] = {
    "mnist_dcgan": Reported(40.65, 4.85, MNIST),
    "cifar10_dcgan": Reported(54.68, 3.65, CIFAR),
    "cifar10_dcgan_nz50": Reported(57.65, 3.77, CIFAR),
    "cifar10_dcgan_nz200": Reported(59.14, 3.60, CIFAR),
    "cifar10_dcgan_bn_g": Reported(135.17, 2.42, CIFAR),
    "cifar10_dcgan_bn_d": Reported(62.29, 3.48, CIFAR),
    "cifar10_dcgan_smooth": Reported(56.72, 3.68, CIFAR),
    "cifar10_dcgan_tanh": Reported(150.21, 2.38, CIFAR),
    "cifar10_dcgan_lrelu": Reported(58.77, 3.65, CIFAR),
    "cifar10_cgan": Reported(72.94, 3.23, CIFAR),
    "cifar10_wgan_gp": Reported(72.94, 3.29, CIFAR),
}

_CIFAR_BASE = {"data.name": "cifar10", "model.arch": "dcgan", "optim.batch_size": 128, "train.epochs": 25,
               "optim.lr_g": 2e-4, "optim.lr_d": 2e-4, "optim.beta1": 0.5, "loss.name": "nonsaturating",
               "model.nz": 100, "model.batchnorm": "both", "model.g_act": "relu", "model.d_act": "lrelu",
               "loss.label_smoothing": 1.0, "eval.n_samples": 10000}

# preset -> {dotted config key: the report's value}
REPORT_SETTINGS: dict[str, dict[str, object]] = {
    "mnist_dcgan": {"data.name": "mnist", "model.arch": "dcgan_mnist", "model.nz": 100, "optim.batch_size": 64,
                    "train.epochs": 100, "optim.lr_g": 2e-4, "optim.lr_d": 2e-4, "optim.beta1": 0.5,
                    "optim.beta2": 0.999, "loss.name": "nonsaturating", "loss.instance_noise": 0.05},
    "cifar10_dcgan": _CIFAR_BASE,
    "cifar10_dcgan_nz50": {**_CIFAR_BASE, "model.nz": 50},
    "cifar10_dcgan_nz200": {**_CIFAR_BASE, "model.nz": 200},
    "cifar10_dcgan_bn_g": {**_CIFAR_BASE, "model.batchnorm": "g"},
    "cifar10_dcgan_bn_d": {**_CIFAR_BASE, "model.batchnorm": "d"},
    "cifar10_dcgan_smooth": {**_CIFAR_BASE, "loss.label_smoothing": 0.9},
    "cifar10_dcgan_tanh": {**_CIFAR_BASE, "model.g_act": "relu", "model.d_act": "tanh"},
    "cifar10_dcgan_lrelu": {**_CIFAR_BASE, "model.g_act": "lrelu", "model.d_act": "lrelu"},
    "cifar10_cgan": {**_CIFAR_BASE, "model.conditional": True},
    "cifar10_wgan_gp": {**{k: v for k, v in _CIFAR_BASE.items() if not k.startswith(("optim.", "loss.name"))},
                        "loss.name": "wgan_gp", "optim.d_iters": 5,
                        "model.batchnorm": "g"},
}
