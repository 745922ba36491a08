"""The single place where every default lives.

A run's configuration is a tree of frozen dataclasses. Presets in configs/*.yaml override defaults (a preset may
name a `base:` preset it extends), and dotted `key=value` overrides on the command line come last.
Unknown keys and badly typed values are errors that name the key and the closest valid ones.

Fields marked `infra(...)` are infrastructure (paths, intervals, workers): they never change the result, so they
are not logged as MLflow params and may differ between a run and its resume (shared/STYLE.md #5).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gancore.errors import ConfigError
from gancore.io import atomic_write


def infra(default: Any) -> Any:
    """A field that does not change the result (kept out of MLflow params and resume checks)."""
    return field(default=default, metadata={"infra": True})


def family_section(default: Any, *families: str) -> Any:
    """A section only the named families read (gancore/families/): kept out of other families' MLflow params."""
    return field(default=default, metadata={"families": families})


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist"  # registry key: mnist | fashion_mnist | cifar10 | folder | npz
    root: str | None = infra(None)  # data dir; None -> $GANCORE_DATA, else ./data
    path: str | None = None  # the file (npz) or folder (folder) for those two dataset kinds
    split: str = "train"  # train | test
    subset: int = 0  # keep the first N images (after the class filter); 0 = all
    normal_class: int = -1  # train only on this label (anomaly detection: the "normal" digit); -1 = all
    image_size: int = 0  # resize to S x S (GANomaly: MNIST at 32); 0 = native size
    # how a non-square image becomes S x S: center_crop (shorter side to S, centre kept; torchvision's Resize +
    # CenterCrop) | stretch (both sides to S) | pad (longer side to S, black borders); square images: all the same
    resize: str = "center_crop"
    download: bool = infra(False)  # let torchvision download a missing dataset (needs internet)
    on_device: str = infra("auto")  # keep the whole uint8 set on the training device: auto | yes | no


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "dcgan_mnist"  # registry key of the network builder (gancore/models/)
    nz: int = 100  # latent size (VAE: 2 in the report)
    ngf: int = 64  # generator / decoder base width
    ndf: int = 64  # discriminator / encoder base width
    batchnorm: str = "both"  # where BatchNorm goes: both | g | d | none (WGAN-GP critic: g)
    g_act: str = "relu"  # generator hidden activation: relu | lrelu | tanh
    d_act: str = "lrelu"  # discriminator hidden activation: relu | lrelu | tanh (LeakyReLU slope 0.2)
    kernel: int = 4  # DCGAN kernel size: 4 (classic) or 5 (the 5x5 report)
    upsample: str = "convt"  # generator upsampling: convt (transposed conv) | nearest (upsample + conv)
    spectral_norm: bool = False  # spectral normalisation on every discriminator layer
    conditional: bool = False  # class-conditional G and D (label embedding)
    num_classes: int = 10  # classes for conditional models
    embed_dim: int = 50  # label-embedding size fed to G


@dataclass(frozen=True)
class LossConfig:
    name: str = "nonsaturating"  # registry key (gancore/losses.py; `jobs/train.py --help` lists the registered names)
    label_smoothing: float = 1.0  # one-sided smoothing: target for real images (ablation: 0.9); 1.0 = off
    instance_noise: float = 0.0  # sigma of Gaussian noise on D inputs (MNIST report: 0.05); 0 = off
    gp_weight: float = 10.0  # WGAN-GP lambda
    # zero-centred gradient penalties on D (Mescheder et al. 2018; R3GAN): r1 * 0.5 * E||grad_x D(x)||^2 on real
    # images, r2 the same on generated ones; 0 = off. Any loss; one extra D forward/backward per penalty and D step
    r1: float = 0.0
    r2: float = 0.0
    penalty_batch: int = 0  # R1/R2 on the first N images of each batch only (an unbiased, cheaper estimate); 0 = all


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = 2e-4  # generator (or the single network's) learning rate
    lr_d: float = 2e-4  # discriminator learning rate
    beta1: float = 0.5  # Adam beta1 (DCGAN: 0.5)
    beta2: float = 0.999  # Adam beta2
    weight_decay: float = 0.0
    batch_size: int = 64  # global batch (split over processes)
    d_iters: int = 1  # discriminator steps per generator step (WGAN-GP: 5); each draws a fresh real batch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100  # passes over the (subset of the) data
    max_steps: int = 0  # stop after this many steps instead; 0 = as many as `epochs` give
    # the budget in real images shown to D (Lucic et al. 2018: 1.0M on MNIST); steps = ceil(max_images / (batch x
    # d_iters)), so the batch size and D steps change steps, not the budget (gancore/train/budget.py); 0 = off
    max_images: int = 0
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (through Accelerate)
    ema_decay: float = 0.0  # generator EMA decay (e.g. 0.999); 0 = no EMA
    # the fast path (gancore/train/fast.py): none | compile (torch.compile the networks) | cudagraph (the whole step
    # captured in one CUDA graph) | compile_cudagraph (both); falls back with a one-line notice where it cannot apply
    compile: str = "none"
    channels_last: bool = infra(False)  # NHWC weights/activations (cuDNN tensor cores under bf16); see bench/
    log_every: int = infra(50)  # steps between statistic reads (the only host syncs of the loop)
    checkpoint_every: int = infra(1000)  # steps between full-state checkpoints (also at the end)
    keep_checkpoints: int = infra(2)  # how many step checkpoints to keep on disk
    snapshot_epochs: tuple[int, ...] = infra((1, 25, 50, 100))  # epochs whose grid + G weights are saved
    loss_ranges: tuple[tuple[int, int], ...] = infra(((1, 25), (26, 50), (51, 100)))  # loss-plot epoch ranges
    grid_size: int = infra(64)  # images in a fixed-noise sample grid
    progress: bool = infra(True)  # rich progress bar


