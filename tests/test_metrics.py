"""Metrics: Fréchet distance, gancore vs torch-fidelity's own folder path, the real-statistics cache, extractors.

Everything runs on the domain extractor lenet_mnist (trained once per session, 1 epoch, ~20 s on 2 CPU cores);
the one Inception test uses 20 images and only runs where the FID Inception weights file exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, INCEPTION, needs_inception, needs_mnist


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """lenet_mnist trained once for the session into a private cache (1 epoch: ~99 % test accuracy)."""
    from gancore.metrics.classifier import train_classifier

    cache = tmp_path_factory.mktemp("gancore_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANCORE_DATA", str(DATA))
        mp.setenv("GANCORE_CACHE", str(cache))
        with torch.no_grad():  # as where it is trained lazily: class_accuracy's no_grad (trains all the same)
            info = train_classifier("lenet_mnist", epochs=1, progress=False)
    info["cache"] = cache
    return info


@pytest.fixture
def env(trained, tmp_path, monkeypatch) -> Path:
    """A fresh $GANCORE_CACHE holding the session's lenet_mnist (and its decoded MNIST); no Inception weights."""
    cache = tmp_path / "cache"
    (cache / "extractors").mkdir(parents=True)
    shutil.copy(trained["cache"] / "extractors" / "lenet_mnist.pt", cache / "extractors")
    (cache / "npz").symlink_to(trained["cache"] / "npz")  # decoded MNIST arrays: no 1 s re-decode per test
    monkeypatch.setenv("GANCORE_DATA", str(DATA))
    monkeypatch.setenv("GANCORE_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # so eval.extractor=auto means the domain net
    return cache


def _cfg(*overrides: str):
    from gancore.config import load_config

    return load_config(None, ["eval.batch_size=100", *overrides])


def _mnist(split: str) -> torch.Tensor:
    from gancore.config import DataConfig
    from gancore.data import load_images

    return load_images(DataConfig(name="mnist", split=split))[0]


def _sampler(x: torch.Tensor):
    """sample_uint8(b) handing out the rows of x in order (a stand-in generator)."""
    pos = [0]

    def sample(b: int) -> torch.Tensor:
        out = x[pos[0]: pos[0] + b]
        pos[0] += b
        return out

    return sample


# ----------------------------------------------------------------------------------------------------------------


def test_numbers_do_not_depend_on_the_extractor_batch_size(env):
    """A sampler that draws random latents per call (as a generator does) is always asked for the same blocks, so
    eval.batch_size (25 on a CPU, 250 on a GPU by default) changes the speed, not the FID."""
    from gancore.metrics import evaluate
    from gancore.metrics.fidelity import SAMPLE_BLOCK

    test_x = _mnist("test")

    def noisy_digits():  # b -> b test digits picked by a seeded generator, plus noise: draws depend on b
        g = torch.Generator().manual_seed(5)
        calls = []

        def sample(b: int) -> torch.Tensor:
            calls.append(b)
            idx = torch.randint(0, len(test_x), (b,), generator=g)
            noise = torch.randint(-40, 41, test_x[idx].shape, generator=g)
            return (test_x[idx].int() + noise).clamp(0, 255).to(torch.uint8)

        return sample, calls

    out = {}
    for batch in (7, 100, 600):
        sample, calls = noisy_digits()
        out[batch] = evaluate(_cfg(f"eval.batch_size={batch}", "eval.extractor=lenet_mnist"), sample, "cpu", n=600,
                              metrics=("fid", "kid"))
        assert calls == [SAMPLE_BLOCK, SAMPLE_BLOCK, 600 - 2 * SAMPLE_BLOCK]
    assert out[7]["fid_lenet_600"] == pytest.approx(out[100]["fid_lenet_600"], rel=1e-5)
    assert out[600]["fid_lenet_600"] == pytest.approx(out[100]["fid_lenet_600"], rel=1e-5)
    assert out[7]["kid_lenet_600"] == pytest.approx(out[600]["kid_lenet_600"], rel=1e-4)


def test_frechet_distance_closed_form():
    """Gaussians with commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2."""
    from gancore.metrics import frechet_distance

    rng = np.random.default_rng(0)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_count_tags():
    from gancore.metrics import count_tag

    assert [count_tag(n) for n in (10_000, 50_000, 500, 1000, 2500)] == ["10k", "50k", "500", "1k", "2500"]


@needs_mnist
def test_fid_real_vs_real_is_zero(env):
    from gancore.metrics import evaluate

    from recompute import lenet_outputs
    from test_metric_references import is_ref

    x = _mnist("train")[:1000]
    out = evaluate(_cfg(), _sampler(x), torch.device("cpu"), n=1000)
    assert sorted(out) == ["fid_lenet_1k", "is_lenet_1k", "kid_lenet_1k", "precision_lenet_1k", "recall_lenet_1k"]
    assert abs(out["fid_lenet_1k"]) < 1e-6
    assert out["precision_lenet_1k"] == 1.0 and out["recall_lenet_1k"] == 1.0
    # IS by hand on the logits of the same digits (10 seeded splits); real digits: confident, balanced, near 10
    want = is_ref(lenet_outputs(x, env / "extractors" / "lenet_mnist.pt")[1])
    assert out["is_lenet_1k"] == pytest.approx(want, rel=1e-6) and want > 8.0


@needs_mnist
def test_fid_small_for_other_images_of_the_distribution_and_grows_with_a_shift(env):
    """Real statistics: the first 1000 training digits. 1000 *other* digits (the test split) are close; the same
    test digits blurred, noised, or all of one class are far, and the further the stronger the shift."""
    import torch.nn.functional as F

    from gancore.metrics import evaluate
    from recompute import fid_by_hand, lenet_outputs

    weights = env / "extractors" / "lenet_mnist.pt"
    real_features = lenet_outputs(_mnist("train")[:1000], weights)[0]

    def fid(x: torch.Tensor) -> float:
        value = evaluate(_cfg(), _sampler(x), "cpu", n=1000, metrics=("fid",))["fid_lenet_1k"]
        # the same distance from features computed here in one batch (evaluate: batches of 100), no sqrtm
        # (measured: 5e-11 relative)
        assert value == pytest.approx(fid_by_hand(lenet_outputs(x, weights)[0], real_features), rel=1e-6)
        return value

    test = _mnist("test")
    other = test[:1000]
    blurred = F.avg_pool2d(other.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    noised = (other.float() + 80 * torch.randn(other.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    ones = test[_mnist_labels("test") == 1][:1000]
    same_dist = fid(other)
    shifted = {"blurred": fid(blurred), "noised": fid(noised), "only ones": fid(ones)}
    print(f"fid_lenet_1k vs train[:1000]: other test digits {same_dist:.2f}, shifted {shifted}")
    for name, value in shifted.items():  # lenet features: same distribution ~12 (1000-sample bias), shifts >> that
        assert value > 5 * same_dist, (name, value, same_dist)


def _mnist_labels(split: str) -> torch.Tensor:
    from gancore.config import DataConfig
    from gancore.data import load_images

    return load_images(DataConfig(name="mnist", split=split))[1]


@needs_mnist
def test_matches_torch_fidelity_on_png_folders(env, tmp_path):
    """gancore in memory == torch-fidelity reading the same images as PNG folders, same extractor (by name)."""
    import torch_fidelity
    from PIL import Image

    from gancore.metrics import evaluate

    gen, real = _mnist("test")[:500], _mnist("train")[:500]
    for name, x in (("gen", gen), ("real", real)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(x[:, 0].numpy()):
            Image.fromarray(img, mode="L").save(tmp_path / name / f"{i:05d}.png")

    ours = evaluate(_cfg(), _sampler(gen), torch.device("cpu"), n=500, extractor="lenet_mnist")
    ref = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "gen"), input2=str(tmp_path / "real"), feature_extractor="lenet_mnist",
        fid=True, isc=True, kid=True, prc=True, kid_subset_size=500, cuda=False, cache=False,
        save_cpu_ram=True, verbose=False)
    assert ours["fid_lenet_500"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert ours["fid_lenet_500"] > 1.0  # two different sets: a real distance, not a trivial zero
    assert ours["is_lenet_500"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)
    assert ours["kid_lenet_500"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["precision_lenet_500"] == pytest.approx(ref["precision"], abs=1e-9)
    assert ours["recall_lenet_500"] == pytest.approx(ref["recall"], abs=1e-9)


@needs_mnist
def test_real_statistics_cache(env, tmp_path, monkeypatch):
    """Second call loads the file; another subset, class or changed data content gives another key."""
    from gancore.metrics import evaluate, fidelity

    calls = []
    real_features = fidelity._real_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real_features(*args, **kwargs)

    monkeypatch.setattr(fidelity, "_real_features", counting)
    gen = _mnist("test")[:300]
    first = evaluate(_cfg(), _sampler(gen), "cpu", n=300)
    files = sorted((env / "fid_stats").glob("*.npz"))
    assert len(calls) == 1 and [f.name.split("-")[:4] for f in files] == [["mnist", "train", "lenet_mnist", "300"]]
    second = evaluate(_cfg(), _sampler(gen), "cpu", n=300)
    assert len(calls) == 1 and second == first  # a hit: same numbers, nothing recomputed

    fid = ("fid",)  # the cache holds the same statistics for every metric; FID alone keeps the test quick
    evaluate(_cfg("data.subset=200"), _sampler(gen), "cpu", n=300, metrics=fid)  # 200 real images: other content
    evaluate(_cfg("data.normal_class=3"), _sampler(gen), "cpu", n=300, metrics=fid)
    assert len(calls) == 3 and len(list((env / "fid_stats").glob("*.npz"))) == 3

    # same config, same shape, new pixels in the file -> new key (content hash, not config hash)
    npz = tmp_path / "set.npz"
    x = _mnist("train")[:300, 0].numpy()
    np.savez(npz, x=x)
    cfg = _cfg("data.name=npz", f"data.path={npz}")
    evaluate(cfg, _sampler(gen), "cpu", n=300, metrics=fid)
    np.savez(npz, x=255 - x)
    out = evaluate(cfg, _sampler(gen), "cpu", n=300, metrics=fid)
    assert len(calls) == 5 and list(out) == ["fid_lenet_300"]


@needs_mnist
def test_missing_inception_weights_is_one_line(env, tmp_path, monkeypatch):
    from gancore.errors import MetricsError
    from gancore.metrics import evaluate

    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(MetricsError) as e:
        evaluate(_cfg(f"eval.inception_weights={missing}"), _sampler(_mnist("test")), "cpu", n=10,
                 extractor="inception")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "make-fid-inception.sh" in msg

    # no explicit file and no default one: torch-fidelity's download is tried; offline it fails in one line
    import torch_fidelity.feature_extractor_inceptionv3 as fe_inception

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(fe_inception, "load_state_dict_from_url", offline)
    with pytest.raises(MetricsError) as e:
        evaluate(_cfg("eval.extractor=inception"), _sampler(_mnist("test")), "cpu", n=10)
    msg = str(e.value)
    assert "\n" not in msg and "weights-inception-2015-12-05-6726825d.pth" in msg and "make-fid-inception" in msg


@needs_mnist
def test_sampler_must_return_uint8(env):
    from gancore.errors import MetricsError
    from gancore.metrics import evaluate

    with pytest.raises(MetricsError, match="uint8"):
        evaluate(_cfg(), lambda b: torch.zeros(b, 1, 28, 28), "cpu", n=100)


@needs_mnist
def test_domain_classifier_accuracy(trained):
    """The session's lenet_mnist (1 epoch) classifies held-out MNIST digits; reloaded with weights_only=True."""
    from gancore.config import DataConfig
    from gancore.data import load_images
    from gancore.metrics.classifier import DOMAIN, accuracy, build

    assert trained["test_accuracy"] >= 0.97  # all 10k test images
    net = build("lenet_mnist")
    net.load_state_dict(torch.load(trained["path"], map_location="cpu", weights_only=True))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANCORE_DATA", str(DATA))
        mp.setenv("GANCORE_CACHE", str(trained["cache"]))
        x, y = load_images(DataConfig(name="mnist", split="test"))
    assert accuracy(net, x[-2000:], y[-2000:], DOMAIN["lenet_mnist"], "cpu") >= 0.97


@needs_mnist
def test_figures(env, tmp_path):
    from gancore.config import DataConfig
    from gancore.data import load_images
    from gancore.metrics import class_accuracy, tsne_plot

    test_x, test_y = load_images(DataConfig(name="mnist", split="test"))
    png = tsne_plot(_cfg(), _sampler(test_x), "cpu", tmp_path / "tsne.png", n=100)
    assert png.stat().st_size > 5000

    def perfect(y: torch.Tensor) -> torch.Tensor:  # a "conditional generator" that returns real digits of class y
        return torch.stack([test_x[(test_y == c).nonzero()[i, 0]] for i, c in enumerate(y.tolist())])

    acc = class_accuracy(perfect, _cfg(), "cpu", n_per_class=20, path=tmp_path / "acc.png")
    assert len(acc) == 11 and acc["class_acc_lenet_mean"] >= 0.95

    def broken(y: torch.Tensor) -> torch.Tensor:  # ignores its label: every class gets digits of a random class
        g = torch.Generator().manual_seed(0)
        return test_x[torch.randint(0, len(test_x), (len(y),), generator=g)]

    assert class_accuracy(broken, _cfg(), "cpu", n_per_class=20)["class_acc_lenet_mean"] < 0.3  # fails the floor
    assert (tmp_path / "acc.png").stat().st_size > 5000


@needs_mnist
@needs_inception
def test_inception_greyscale_and_is_policy(env, monkeypatch):
    """20 greyscale digits through Inception (repeated to RGB); IS only when the weights carry a classifier; the
    FID written out here from what Inception was given and returned during the evaluation."""
    from gancore.metrics import evaluate
    from gancore.metrics.extractors import has_classifier, load
    from recompute import fid_by_hand

    cfg = _cfg("eval.batch_size=10", f"eval.inception_weights={INCEPTION}")
    fe, _ = load("inception", cfg, "cpu")  # the instance evaluate gets (loaded once per process)
    calls, forward = [], fe.forward

    def recorded(x):
        out = forward(x)
        calls.append((x.clone(), fe.convert_features_tuple_to_dict(out)["2048"].double().numpy()))
        return out

    monkeypatch.setattr(fe, "forward", recorded)
    out = evaluate(cfg, _sampler(_mnist("test")), "cpu", n=20)  # auto -> inception: its file exists
    assert ("is_inception_20" in out) == has_classifier(fe)
    # its inputs: the first 20 test digits (generated) and train digits (real), grey repeated to 3 uint8 channels
    seen = torch.cat([x for x, _ in calls])
    gen_rgb, real_rgb = (_mnist(split)[:20].expand(-1, 3, -1, -1) for split in ("test", "train"))
    is_gen = torch.tensor([any(torch.equal(row, g) for g in gen_rgb) for row in seen])
    assert seen.dtype == torch.uint8 and len(seen) == 40 and int(is_gen.sum()) == 20
    assert torch.equal(seen[is_gen], gen_rgb) and torch.equal(seen[~is_gen], real_rgb)
    features = np.concatenate([f for _, f in calls])
    want = fid_by_hand(features[is_gen.numpy()], features[~is_gen.numpy()])
    # rank-deficient covariances (20 samples, 2048-d): sqrtm's round-off, measured 9e-7 relative
    assert out["fid_inception_20"] == pytest.approx(want, rel=1e-4) and want > 10
