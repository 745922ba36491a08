"""FID / IS / KID / precision-recall of generated uint8 tensors, computed by torch-fidelity's metric functions.

Owns: metric names (`MetricKey`: built, taken apart and mapped to their protocol tag; `metric_key`, `count_tag`),
feature extraction of batches (`features`, `sampled_batches`), the cached real statistics (`real_images`,
`real_statistics`), the metric table (`METRIC_FNS`) and `evaluate`.

    sample_uint8(b) -> (b, C, H, W) uint8 --extractor (torch-fidelity class)--> features --torch-fidelity--> metrics
                                                                 real statistics (cached on disk) --^

No PNG round trip: generated batches go straight to the extractor. Real statistics (mean, covariance and, for
KID/PR, the features) are computed once per (real images, extractor) and kept under
$GANCORE_CACHE/fid_stats/, keyed by the sha1 of the real uint8 tensor and of the extractor's weights, so a change
of data, subset, class filter or extractor gives a new file, and concurrent runs share finished ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from gancore.config import SPLITS, Config  # SPLITS: the suffix of a key measured against a named split
from gancore.data import load_images
from gancore.io import atomic_write, cache_dir
from gancore.errors import MetricsError
from gancore.metrics import extractors
from gancore.progress import Bar

PAIRWISE_MAX = 10_000  # KID and precision/recall cost n^2: they use at most this many of each set (named so)
KID_SUBSET = 1000  # torch-fidelity's default KID subset size (smaller sets use all their samples)
SEED = 2020  # torch-fidelity's default rng_seed: our IS splits and KID subsets equal its own
STATS_FORMAT = 1  # bump when the cached statistics change meaning


class EvaluationStopped(Exception):
    """A stop request (the training loop's StopFlag) ended an evaluation between two extractor batches; the chunks
    already cached stay, nothing is logged."""


def _check(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise EvaluationStopped("evaluation stopped by a stop request")


IS_FLOOR_FLAG = 1.05  # an IS this close to its floor of 1.0 is flagged (`degenerate`)


def degenerate(key: str, value: float) -> str | None:
    """Why a sample-quality value says nothing about quality, or None. IS = exp(E KL(p(y|x) || p(y))) is 1.0 when the
    classifier gives every generated image the same class distribution: collapsed or unrecognisable samples (an
    untrained G gives 1.00), not a low-but-fair score."""
    parsed = MetricKey.find(key)
    if parsed is not None and parsed.metric == "is" and value <= IS_FLOOR_FLAG:
        return (f"degenerate: IS {value:.3g} is at its floor 1.0 (the classifier sees the same class mix in every "
                "generated image: collapsed or unrecognisable samples); look at the sample grids")
    return None


def count_tag(n: int) -> str:
    """Sample count in metric names: 10000 -> 10k, 50000 -> 50k, 500 -> 500, 2500 -> 2500."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


KINDS = ("fid", "is", "kid", "precision", "recall")  # what `evaluate`'s keys start with
_KEY_RE = re.compile(rf"(best_)?({'|'.join(KINDS)})_(.+?)_(\d+)(k?)(?:_({'|'.join(SPLITS)}))?")


@dataclass(frozen=True)
class MetricKey:
    """A sample-quality metric's name, which states its protocol; the one place such a name is
    built and taken apart. MetricKey.of("fid", "lenet_mnist", 10000).name == "fid_lenet_10k";
    MetricKey.parse("fid_inception_10k_test") == MetricKey("fid", "inception", 10000, "test");
    "best_fid_lenet_10k" (best=True) is the lowest fid_lenet_10k a run reached (the loop's end-of-run value)."""

    metric: str  # one of KINDS
    extractor: str  # the extractor's tag in names (extractors.tag): inception | lenet | lenet_fashion | cifar_cnn
    count: int  # generated images measured (KID, precision/recall: at most PAIRWISE_MAX)
    split: str | None = None  # measured against this split of the data instead of the run's eval.real_split
    best: bool = False

    @classmethod
    def of(cls, metric: str, extractor: str, n: int, split: str | None = None) -> MetricKey:
        """The key of `metric` measured by the extractor named `extractor` (lenet_mnist, inception) on n images."""
        return cls(metric, extractors.tag(extractor), int(n), split)

    @property
    def protocol_part(self) -> str:
        """What the key says of its protocol: lenet_10k, inception_10k_test."""
        return f"{self.extractor}_{count_tag(self.count)}" + (f"_{self.split}" if self.split else "")

    @property
    def name(self) -> str:
        return f"{'best_' if self.best else ''}{self.metric}_{self.protocol_part}"

    def as_best(self) -> MetricKey:
        """The key of the best value of this one a run reached: fid_lenet_10k -> best_fid_lenet_10k."""
        return dataclasses.replace(self, best=True)

    @property
    def protocol_key(self) -> str:
        """The MLflow tag that holds this key's protocol (`protocol`): fid_lenet_10k -> gancore.protocol.lenet_10k."""
        return f"gancore.protocol.{self.protocol_part}"

    @classmethod
    def find(cls, name: str) -> MetricKey | None:
        """The key `name` spells, or None for another name (Loss/D, images_per_s)."""
        m = _KEY_RE.fullmatch(name)
        if m is None:
            return None
        best, metric, tag, digits, thousands, split = m.groups()
        return cls(metric, tag, int(digits) * (1000 if thousands else 1), split, best is not None)

    @classmethod
    def parse(cls, name: str) -> MetricKey:
        """The key `name` spells, or a one-line MetricsError."""
        key = cls.find(name)
        if key is None:
            raise MetricsError(f"{name!r} is not a sample-quality metric name (<{'|'.join(KINDS)}>_<extractor>_"
                               f"<count>[_{'|'.join(SPLITS)}], e.g. fid_lenet_10k)")
        return key


def metric_key(metric: str, extractor: str, n: int, split: str | None = None) -> str:
    """fid_inception_10k, is_lenet_10k, precision_cifar_cnn_10k, fid_inception_10k_test ... (MetricKey.of)."""
    return MetricKey.of(metric, extractor, n, split).name


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), by torch-fidelity (float64)."""
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    return fid_features_to_statistics(features.double().cpu())


# ----------------------------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def features(fe: FeatureExtractorBase, batches: Iterator[torch.Tensor], total: int, device: torch.device | str,
             desc: str = "features", progress: bool = False,
             on_batch: Callable[[int], None] | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Run uint8 batches through `fe`; {layer: (N, D) float32 on the CPU}. `on_batch(k)` after each batch.
    `stop()` is asked before each batch (sampling + one forward pass: seconds at most); True raises
    EvaluationStopped."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in fe.get_requested_features_list()}
    with Bar(desc, total, enabled=progress, note="") as bar:
        _check(stop)
        for x in batches:
            feats = fe.convert_features_tuple_to_dict(fe(extractors.as_input(fe, x.to(device))))
            for k, v in feats.items():
                out[k].append(v.float().cpu())
            bar.advance(len(x))
            if on_batch is not None:
                on_batch(len(x))
            _check(stop)
    return {k: torch.cat(v) for k, v in out.items()}


CHUNK = 1000  # generated images per cached chunk of features (an interrupted evaluation loses at most one chunk)
SAMPLE_BLOCK = 250  # generated images per sampler call: fixes the latents whatever the extractor's batch size


def chunked_features(fe: FeatureExtractorBase, chunk_sampler: Callable[[int], Callable[[int], torch.Tensor]],
                     n: int, batch: int, device: torch.device | str, cache: Path,
                     progress: bool = False, desc: str = "generated features",
                     stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Features of n generated images, CHUNK at a time, each chunk saved under `cache` as soon as it is done, so an
    interrupted evaluation (Ctrl-C, a preempted job) continues at the first missing chunk. chunk_sampler(i) is
    chunk i's sampler (b -> b uint8 images, seeded per chunk): a chunk is the same whether computed in one go or
    after a restart. `stop`: see `features` (the chunks done so far stay cached)."""
    sizes = [min(CHUNK, n - lo) for lo in range(0, n, CHUNK)]
    files = [cache / f"chunk_{i:05d}-{size}.pt" for i, size in enumerate(sizes)]
    done = sum(size for f, size in zip(files, sizes) if f.is_file())
    parts = []
    with Bar(desc, n, enabled=progress, completed=done, elapsed=True, note="") as bar:
        for i, (f, size) in enumerate(zip(files, sizes)):
            if f.is_file():
                try:
                    parts.append(torch.load(f, weights_only=True))
                    continue
                except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
                    pass  # torn: compute it again
            feats = features(fe, sampled_batches(chunk_sampler(i), size, batch), size, device,
                             on_batch=lambda k: bar.advance(k), stop=stop)
            try:
                atomic_write(f, lambda fh, feats=feats: torch.save(feats, fh))
            except OSError as e:
                extractors.notice(f"cannot cache generated features in {cache} ({e.strerror}); an interrupted "
                                  "evaluation will start over")
            parts.append(feats)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sampled_batches(sample_uint8: Callable[[int], torch.Tensor], n: int, batch: int) -> Iterator[torch.Tensor]:
    """n generated images from the sampler, in batches of at most `batch`, checked for count and dtype. The sampler
    is always asked for SAMPLE_BLOCK images at a time, whatever `batch` is: the latents it draws (and so the
    numbers) do not depend on the extractor's batch size, which differs between a CPU and a GPU."""
    for lo in range(0, n, SAMPLE_BLOCK):
        b = min(SAMPLE_BLOCK, n - lo)
        x = sample_uint8(b)
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or len(x) != b:
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise MetricsError(f"sample_uint8({b}) must return uint8 ({b}, C, H, W); got {got}")
        yield from x.split(batch)


