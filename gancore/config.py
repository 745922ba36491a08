"""Every default, and how a run's Config is built from presets and overrides.

A run's configuration is a tree of frozen dataclasses: the sections below, and the family sections (vae, ganomaly,
diffusion), declared beside their families (gancore/families/*_config.py) and composed into `Config` here. Each key
is one line: its type (the annotation), its default and what a value must satisfy (a range, choices or a registry),
through gancore/options.py's `key(...)`. Fields marked `infra(...)` are infrastructure (paths, intervals, workers):
they never change the result, so they are not logged as MLflow params and may differ between a run and its resume.
Presets in configs/*.yaml override defaults (a preset may name a `base:` preset it extends),
and dotted `key=value` overrides on the command line come last. Unknown keys and bad values are one-line errors
that name the key and the closest valid ones or the allowed values.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gancore.errors import ConfigError
from gancore.families.diffusion_config import DiffusionConfig
from gancore.families.ganomaly_config import GANomalyConfig
from gancore.families.vae_config import VAEConfig
from gancore.io import atomic_write
from gancore import options
from gancore.options import (AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Range, asked, at_least, check, check_owned,
                             coerce, family_section, infra, key, owned, unknown, yaml_scalar)
from gancore.registry import DATASETS, FAMILIES, LOSSES, MODELS


SPLITS = ("train", "test")  # a data set's splits: data.split, and the named references of eval.real_split

@dataclass(frozen=True)
class DataConfig:
    name: str = key("mnist", registry=DATASETS)  # gancore/data.py: mnist, cifar10, folder, npz, ... (train.py --help)
    root: str | None = infra(None)  # data dir; None -> $GANCORE_DATA, else ./data
    path: str | None = None  # the file (npz) or folder (folder) for those two dataset kinds
    split: str = key("train", choices=SPLITS)
    subset: int = key(0, at_least(0, "0 = all images"))  # keep the first N images (after the class filter)
    # train only on this label (anomaly detection: the "normal" digit)
    normal_class: int = key(-1, at_least(-1, "-1 = every class"))
    image_size: int = key(0, at_least(0, "0 = native size"))  # resize to S x S (GANomaly: MNIST at 32)
    # how a non-square image becomes S x S: center_crop (shorter side to S, centre kept; torchvision's Resize +
    # CenterCrop) | stretch (both sides to S) | pad (longer side to S, black borders); square images: all the same
    resize: str = key("center_crop", choices=("center_crop", "stretch", "pad"))
    download: bool = infra(False)  # let torchvision download a missing dataset (needs internet)
    on_device: str = infra("auto", choices=("auto", "yes", "no"))  # keep the whole uint8 set on the training device


ACTIVATIONS = ("relu", "lrelu", "tanh")  # LeakyReLU slope 0.2


@dataclass(frozen=True)
class ModelConfig:
    arch: str = key("dcgan_mnist", registry=MODELS)  # the network builder (gancore/models/)
    nz: int = key(100, AT_LEAST_1)  # latent size (VAE: 2 in the report)
    ngf: int = key(64, AT_LEAST_1)  # generator / decoder base width
    ndf: int = key(64, AT_LEAST_1)  # discriminator / encoder base width
    batchnorm: str = key("both", choices=("both", "g", "d", "none"))  # where BatchNorm goes (WGAN-GP critic: g)
    g_act: str = key("relu", choices=ACTIVATIONS)  # generator hidden activation
    d_act: str = key("lrelu", choices=ACTIVATIONS)  # discriminator hidden activation
    kernel: int = key(4, choices=(4, 5))  # DCGAN kernel size: 4 (classic) or 5 (the 5x5 report)
    # generator upsampling: convt (transposed conv) | nearest (upsample + conv)
    upsample: str = key("convt", choices=("convt", "nearest"))
    spectral_norm: bool = False  # spectral normalisation on every discriminator layer
    conditional: bool = False  # class-conditional G and D (label embedding)
    num_classes: int = key(10, AT_LEAST_1)  # classes for conditional models
    embed_dim: int = key(50, AT_LEAST_1)  # label-embedding size fed to G


@dataclass(frozen=True)
class LossConfig:
    name: str = key("nonsaturating", registry=LOSSES)  # gancore/losses.py; `jobs/train.py --help` lists the names
    # one-sided smoothing: target for real images (ablation: 0.9)
    label_smoothing: float = key(1.0, Range(0, 1, lo_open=True, note="1 = off"))
    instance_noise: float = key(0.0, at_least(0, "0 = off"))  # sigma of Gaussian noise on D inputs (MNIST report: 0.05)
    gp_weight: float = key(10.0, NON_NEGATIVE)  # WGAN-GP lambda
    # zero-centred gradient penalties on D (Mescheder et al. 2018; R3GAN): r1 * 0.5 * E||grad_x D(x)||^2 on real
    # images, r2 the same on generated ones; 0 = off. Any loss; one extra D forward/backward per penalty and D step
    r1: float = key(0.0, at_least(0, "0 = off"))
    r2: float = key(0.0, at_least(0, "0 = off"))
    # R1/R2 on the first N images of each batch only (an unbiased, cheaper estimate)
    penalty_batch: int = key(0, at_least(0, "0 = the whole batch"))


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = key(2e-4, POSITIVE)  # generator (or the single network's) learning rate
    lr_d: float = key(2e-4, POSITIVE)  # discriminator learning rate
    beta1: float = key(0.5, FRACTION)  # Adam beta1 (DCGAN: 0.5)
    beta2: float = key(0.999, FRACTION)  # Adam beta2
    weight_decay: float = key(0.0, NON_NEGATIVE)
    batch_size: int = key(64, AT_LEAST_1)  # global batch (split over processes)
    d_iters: int = key(1, AT_LEAST_1)  # D steps per G step (WGAN-GP: 5); each draws a fresh real batch


COMPILE_MODES = ("none", "compile", "cudagraph", "compile_cudagraph")  # what train.compile takes
COMPILED = ("compile", "compile_cudagraph")  # train.compile modes that torch.compile the networks
CAPTURED = ("cudagraph", "compile_cudagraph")  # train.compile modes that capture the whole step (gancore/train/fast.py)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(100, AT_LEAST_1)  # passes over the (subset of the) data
    max_steps: int = key(0, at_least(0, "0 = as many as train.epochs give"))  # stop after this many steps instead
    # the budget in real images shown to D (Lucic et al. 2018: 1.0M on MNIST); steps = ceil(max_images / (batch x
    # d_iters)), so the batch size and D steps change steps, not the budget (gancore/train/budget.py)
    max_images: int = key(0, at_least(0, "0 = the budget is train.max_steps or train.epochs"))
    seed: int = key(0, Range(0, 2**31 - 1))  # NumPy seeds must fit 32 bits; per-process offsets are added to it
    mixed_precision: str = key("no", choices=("no", "bf16", "fp16"))  # through Accelerate
    ema_decay: float = key(0.0, Range(0, 1, hi_open=True, note="0 = no EMA"))  # generator EMA decay (e.g. 0.999)
    # the fast path (gancore/train/fast.py): none | compile (torch.compile the networks) | cudagraph (the whole step
    # captured in one CUDA graph) | compile_cudagraph (both); falls back with a one-line notice where it cannot apply
    compile: str = key("none", choices=COMPILE_MODES)
    channels_last: bool = infra(False)  # NHWC weights/activations (cuDNN tensor cores under bf16); see bench/
    log_every: int = infra(50, AT_LEAST_1)  # steps between statistic reads (the only host syncs of the loop)
    checkpoint_every: int = infra(1000, AT_LEAST_1)  # steps between full-state checkpoints (also at the end)
    keep_checkpoints: int = infra(2, AT_LEAST_1)  # how many step checkpoints to keep on disk
    snapshot_epochs: tuple[int, ...] = infra((1, 25, 50, 100), AT_LEAST_1)  # epochs whose grid + G weights are saved
    # loss-plot epoch ranges
    loss_ranges: tuple[tuple[int, int], ...] = infra(((1, 25), (26, 50), (51, 100)), AT_LEAST_1)
    grid_size: int = infra(64, AT_LEAST_1)  # images in a fixed-noise sample grid
    progress: bool = infra(True)  # rich progress bar


@dataclass(frozen=True)
class TrackConfig:
    enabled: bool = infra(True)  # log to MLflow
    uri: str | None = infra(None)  # tracking URI; None -> $MLFLOW_TRACKING_URI, else sqlite under ./mlruns
    experiment: str = infra("gancore")  # MLflow experiment name
    image_every: int = infra(500, AT_LEAST_1)  # steps between fixed-noise grids logged as images
    # which checkpoints go to MLflow as artifacts
    log_checkpoints: str = infra("final", choices=("none", "final", "all"))
    # MLflow system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU utilisation and memory
    # with nvidia-ml-py) sampled every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10) by the main process
    system_metrics: bool = infra(True)
    # MLflow Model Registry name the finished run's generator model is registered under; None = logged, not registered
    register_model: str | None = infra(None)


@dataclass(frozen=True)
class EvalConfig:
    every: int = infra(0, at_least(0, "0 = only at the end"))  # steps between metric evaluations during training
    # or: real images shown to D between evaluations (the budget protocol: 250000); the best one is kept (best.pt)
    every_images: int = infra(0, at_least(0, "0 = eval.every counts steps"))
    # generated samples per evaluation (10k protocol: 10000)
    n_samples: int = infra(0, at_least(0, "0 = no metrics"))
    # feature extractor: auto (inception if its weights file exists, else the dataset's domain classifier) |
    # inception | a domain classifier (gancore/metrics/extractors.py NAMES); metric names say which was used
    extractor: str = infra("auto", choices=asked("gancore.metrics.extractors.NAMES"))
    # images per extractor forward pass; auto: 250 on a GPU, 25 on a CPU (Inception on 2 CPU cores runs 1.5x faster
    # at 25 than at 250: bench/eval_batch.py)
    batch_size: int = infra(0, at_least(0, "0 = auto"))
    inception_weights: str | None = infra(None)  # FID Inception weights file; None -> $TORCH_HOME/hub/checkpoints/
    # real images for the statistics: data (= data.split) | train | test
    real_split: str = infra("data", choices=("data", *SPLITS))
    # which to compute (a sweep needs only fid)
    metrics: tuple[str, ...] = infra(("fid", "is", "kid", "pr"), choices=asked("gancore.metrics.fidelity.ALL_METRICS"))


@dataclass(frozen=True)
class Config:
    name: str = infra("run")  # preset name; names the run directory and the MLflow run
    family: str = key("gan", registry=FAMILIES)  # what the trainer drives (gancore/families/): gan, vae, ...
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    track: TrackConfig = TrackConfig()
    eval: EvalConfig = EvalConfig()
    # family sections, declared beside their families: read only by the families named here; a run logs only its
    # own family's section
    vae: VAEConfig = family_section(VAEConfig(), "vae")
    ganomaly: GANomalyConfig = family_section(GANomalyConfig(), "ganomaly")
    diffusion: DiffusionConfig = family_section(DiffusionConfig(), "diffusion", "denoiser_report")


# ----------------------------------------------------------------------------------------------------------------
# Building a Config from dicts, files and overrides


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def declarations() -> dict[str, dataclasses.Field]:
    """Dotted key -> its field: default, and the range / choices / registry declared with it (gancore/options.py)."""
    return options.declarations(Config)


def all_keys() -> list[str]:
    """Every dotted leaf key of the config tree."""
    return list(declarations())


def choices(key: str) -> tuple[Any, ...]:
    """The values `key` (or each element of a list key) may take: declared with it, or asked of their owner."""
    meta = declarations()[key].metadata
    if "registry" in meta:
        return tuple(meta["registry"].names())
    listed = meta.get("choices", ())
    return listed() if callable(listed) else listed


def from_dict(d: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict, validating every key and value."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = prefix + str(k)
        if k not in fields:
            raise unknown(key, all_keys())
        tp, meta = hints[k], fields[k].metadata
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(v, tp, key + ".")
        else:
            kwargs[k] = check(key, meta, coerce(v, tp, key, meta.get("choices", ())))
    cfg = cls(**kwargs)
    if cls is Config:
        check_relations(cfg)
        check_names(cfg)
    return cfg


def check_names(cfg: Config) -> None:
    """Values that must name an entry of a registry, or of another module's table (extractors, metrics).

    Runs after every other check, since asking the owner imports it (torch): a config wrong in another way still
    fails in a blink. A key's default is not asked: tests/test_config.py checks each default against its owner."""
    for dotted, declared in declarations().items():
        val = functools.reduce(getattr, dotted.split("."), cfg)
        if owned(declared.metadata) and val != declared.default:
            check_owned(dotted, declared.metadata, val)


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
        if key not in declarations():
            raise unknown(key, all_keys())
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
    return from_dict(_deep_merge(to_dict(cfg), parse_overrides([f"{k}={yaml_scalar(v)}" for k, v in dotted.items()])))


def save_yaml(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resume_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Hyper-parameters that differ between a checkpoint's config and `cfg` (run length may change)."""
    old = flat(from_dict(saved))
    new = flat(cfg)
    allowed = {"train.epochs", "train.max_steps", "train.max_images"}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in allowed and old.get(k) != new[k]]