@dataclass(frozen=True)
class TrackConfig:
    enabled: bool = infra(True)  # log to MLflow
    uri: str | None = infra(None)  # tracking URI; None -> $MLFLOW_TRACKING_URI, else sqlite under ./mlruns
    experiment: str = infra("gancore")  # MLflow experiment name
    image_every: int = infra(500)  # steps between fixed-noise grids logged as images
    log_checkpoints: str = infra("final")  # which checkpoints go to MLflow as artifacts: none | final | all
    # MLflow system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU utilisation and memory
    # with nvidia-ml-py) sampled every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10) by the main process
    system_metrics: bool = infra(True)
    # MLflow Model Registry name the finished run's generator model is registered under; None = logged, not registered
    register_model: str | None = infra(None)


@dataclass(frozen=True)
class EvalConfig:
    every: int = infra(0)  # steps between metric evaluations during training; 0 = only at the end if n > 0
    # or: real images shown to D between evaluations (the budget protocol: 250000); the best one is kept (best.pt)
    every_images: int = infra(0)
    n_samples: int = infra(0)  # generated samples per evaluation (10k protocol: 10000); 0 = no metrics
    # feature extractor: auto (inception if its weights file exists, else the dataset's domain classifier) |
    # inception | lenet_mnist | lenet_fashion_mnist | cifar_classifier; metric names say which was used
    extractor: str = infra("auto")
    # images per extractor forward pass; 0 = auto: 250 on a GPU, 25 on a CPU (Inception on 2 CPU cores runs 1.5x
    # faster at 25 than at 250: bench/eval_batch.py)
    batch_size: int = infra(0)
    inception_weights: str | None = infra(None)  # FID Inception weights file; None -> $TORCH_HOME/hub/checkpoints/
    real_split: str = infra("data")  # real images for the statistics: data (= data.split) | train | test
    metrics: tuple[str, ...] = infra(("fid", "is", "kid", "pr"))  # which to compute (a sweep needs only fid)


@dataclass(frozen=True)
class VAEConfig:
    beta: float = 1.0  # weight of the KL term (beta-VAE); 1 = the report's ELBO
    # end-of-run figures and vae_test_* metrics use the first N test images; 0 = all 10,000 (the reported numbers)
    test_subset: int = infra(0)