# ----------------------------------------------------------------------------------------------------------------
# Real statistics, cached


def eval_batch(cfg: Config, device: torch.device | str) -> int:
    """Images per extractor forward pass: eval.batch_size, or (0 = auto) 250 on a GPU and 25 on a CPU, where large
    batches fall out of cache (Inception on 2 cores: 9.4 images/s at 25, 6.0 at 250; bench/eval_batch.py)."""
    if cfg.eval.batch_size:
        return cfg.eval.batch_size
    return 25 if torch.device(device).type == "cpu" else 250


def real_split(cfg: Config) -> str:
    return cfg.data.split if cfg.eval.real_split == "data" else cfg.eval.real_split


def real_images(cfg: Config, n: int) -> torch.Tensor:
    """The first n (or all, if fewer) real images the statistics are computed from: uint8 (m, C, H, W)."""
    x, _ = load_images(dataclasses.replace(cfg.data, split=real_split(cfg)))
    return x[:n].contiguous()


def stats_path(cfg: Config, extractor_name: str, extractor_id: str, x_real: torch.Tensor) -> Path:
    """$GANCORE_CACHE/fid_stats/<data>-<split>[-c<k>]-<extractor>-<count>-<sha1 of content>.npz."""
    h = hashlib.sha1(f"{STATS_FORMAT}|{extractor_id}|{PAIRWISE_MAX}|{tuple(x_real.shape)}|".encode())
    h.update(np.ascontiguousarray(x_real.numpy()).data)
    cls = f"-c{cfg.data.normal_class}" if cfg.data.normal_class >= 0 else ""
    name = f"{cfg.data.name}-{real_split(cfg)}{cls}-{extractor_name}-{count_tag(len(x_real))}-{h.hexdigest()[:20]}"
    return cache_dir() / "fid_stats" / f"{name}.npz"


