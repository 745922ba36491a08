"""The reference reports' numbers and the settings each preset must share with its report.

`REPORTED` is the one place the published numbers live (results tables put gancore's numbers beside them);
`REPORT_SETTINGS` is what tests/test_config.py asserts of every report preset, so a preset cannot drift from
its report unnoticed. The reports measured Inception FID/IS; their protocol is named in `PROTOCOL`. `GOALS`: the
presets meant to beat the best published numbers, each with its target, its protocol and what it beats.
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


@dataclass(frozen=True)
class Goal:
    fid: float  # gancore's target (at most)
    protocol: str  # the metric it is measured with
    beats: str  # the published best numbers, each under this protocol


GOALS: dict[str, Goal] = {
    "mnist_dcgan_plus": Goal(5.0, "fid_inception_10k", "Lucic et al. 2018, best over a large search: NS-GAN 6.8, "
                             "WGAN 6.7"),
    "cifar10_sndcgan": Goal(15.0, "fid_inception_50k vs the train set", "StudioGAN SNDCGAN 15.66, DCGAN 48.29, "
                            "WGAN-GP 36.84; pytorch-gan-collections CNN SNGAN 17.81, CNN WGAN-GP 19.83"),
    "cifar10_cgan_plus": Goal(9.0, "fid_inception_50k vs the train set", "StudioGAN SNGAN (projection D) 9.01"),
}
# what a goal preset must keep (tests/test_config.py): the ingredients its header gives as the reasons
GOAL_SETTINGS: dict[str, dict[str, object]] = {
    "mnist_dcgan_plus": {**REPORT_SETTINGS["mnist_dcgan"], "train.ema_decay": 0.999, "eval.every": 937},
    "cifar10_sndcgan": {"data.name": "cifar10", "model.arch": "sndcgan", "model.spectral_norm": True,
                        "model.batchnorm": "g", "loss.name": "hinge", "optim.d_iters": 2, "optim.batch_size": 64,
                        "train.max_steps": 100000, "train.ema_decay": 0.999, "model.conditional": False},
    "cifar10_cgan_plus": {"data.name": "cifar10", "model.arch": "sndcgan", "model.spectral_norm": True,
                          "loss.name": "hinge", "train.max_steps": 100000, "model.conditional": True},
}