@dataclass(frozen=True)
class GANomalyConfig:
    w_adv: float = 1.0  # adversarial weight
    w_con: float = 50.0  # contextual (L1 reconstruction) weight
    w_enc: float = 1.0  # latent (z vs z_hat, L2) weight
    score: str = "latent"  # anomaly score: latent (||z - z_hat||) | recon (||x - x_hat||)
    # discriminator: latent (MLP telling encoder codes z from N(0, I) draws; pushes z toward the prior) |
    # image (the GANomaly paper's conv D on x vs x_hat, feature-matching adversarial loss)
    disc: str = "latent"
    # AUROC / figures / grid inputs use the first N test images (all digits); 0 = all 10,000 (the reported numbers)
    test_subset: int = infra(0)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: str = "linear"  # beta schedule: linear (Ho et al. 1e-4..0.02 at T=1000) | cosine (Nichol & Dhariwal)
    p_uncond: float = 0.1  # label dropout for classifier-free guidance
    guidance: float = infra(1.0)  # sampling guidance scale (1 = conditional, no extra guidance)
    sampler: str = infra("ddim")  # ddim | ddpm
    sample_steps: int = infra(50)  # DDIM steps
    ddim_eta: float = infra(0.0)  # DDIM noise scale eta (0 = deterministic given the initial noise)
    # U-Net (model.arch=unet; base width = model.ngf)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level (each after the first halves H, W)
    num_res_blocks: int = 2  # residual blocks per level
    attention: bool = True  # self-attention at the lowest resolution (and in the middle block)
    dropout: float = 0.1  # dropout inside residual blocks (Ho et al. CIFAR-10: 0.1)
    # the report's one-level denoiser (family denoiser_report)
    sigma: float = 0.5  # the single fixed noise level, in [-1, 1] image units


@dataclass(frozen=True)
class Config:
    name: str = infra("run")  # preset name; names the run directory and the MLflow run
    family: str = "gan"  # what the trainer drives: gan | vae | ganomaly | diffusion
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    track: TrackConfig = TrackConfig()
    eval: EvalConfig = EvalConfig()
    # family sections: read only by the families named here; a run logs only its own family's section
    vae: VAEConfig = family_section(VAEConfig(), "vae")
    ganomaly: GANomalyConfig = family_section(GANomalyConfig(), "ganomaly")
    diffusion: DiffusionConfig = family_section(DiffusionConfig(), "diffusion", "denoiser_report")


# Values checked beyond their type: key -> allowed values.
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.split": ("train", "test"),
    "data.on_device": ("auto", "yes", "no"),
    "data.resize": ("center_crop", "stretch", "pad"),
    "model.batchnorm": ("both", "g", "d", "none"),
    "model.g_act": ("relu", "lrelu", "tanh"),
    "model.d_act": ("relu", "lrelu", "tanh"),
    "model.upsample": ("convt", "nearest"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.compile": ("none", "compile", "cudagraph", "compile_cudagraph"),
    "track.log_checkpoints": ("none", "final", "all"),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.sampler": ("ddim", "ddpm"),
    "ganomaly.score": ("latent", "recon"),
    "ganomaly.disc": ("latent", "image"),
    "eval.extractor": ("auto", "inception", "lenet_mnist", "lenet_fashion_mnist", "cifar_classifier"),
    "eval.real_split": ("data", "train", "test"),
    "eval.metrics": ("fid", "is", "kid", "pr"),  # each element (gancore/metrics/fidelity.py ALL_METRICS)
    "model.kernel": (4, 5),
}