def _real_features(fe: FeatureExtractorBase, x_real: torch.Tensor, batch: int, device: torch.device | str,
                   progress: bool, parts: Path, stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Features of the real images (the expensive step the cache saves), in chunks cached under `parts` until the
    statistics are written, so an interrupted first evaluation (35 min for 10k Inception features on a CPU)
    continues where it stopped."""
    def chunk(i: int) -> Callable[[int], torch.Tensor]:
        pos = i * CHUNK

        def take(b: int) -> torch.Tensor:
            nonlocal pos
            pos += b
            return x_real[pos - b: pos]
        return take

    return chunked_features(fe, chunk, len(x_real), batch, device, parts, progress, "real features", stop)


def real_statistics(cfg: Config, extractor_name: str, fe: FeatureExtractorBase, extractor_id: str,
                    x_real: torch.Tensor, device: torch.device | str, progress: bool = False,
                    stop: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
    """{"mu" (D,), "sigma" (D, D) float64, "features" (<= PAIRWISE_MAX, D) float32} of the real images, cached."""
    path = stats_path(cfg, extractor_name, extractor_id, x_real)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in ("mu", "sigma", "features")}
        except (OSError, ValueError, KeyError):
            pass  # unreadable (e.g. a disk-full write): recompute and overwrite
    layer, _ = extractors.layers(fe)
    parts = path.with_name(path.stem + ".parts")
    f = _real_features(fe, x_real, eval_batch(cfg, device), device, progress, parts, stop)[layer]
    st = statistics(f)
    out = {"mu": st["mu"], "sigma": st["sigma"], "features": f[:PAIRWISE_MAX].numpy()}
    try:
        atomic_write(path, lambda fh: np.savez(fh, **out))  # concurrent runs see no file or a whole one
        shutil.rmtree(parts, ignore_errors=True)  # the statistics replace the chunks
    except OSError as e:
        extractors.notice(f"cannot cache real statistics in {path.parent} ({e.strerror}); recomputing each time")
    return out


def floor_fid(cfg: Config, extractor: str, n: int, device: torch.device | str, progress: bool = False,
              cached_only: bool = False) -> float | None:
    """FID of n real training images against n real test images (the data set's own floor: no generator measured
    this way can be expected to score much lower), from the cached statistics of both splits (computed when
    missing; with `cached_only`, None instead)."""
    splits = [dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, real_split=s)) for s in SPLITS]
    name = extractors.resolve(cfg, extractor, channels=real_images(splits[0], 1).shape[1])
    fe, fe_id = extractors.load(name, cfg, device)
    reals = [real_images(c, n) for c in splits]
    if cached_only and not all(stats_path(c, name, fe_id, x).is_file() for c, x in zip(splits, reals)):
        return None
    a, b = (real_statistics(c, name, fe, fe_id, x, device, progress) for c, x in zip(splits, reals))
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


# ----------------------------------------------------------------------------------------------------------------
# The metrics: each takes (generated features, real statistics) and returns {kind: value}


def _fid(gen: torch.Tensor, real: dict, **_) -> dict[str, float]:
    st = statistics(gen)
    return {"fid": fid_statistics_to_metric(st, {"mu": real["mu"], "sigma": real["sigma"]}, False)[KEY_METRIC_FID]}


def _is(logits: torch.Tensor, **_) -> dict[str, float]:
    return {"is": isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=SEED)[KEY_METRIC_ISC_MEAN]}


def _kid(gen: torch.Tensor, real: dict, **_) -> dict[str, float]:
    g, r = gen[:PAIRWISE_MAX], torch.from_numpy(real["features"])
    out = kid_features_to_metric(g, r, kid_subsets=100, kid_subset_size=min(KID_SUBSET, len(g), len(r)),
                                 rng_seed=SEED, verbose=False)
    return {"kid": out[KEY_METRIC_KID_MEAN]}


def _pr(gen: torch.Tensor, real: dict, **_) -> dict[str, float]:
    # torch-fidelity's convention: input 1 generated, input 2 real; k = 3 neighbours; blocks of 10k rows
    out = prc_features_to_metric(gen[:PAIRWISE_MAX], torch.from_numpy(real["features"]), prc_neighborhood=3,
                                 prc_batch_size=10_000, save_cpu_ram=True, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL]}


# A plain table, not a gancore.registry Registry: the four metrics are a fixed set that `evaluate` names one by one
# (their keys differ: KID/PR count at most PAIRWISE_MAX samples, PR gives two values, IS needs the logits), so
# nothing is dispatched by a name from a config, and an unknown name is a MetricsError (exit code 2) raised below.
METRIC_FNS: dict[str, Callable[..., dict[str, float]]] = {"fid": _fid, "is": _is, "kid": _kid, "pr": _pr}
ALL_METRICS = tuple(METRIC_FNS)  # ("fid", "is", "kid", "pr")


def protocol(cfg: Config, extractor: str | None = None, n: int | None = None, ema: bool = False) -> dict[str, Any]:
    """How a sample-quality number is measured, to store beside it: the numbers of two runs belong in one
    column only when these agree. Keyed in MLflow as tag MetricKey.protocol_key (fid_lenet_10k ->
    gancore.protocol.lenet_10k)."""
    import torch_fidelity

    n = cfg.eval.n_samples if n is None else int(n)
    x_real = real_images(cfg, n)
    name = extractors.resolve(cfg, extractor, channels=x_real.shape[1])
    weights = extractors.weights_file(name, cfg)
    return {
        "extractor": name,
        "weights_sha256": extractors.file_digest(weights, "sha256") if weights is not None else "torch-fidelity download",
        "generated": n,
        "reference": f"{cfg.data.name} {real_split(cfg)}" + (f" class {cfg.data.normal_class}"
                                                               if cfg.data.normal_class >= 0 else ""),
        "reference_count": len(x_real),
        "resize": ("bilinear to 299x299 inside Inception (torch-fidelity), grey repeated to 3 channels"
                   if name == extractors.INCEPTION else f"none: the extractor takes {tuple(x_real.shape[1:])}"),
        "kid_pr_count": min(n, PAIRWISE_MAX),
        "torch_fidelity": torch_fidelity.__version__,
        "ema": bool(ema),
    }


def protocol_key(proto: dict[str, Any], split: str | None = None) -> str:
    """The MLflow tag that holds `proto`: gancore.protocol.<extractor tag>_<count>[_<split>] (MetricKey.protocol_key;
    fid_lenet_10k -> gancore.protocol.lenet_10k)."""
    return MetricKey.of("fid", proto["extractor"], proto["generated"], split).protocol_key


def protocol_tag(proto: dict[str, Any], split: str | None = None) -> dict[str, str]:
    """{protocol_key: the protocol as sorted JSON}: the run tag stored beside the metrics."""
    return {protocol_key(proto, split): json.dumps(proto, sort_keys=True)}


def evaluate(cfg: Config, sample_uint8: Callable[[int], torch.Tensor], device: torch.device,
             extractor: str | None = None, n: int | None = None, *, metrics: tuple[str, ...] = ALL_METRICS,
             progress: bool = False,
             resumable: tuple[Callable[[int], Callable[[int], torch.Tensor]], Path] | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """FID/IS/KID/precision/recall of n generated images against cached real statistics, named by protocol.

    sample_uint8(b) returns b generated images, uint8 (b, C, H, W) on `device`, C = 1 or 3.
    n defaults to eval.n_samples (0 -> {}); extractor to eval.extractor (auto | inception | lenet_mnist | ...).
    Returns e.g. {"fid_lenet_10k", "is_lenet_10k", "kid_lenet_10k", "precision_lenet_10k", "recall_lenet_10k"};
    KID and PR use at most PAIRWISE_MAX samples and say so in their names. is_inception is left out (with a
    notice) when the Inception weights have no classification layer (the offline build).
    `resumable=(chunk_sampler, folder)`: the generated images come from chunk_sampler (see chunked_features) and
    their features are cached in chunks under folder/<extractor and count digest>/, so a rerun continues.
    `stop()` is asked before every extractor batch (real and generated): True ends the evaluation within one batch
    with EvaluationStopped (the training loop's stop signals; chunks cached so far are kept).
    """
    n = cfg.eval.n_samples if n is None else int(n)
    if n <= 0:
        return {}
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise MetricsError(f"unknown metric(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_METRICS)}")
    x_real = real_images(cfg, n)
    if len(x_real) < n:  # more generated images than real ones: the numbers compare unequal sample sizes
        extractors.notice(f"{n} generated images against only {len(x_real)} real ones ({cfg.data.name} "
                          f"{real_split(cfg)}); FID and KID are measured on unequal sets, so set "
                          f"eval.n_samples={len(x_real)} or fewer (or use more real images)")
    name = extractors.resolve(cfg, extractor, channels=x_real.shape[1])
    fe, fe_id = extractors.load(name, cfg, device)
    real = real_statistics(cfg, name, fe, fe_id, x_real, device, progress, stop)

    want_is = "is" in metrics
    if want_is and not extractors.has_classifier(fe):
        want_is = False
        extractors.notice("is_inception skipped: these Inception weights have no classification layer (offline "
                          "build of the FID weights); FID/KID/PR are unaffected")
    feat_layer, is_layer = extractors.layers(fe)
    if resumable is not None:
        chunk_sampler, folder = resumable
        key = hashlib.sha1(f"{fe_id}|{n}|{CHUNK}|{SAMPLE_BLOCK}".encode()).hexdigest()[:16]
        gen = chunked_features(fe, chunk_sampler, n, eval_batch(cfg, device), device, Path(folder) / key, progress,
                               stop=stop)
    else:
        gen = features(fe, sampled_batches(sample_uint8, n, eval_batch(cfg, device)), n, device, "generated", progress,
                       stop=stop)

    out: dict[str, float] = {}
    m_pair = min(n, PAIRWISE_MAX)
    if "fid" in metrics:
        out[metric_key("fid", name, n)] = METRIC_FNS["fid"](gen[feat_layer], real)["fid"]
    if want_is:
        value = METRIC_FNS["is"](gen[is_layer])["is"]
        if np.isfinite(value):
            out[metric_key("is", name, n)] = value
    if "kid" in metrics:
        out[metric_key("kid", name, m_pair)] = METRIC_FNS["kid"](gen[feat_layer], real)["kid"]
    if "pr" in metrics:
        pr = METRIC_FNS["pr"](gen[feat_layer], real)
        out[metric_key("precision", name, m_pair)] = pr["precision"]
        out[metric_key("recall", name, m_pair)] = pr["recall"]
    return {k: float(v) for k, v in out.items()}
