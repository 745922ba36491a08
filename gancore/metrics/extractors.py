"""Feature extractors as torch-fidelity sees them: the standard FID Inception and gancore's domain classifiers.

The domain classifiers are registered with torch-fidelity under their gancore names (`lenet_mnist`, ...), so
`torch_fidelity.calculate_metrics(..., feature_extractor="lenet_mnist")` computes exactly what gancore computes.

    eval.extractor=auto -> inception when its weights file exists, else the dataset's domain classifier
    metric names carry the choice: fid_inception_10k | fid_lenet_10k | fid_cifar_cnn_10k
"""

from __future__ import annotations

import hashlib
import pickle
import socket
import sys
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from gancore.config import Config
from gancore.errors import MetricsError
from gancore.metrics.classifier import (DOMAIN, FOR_DATASET, domain_spec, ensure_classifier, extractor_path,
                                       load_classifier, prepare)

INCEPTION = "inception"  # gancore's name; torch-fidelity's is below
TF_INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
MAKE_INCEPTION = "PYTHON=.venv/bin/python bash ../shared/weights/make-fid-inception.sh"
KNOWN = (INCEPTION, *DOMAIN)
NAMES = ("auto", *KNOWN)  # what eval.extractor takes (gancore/config.py asks here)
FOR_CHANNELS = {1: "lenet_mnist", 3: "cifar_classifier"}  # a dataset without its own classifier (folder, npz)


class DomainExtractor(FeatureExtractorBase):
    """A gancore domain classifier behind torch-fidelity's extractor interface.

    Features: "features" (penultimate layer, pre-activation; FID/KID/PR) and "logits" (10 classes; IS).
    Takes uint8 (B, C, H, W) with C = 1 or 3 at any size (converted and resized to the classifier's input).
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        self.spec = domain_spec(name)
        self.net = load_classifier(name, feature_extractor_weights_path)  # None: the default file, trained if missing

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # small nets: compiling costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise MetricsError(f"{self.name} takes uint8 images (B, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
        f = self.net.features(prepare(x, self.spec))  # (B, D)
        out = {"features": f, "logits": self.net.head(f) if "logits" in self.features_list else None}
        return tuple(out[k] for k in self.features_list)


for _name in DOMAIN:  # module reloads (tests, notebooks) must not register twice
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, DomainExtractor)


def tag(name: str) -> str:
    """The extractor's name inside metric keys: inception | lenet | lenet_fashion | cifar_cnn."""
    return INCEPTION if name == INCEPTION else domain_spec(name).tag


def default_inception_path() -> Path:
    """Where torch-fidelity looks before downloading: $TORCH_HOME/hub/checkpoints/weights-inception-....pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(explicit: str | None) -> Path | None:
    """The Inception weights file to use: eval.inception_weights (must exist) or the default one if present."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise MetricsError(f"FID Inception weights {p} not found (eval.inception_weights); build them there with "
                               f"`{MAKE_INCEPTION} {p}` or fix the path")
        return p
    p = default_inception_path()
    return p if p.is_file() else None


def resolve(cfg: Config, extractor: str | None = None, channels: int | None = None) -> str:
    """The extractor to use: `extractor`, else eval.extractor; `auto` -> inception if its weights exist, else the
    dataset's domain classifier (or, for folder/npz data, the greyscale or RGB one by `channels`)."""
    name = extractor or cfg.eval.extractor
    if name != "auto":
        if name not in KNOWN:
            raise MetricsError(f"unknown feature extractor {name!r}; known: {', '.join(NAMES)}")
        return name
    if inception_weights(cfg.eval.inception_weights) is not None:
        return INCEPTION
    if cfg.data.name in FOR_DATASET:
        return FOR_DATASET[cfg.data.name]
    if channels in FOR_CHANNELS:
        return FOR_CHANNELS[channels]
    raise MetricsError(f"no feature extractor for data.name={cfg.data.name!r} with {channels} channels; set "
                       f"eval.extractor to one of {', '.join(KNOWN)}")