@dataclass(frozen=True)
class Range:
    """Allowed numbers of one key: lo / hi bounds, each inclusive unless open; `note` says what an edge value means."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            s = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            s = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return s + (f" ({self.note})" if self.note else "")


POSITIVE = Range(0, lo_open=True)  # > 0
NON_NEGATIVE = Range(0)  # >= 0
AT_LEAST_1 = Range(1)
PROBABILITY = Range(0, 1)  # [0, 1]
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)

# Numbers checked beyond their type: key -> allowed range (a tuple's every element). A sweep's sampled values go
# through from_dict too, so a search space that leaves these ranges is rejected when the sweep file is read.
RANGES: dict[str, Range] = {
    "data.subset": Range(0, note="0 = all images"),
    "data.normal_class": Range(-1, note="-1 = every class"),
    "data.image_size": Range(0, note="0 = native size"),
    "model.nz": AT_LEAST_1,
    "model.ngf": AT_LEAST_1,
    "model.ndf": AT_LEAST_1,
    "model.num_classes": AT_LEAST_1,
    "model.embed_dim": AT_LEAST_1,
    "loss.label_smoothing": Range(0, 1, lo_open=True, note="1 = off"),
    "loss.instance_noise": Range(0, note="0 = off"),
    "loss.gp_weight": NON_NEGATIVE,
    "loss.r1": Range(0, note="0 = off"),
    "loss.r2": Range(0, note="0 = off"),
    "loss.penalty_batch": Range(0, note="0 = the whole batch"),
    "optim.lr_g": POSITIVE,
    "optim.lr_d": POSITIVE,
    "optim.beta1": FRACTION,
    "optim.beta2": FRACTION,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.batch_size": AT_LEAST_1,
    "optim.d_iters": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.max_steps": Range(0, note="0 = as many as train.epochs give"),
    "train.max_images": Range(0, note="0 = the budget is train.max_steps or train.epochs"),
    "train.seed": Range(0, 2**31 - 1),  # NumPy seeds must fit 32 bits; per-process offsets are added to it
    "train.ema_decay": Range(0, 1, hi_open=True, note="0 = no EMA"),
    "train.log_every": AT_LEAST_1,
    "train.checkpoint_every": AT_LEAST_1,
    "train.keep_checkpoints": AT_LEAST_1,
    "train.snapshot_epochs": AT_LEAST_1,
    "train.loss_ranges": AT_LEAST_1,
    "train.grid_size": AT_LEAST_1,
    "track.image_every": AT_LEAST_1,
    "eval.every": Range(0, note="0 = only at the end"),
    "eval.every_images": Range(0, note="0 = eval.every counts steps"),
    "eval.n_samples": Range(0, note="0 = no metrics"),
    "eval.batch_size": Range(0, note="0 = auto"),
    "vae.beta": NON_NEGATIVE,
    "vae.test_subset": Range(0, note="0 = all"),
    "ganomaly.w_adv": NON_NEGATIVE,
    "ganomaly.w_con": NON_NEGATIVE,
    "ganomaly.w_enc": NON_NEGATIVE,
    "ganomaly.test_subset": Range(0, note="0 = all"),
    "diffusion.timesteps": AT_LEAST_1,
    "diffusion.p_uncond": PROBABILITY,
    "diffusion.guidance": NON_NEGATIVE,
    "diffusion.sample_steps": AT_LEAST_1,
    "diffusion.ddim_eta": NON_NEGATIVE,
    "diffusion.channel_mult": AT_LEAST_1,
    "diffusion.num_res_blocks": AT_LEAST_1,
    "diffusion.dropout": FRACTION,
    "diffusion.sigma": POSITIVE,
}
COMPILED = ("compile", "compile_cudagraph")  # train.compile modes that torch.compile the networks
CAPTURED = ("cudagraph", "compile_cudagraph")  # train.compile modes that capture the whole step (gancore/train/fast.py)


# ----------------------------------------------------------------------------------------------------------------
# Building a Config from dicts, files and overrides


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "2e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML 1.1 reads a bare no / yes (also off, false, ...) as a bool: train.mixed_precision=no means "no"
        if isinstance(value, bool) and ("yes" if value else "no") in CHOICES.get(key, ()):
            return "yes" if value else "no"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}?"
    else:
        section = key.split(".")[0]
        in_section = [k for k in known if k.startswith(section + ".")]
        sections = sorted({k.split(".")[0] for k in known if "." in k})
        hint = (f"keys of '{section}': {', '.join(in_section)}" if in_section
                else f"sections: {', '.join(sections)} (see gancore/config.py)")
    return ConfigError(f"unknown config key '{key}'; {hint}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def from_dict(d: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict, validating every key and value."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, all_keys(Config))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(v, tp, key + ".")
        else:
            kwargs[k] = check_value(key, coerce(v, tp, key))
    cfg = cls(**kwargs)
    if cls is Config:
        check_relations(cfg)
    return cfg


def _leaves(v: Any) -> list[Any]:
    """The numbers/strings inside a (nested) tuple value, or the value itself."""
    return [x for item in v for x in _leaves(item)] if isinstance(v, tuple) else [v]


def check_value(key: str, val: Any) -> Any:
    """`val` (already of the annotated type) against CHOICES and RANGES; a tuple's every element is checked."""
    show = f"{key}={_yaml_scalar(val)}"
    for x in _leaves(val):
        if key in CHOICES and x not in CHOICES[key]:
            raise ConfigError(f"{show if isinstance(val, tuple) else key}: {x!r} is not one of "
                              f"{', '.join(map(str, CHOICES[key]))}")
        if key in RANGES and x not in RANGES[key]:
            each = "each value " if isinstance(val, tuple) else ""
            raise ConfigError(f"{show} is out of range: {each}must be {RANGES[key].describe()}")
    return val