def _download_inception() -> FeatureExtractorBase:
    """torch-fidelity's own path for real machines: it downloads the weights into the default file."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a firewalled cluster node would otherwise hang without end
    try:
        return create_feature_extractor(TF_INCEPTION, ["2048", "logits_unbiased"], cuda=False, verbose=False)
    except Exception as e:  # URLError, HTTPError, socket.timeout, a partial download ...
        raise MetricsError(
            f"FID Inception weights {default_inception_path()} not found and the download failed "
            f"({type(e).__name__}); put {INCEPTION_FILE} there (offline: `{MAKE_INCEPTION}`), set "
            "eval.inception_weights=PATH, or use eval.extractor=auto for the domain classifier") from None
    finally:
        socket.setdefaulttimeout(old)


_LOADED: dict[tuple, tuple[FeatureExtractorBase, str]] = {}  # (name, file, mtime, device) -> (extractor, id)
_DIGESTS: dict[tuple, str] = {}


def file_digest(p: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a weights file, cached per process by path, size, mtime and algorithm (sha1: the extractor's
    id in cache keys; sha256: a metric's protocol)."""
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, algorithm)
    if key not in _DIGESTS:
        h = hashlib.new(algorithm)
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def weights_file(name: str, cfg: Config) -> Path | None:
    """The weights file extractor `name` loads (None: Inception from torch-fidelity's download, not yet on disk)."""
    if name == INCEPTION:
        return inception_weights(cfg.eval.inception_weights) or (
            default_inception_path() if default_inception_path().is_file() else None)
    return extractor_path(name)


def load(name: str, cfg: Config, device: torch.device | str) -> tuple[FeatureExtractorBase, str]:
    """(extractor on `device`, eval mode, in torch-fidelity's class; its id = name + sha1 of its weights file).

    Kept in memory per process: the trainer evaluates every few thousand steps, Inception takes seconds to load.
    A domain classifier missing from $GANCORE_CACHE/extractors is trained first (on `device`).
    """
    device = torch.device(device)
    if name == INCEPTION:
        path = inception_weights(cfg.eval.inception_weights)
    else:
        path = ensure_classifier(name, device)
    key = (name, str(path), path.stat().st_mtime_ns if path else None, str(device))
    if key not in _LOADED:
        if name == INCEPTION and path is None:
            fe = _download_inception()
            path = default_inception_path()
        elif name == INCEPTION:
            try:
                # torch-fidelity unpickles with weights_only=False; a weights_only=True pass first (mmap: no
                # second 95 MB read) rejects a file that would run code before it is unpickled unrestricted
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                fe = create_feature_extractor(TF_INCEPTION, ["2048", "logits_unbiased"], cuda=False, verbose=False,
                                              feature_extractor_weights_path=str(path))
            except pickle.UnpicklingError:
                raise MetricsError(f"refusing FID Inception weights {path}: not a plain tensor file (unpickling it "
                                   f"would run code); rebuild them with `{MAKE_INCEPTION} {path}`") from None
            except (RuntimeError, OSError, EOFError, ValueError) as e:
                raise MetricsError(f"cannot load FID Inception weights {path} ({str(e).splitlines()[0][:120]}); "
                                   f"rebuild them with `{MAKE_INCEPTION} {path}`") from None
        else:
            fe = create_feature_extractor(name, ["features", "logits"], cuda=False, verbose=False,
                                          feature_extractor_weights_path=str(path))
        _LOADED[key] = (fe.to(device), f"{name}:{file_digest(path)}")
    return _LOADED[key]


def layers(fe: FeatureExtractorBase) -> tuple[str, str]:
    """(layer for FID/KID/PR, layer for IS) as the extractor's class declares them."""
    return fe.get_default_feature_layer_for_metric("fid"), fe.get_default_feature_layer_for_metric("isc")


def has_classifier(fe: FeatureExtractorBase) -> bool:
    """False for the offline Inception build, whose classification layer is NaN (IS would be NaN)."""
    fc = getattr(fe, "fc", None)
    return fc is None or bool(torch.isfinite(fc.weight).all())


def as_input(fe: FeatureExtractorBase, x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> what `fe` takes; Inception needs 3 channels (grey repeated, uint8; it resizes itself)."""
    if x.dtype != torch.uint8:
        raise MetricsError(f"metrics take uint8 images (B, C, H, W); the sampler returned {x.dtype}")
    if not isinstance(fe, DomainExtractor) and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def notice(msg: str, _seen: set[str] = set()) -> None:  # noqa: B006 -- the set is the once-per-process memory
    """Print a one-line metrics notice to stderr, once per process."""
    if msg not in _seen:
        _seen.add(msg)
        print(f"metrics: {msg}", file=sys.stderr)