def check_relations(cfg: Config) -> None:
    """Constraints between keys (each key's own range is checked in from_dict)."""
    for lo, hi in cfg.train.loss_ranges:
        if lo > hi:
            raise ConfigError(f"train.loss_ranges: [{lo}, {hi}] starts after it ends; give [first_epoch, last_epoch] "
                              "pairs, e.g. [[1, 25], [26, 50]]")
    if cfg.train.max_images and cfg.train.max_steps:
        raise ConfigError(f"train.max_images={cfg.train.max_images} and train.max_steps={cfg.train.max_steps} both set "
                          "the run's length; set one of them to 0")
    if cfg.eval.every and cfg.eval.every_images:
        raise ConfigError(f"eval.every={cfg.eval.every} and eval.every_images={cfg.eval.every_images} both set when to "
                          "evaluate; set one of them to 0")
    if cfg.eval.every_images > 0 and cfg.eval.n_samples == 0:
        raise ConfigError(f"eval.every_images={cfg.eval.every_images} evaluates nothing while eval.n_samples=0; set "
                          "eval.n_samples (e.g. 10000), or eval.every_images=0 to turn metrics off")
    if cfg.eval.every > 0 and cfg.eval.n_samples == 0:
        raise ConfigError(f"eval.every={cfg.eval.every} evaluates nothing while eval.n_samples=0; set eval.n_samples "
                          "(e.g. 10000), or eval.every=0 to turn metrics off")
    if cfg.model.conditional and cfg.model.num_classes < 2:
        raise ConfigError(f"model.conditional=true needs model.num_classes >= 2, got {cfg.model.num_classes}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts/lists (YAML- and JSON-ready)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flat(cfg: Any, include_infra: bool = False, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; by default only the hyper-parameters (what MLflow logs as params)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("infra") and not include_infra:
            continue
        if dataclasses.is_dataclass(v):
            out.update(flat(v, include_infra, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = list(v) if isinstance(v, tuple) else v
    return out


def hyperparams(cfg: Config) -> dict[str, Any]:
    """What MLflow logs as a run's params: `flat(cfg)` without the sections of families other than cfg.family."""
    foreign = [f.name + "." for f in dataclasses.fields(cfg)
               if f.metadata.get("families") and cfg.family not in f.metadata["families"]]
    return {k: v for k, v in flat(cfg).items() if not k.startswith(tuple(foreign))}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_mapping(path: str | Path, error: type[Exception] = ConfigError, kind: str = "config file",
                 home: str = "presets live in configs/", expected: str = "a mapping of config sections") -> dict[str, Any]:
    """A YAML file that must hold a mapping (safe_load); each problem is one `error` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} {str(path)!r} not found; {home}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected {expected}")
    return d


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A preset as a dict, with its `base:` chain merged in (base first)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    d = read_mapping(path)
    base = d.pop("base", None)
    own_name = d.get("name", path.stem)  # a preset is named after its own file, not its base's
    if base:
        d = _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), d)
    d["name"] = own_name
    return d


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["optim.lr_g=1e-4", "model.nz=64"] -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr_g=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in all_keys(Config):
            raise _unknown(key, all_keys(Config))
        try:
            val = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            val = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val
    return out


def data_label(data: DataConfig) -> str:
    """What a run's data is called: the folder's or file's name for data.path (folder / npz), else data.name."""
    if not data.path:
        return data.name
    p = Path(data.path).expanduser()
    stem = (p.name or p.resolve().name) if p.suffix != ".npz" else p.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or data.name


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset file (with its bases) <- dotted overrides, validated.

    Unless `name=` is given, a run without a preset is named after its data (`data_label`: mnist, cats), and a run
    of a preset whose data.path comes from the command line after the preset and its data (folder-cats)."""
    preset = read_yaml(path) if path else {}
    over = parse_overrides(list(overrides))
    cfg = from_dict(_deep_merge(preset, over))
    if "name" in over:
        return cfg
    if not path:
        return dataclasses.replace(cfg, name=data_label(cfg.data))
    if cfg.data.path and not (preset.get("data") or {}).get("path"):
        return dataclasses.replace(cfg, name=f"{cfg.name}-{data_label(cfg.data)}")
    return cfg


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy of `cfg` with dotted keys replaced: replace(cfg, **{"optim.lr_g": 1e-3})."""
    return from_dict(_deep_merge(to_dict(cfg), parse_overrides([f"{k}={_yaml_scalar(v)}" for k, v in dotted.items()])))


def _yaml_scalar(v: Any) -> str:
    return yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True).strip().removesuffix("...").strip()


def save_yaml(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resume_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Hyper-parameters that differ between a checkpoint's config and `cfg` (run length may change)."""
    old = flat(from_dict(saved))
    new = flat(cfg)
    allowed = {"train.epochs", "train.max_steps", "train.max_images"}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in allowed and old.get(k) != new[k]]
