"""Independent references for every metric (issue #25 item 1): gancore's FID, KID, IS and precision/recall against
the formulas of their papers written out here in numpy/scipy (float64), not against torch-fidelity, whose
functions gancore calls.

    FID   |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))                       (Heusel et al. 2017; scipy.linalg.sqrtm)
    KID   unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3                     (Binkowski et al. 2018)
    IS    exp(E_x KL(p(y|x) || p(y))) per split, mean over splits            (Salimans et al. 2016)
    P/R   k-NN balls, k = 3: precision = share of generated features inside some real feature's ball, recall the
          converse                                                           (Kynkaanniemi et al. 2019)

What the references take from gancore's protocol, and nothing else: the KID subsets (100 of min(1000, m, n) each,
drawn by np.random.RandomState(2020), generated before real), the IS splits (10, after a RandomState(2020)
permutation), k = 3. Features are small, seeded and fixed. The last test checks gancore's Inception FID (evaluate's
in-memory path) against torch-fidelity's own command-level path on the same images as PNG folders.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from conftest import INCEPTION, needs_inception, needs_mnist

KID_SUBSETS, KID_SUBSET, SEED, IS_SPLITS, K = 100, 1000, 2020, 10, 3  # the protocol the references follow


# ----------------------------------------------------------------------------------------------------------------
# The references: numpy / scipy only, float64


def fid_ref(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to feature sets x (n, d) and y (m, d); covariances with 1/(n-1)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = (x - mu1).T @ (x - mu1) / (len(x) - 1)
    s2 = (y - mu2).T @ (y - mu2) / (len(y) - 1)
    return fid_ref_stats(mu1, s1, mu2, s2)


def fid_ref_stats(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)  # imaginary round-off only (asserted small by the callers' tolerances)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of sets x (m, d), y (n, d) with the cubic polynomial kernel (x.y/d + 1)^3: the mean of k over
    distinct pairs within x, plus the same within y, minus twice the mean of k over all cross pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid_ref(gen: np.ndarray, real: np.ndarray, subset: int = KID_SUBSET, seed: int = SEED) -> float:
    """KID as gancore's protocol defines it: the mean MMD^2 over 100 subsets of size min(1000, m, n), each drawn
    without replacement, generated first, from one RandomState(2020)."""
    size = min(subset, len(gen), len(real))
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(KID_SUBSETS):
        g = gen[rng.choice(len(gen), size, replace=False)]
        r = real[rng.choice(len(real), size, replace=False)]
        values.append(mmd2_unbiased(g, r))
    return float(np.mean(values))


def is_one_split(logits: np.ndarray) -> float:
    """exp(mean_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits), p(y) = the mean of p(y|x) over this set."""
    z = np.asarray(logits, np.float64)
    log_p = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(log_p)
    p_y = p.mean(0)
    kl = np.sum(p * (log_p - np.log(p_y)), axis=1)
    return float(np.exp(kl.mean()))


def is_ref(logits: np.ndarray) -> float:
    """The mean of is_one_split over 10 splits (rows i*N//10 .. (i+1)*N//10) of a RandomState(2020) permutation."""
    z = np.asarray(logits, np.float64)
    z = z[np.random.RandomState(SEED).permutation(len(z))]
    n = len(z)
    return float(np.mean([is_one_split(z[i * n // IS_SPLITS: (i + 1) * n // IS_SPLITS]) for i in range(IS_SPLITS)]))


def pr_ref(gen: np.ndarray, real: np.ndarray, k: int = K) -> dict[str, tuple[float, float]]:
    """{"precision": (low, high), "recall": (low, high)}. A point's k-NN radius: its distance to the k-th nearest
    *other* point of its own set. precision: the share of gen points within (<=) the radius of some real point;
    recall: the share of real points within the radius of some gen point.
    (low, high): the share when every decision closer to its boundary than float32 can see is counted as out, and
    as in. torch.cdist computes sqrt(|a|^2 + |b|^2 - 2 a.b) in float32 for sets over 25 rows, so a squared distance
    (and a squared radius) may be off by ~eps32 * (|a|^2 + |b|^2); the band is 32 eps32 max|x|^2 on squared
    distances (an 8x allowance). low == high: no decision is in doubt; each doubtful one widens it by 1/n."""
    gen, real = np.asarray(gen, np.float64), np.asarray(real, np.float64)

    def dist2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii2(a):
        d = dist2(a, a)
        np.fill_diagonal(d, np.inf)  # not its own neighbour
        return np.sort(d, axis=1)[:, k - 1]

    band = 32 * np.finfo(np.float32).eps * max((gen ** 2).sum(1).max(), (real ** 2).sum(1).max())
    r_gen, r_real = radii2(gen), radii2(real)
    d_gr = dist2(gen, real)  # (n_gen, n_real)
    return {"precision": tuple(float(np.mean((d_gr <= r_real[None, :] + e).any(1))) for e in (-band, band)),
            "recall": tuple(float(np.mean((d_gr.T <= r_gen[None, :] + e).any(1))) for e in (-band, band))}


def assert_pr(got: dict[str, float], ref: dict[str, tuple[float, float]], n_gen: int, n_real: int) -> None:
    """gancore's precision/recall within the reference's (low, high), at most one decision in doubt in each; 1e-7
    for torch-fidelity averaging the 0/1 decisions in float32 (0.51111114 for 0.51111111)."""
    for key, n in (("precision", n_gen), ("recall", n_real)):
        low, high = ref[key]
        assert high - low <= 1 / n + 1e-12, (key, ref)  # the reference itself decides all but one point
        assert low - 1e-7 <= got[key] <= high + 1e-7, (key, got[key], ref)


def _features(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """n correlated Gaussian features in float32 (what extractors produce), drawn by the seed; the correlation (mix)
    depends on d only, so two seeds with the same shift and scale draw from one distribution."""
    mix = np.eye(d) + 0.3 * np.random.default_rng(d).normal(size=(d, d))
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def _real(x: np.ndarray) -> dict[str, np.ndarray]:
    """gancore's real statistics of features x, as real_statistics builds them (float64 moments, float32 features)."""
    from gancore.metrics.fidelity import statistics

    st = statistics(torch.from_numpy(x))
    return {"mu": st["mu"], "sigma": st["sigma"], "features": x}


# ----------------------------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_equals_scipy_sqrtm_for_non_commuting_covariances():
    """Covariances that do not commute (test_metrics checks only commuting ones): gancore's eigenvalue trace of
    S1 S2 vs scipy's matrix square root, on moments and through the metric's own statistics of features."""
    from gancore.metrics import frechet_distance
    from gancore.metrics.fidelity import METRIC_FNS

    gen, real = _features(1, 300, 12, shift=0.4, scale=1.3), _features(2, 400, 12)
    g64, r64 = gen.astype(np.float64), real.astype(np.float64)
    mu1, s1, mu2, s2 = g64.mean(0), np.cov(g64, rowvar=False), r64.mean(0), np.cov(r64, rowvar=False)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1  # really non-commuting
    expected = fid_ref(gen, real)
    assert expected > 1.0  # a real distance, not a trivial zero
    # float64 on both sides: only eigen-decomposition vs Schur-sqrtm round-off (~1e-13 relative here)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert METRIC_FNS["fid"](torch.from_numpy(gen), _real(real))["fid"] == pytest.approx(expected, rel=1e-9)
    # symmetric, as the definition is
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n, d", [(300, 12), (60, 128)], ids=["n>d", "n<d rank-deficient"])
def test_fid_of_a_set_against_itself_is_zero(n, d):
    """FID(X, X) = 0 within 1e-9 tr(S) for n > d (measured: 1e-15 tr(S)). Rank-deficient (fewer samples than
    dimensions, as 2048-d Inception features of a small set): the d - n zero eigenvalues of S S come back as
    +-1e-16 |S|^2, whose square roots are ~1e-8 |S| each and add up, so within 1e-9 d tr(S) (measured at
    n = 60, d = 128: -4.5e-5 = 2.7e-8 tr(S), the reference -4.6e-5): still far below any FID that means something."""
    from gancore.metrics.fidelity import METRIC_FNS

    x = _features(3, n, d)
    trace = float(np.trace(np.cov(x.astype(np.float64), rowvar=False)))
    value = METRIC_FNS["fid"](torch.from_numpy(x), _real(x))["fid"]
    assert abs(value) <= 1e-9 * trace * (1 if n > d else d), (value, trace)
    assert abs(fid_ref(x, x)) <= 1e-9 * trace * (1 if n > d else d)  # the reference agrees that it is zero
    # and a small shift of the mean alone adds exactly |shift|^2
    shift = np.full(d, 0.1, np.float32)
    value = METRIC_FNS["fid"](torch.from_numpy(x + shift), _real(x))["fid"]
    assert value == pytest.approx(d * 0.01, rel=1e-4, abs=1e-9 * trace * d)  # float32 x + shift: 1e-7 of mean


# ----------------------------------------------------------------------------------------------------------------
# KID


def test_kid_is_the_unbiased_mmd2_of_the_cubic_kernel_on_whole_sets():
    """Equal set sizes <= 1000: every one of gancore's 100 subsets is a permutation of the whole set, and MMD^2 does
    not depend on the order, so KID = MMD^2(gen, real) exactly, with no sampling to reproduce."""
    from gancore.metrics.fidelity import METRIC_FNS

    kid = METRIC_FNS["kid"]
    for shift, seed in ((0.0, 4), (0.25, 5)):
        gen, real = _features(seed, 150, 16, shift=shift), _features(seed + 100, 150, 16)
        expected = mmd2_unbiased(gen, real)
        # float64 features: torch-fidelity's arithmetic is float64 too; only summation order differs
        got64 = kid(torch.from_numpy(gen.astype(np.float64)), _real(real.astype(np.float64)))["kid"]
        assert got64 == pytest.approx(expected, rel=1e-9, abs=1e-12)
        # float32 features (what evaluate passes): torch-fidelity evaluates the kernel in float32; its entries are
        # ~1 (median) to ~15 (95th percentile), so float32's 6e-8 relative rounding in the sums leaves ~1e-7
        # absolute in MMD^2 (measured 1.2e-7 at 300 vs 300; 1.3e-7 in the end-to-end test below)
        got32 = kid(torch.from_numpy(gen), _real(real))["kid"]
        assert got32 == pytest.approx(expected, abs=2e-6)
    assert mmd2_unbiased(gen, real) > 0.05  # the shifted pair: a clear distance


def test_kid_subsets_follow_the_seeded_sampling(monkeypatch):
    """Sets larger than the subset size, of unequal sizes: gancore's KID is the mean over 100 subsets drawn as the
    protocol says, reproduced here with numpy's RandomState(2020), MMD^2 per subset by the reference. The subset
    size is lowered from 1000 to 100 (fidelity.KID_SUBSET) to keep this to a second: 100 subsets of 1000 cost
    ~30 s on two cores; the drawing does not depend on the size."""
    from gancore.metrics import fidelity

    monkeypatch.setattr(fidelity, "KID_SUBSET", 100)
    gen, real = _features(6, 130, 6, shift=0.2), _features(7, 120, 6)
    g64, r64 = gen.astype(np.float64), real.astype(np.float64)
    expected = kid_ref(g64, r64, subset=100)
    got = fidelity.METRIC_FNS["kid"](torch.from_numpy(g64), _real(r64))["kid"]
    assert got == pytest.approx(expected, rel=1e-9)
    # the subsets matter: other subsets (another seed, or the whole sets) give other numbers
    assert abs(mmd2_unbiased(g64, r64) - expected) > 1e-6 * abs(expected)
    assert abs(kid_ref(g64, r64, subset=100, seed=SEED + 1) - expected) > 1e-6 * abs(expected)


# ----------------------------------------------------------------------------------------------------------------
# IS


def test_is_one_split_reference():
    """The reference itself on cases with known answers: identical predictions give 1; N confident predictions
    spread evenly over C classes give C; with q the share of one of 2 confident classes, exp(H(q))."""
    assert is_one_split(np.tile([[2.0, -1.0, 0.5]], (50, 1))) == pytest.approx(1.0, abs=1e-12)
    confident = np.full((40, 10), -50.0)
    confident[np.arange(40), np.arange(40) % 10] = 50.0
    assert is_one_split(confident) == pytest.approx(10.0, rel=1e-9)
    two = np.full((10, 2), -50.0)
    two[:3, 0] = two[3:, 1] = 50.0
    assert is_one_split(two) == pytest.approx(np.exp(-(0.3 * np.log(0.3) + 0.7 * np.log(0.7))), rel=1e-9)


def test_is_equals_the_by_hand_score_of_the_logits():
    """gancore's IS of fixed logits vs the reference: 10 splits of the seeded permutation, one-split formula each."""
    from gancore.metrics.fidelity import METRIC_FNS

    rng = np.random.default_rng(8)
    logits = (3 * rng.normal(size=(500, 10)) + 2 * np.eye(10)[rng.integers(0, 10, 500)]).astype(np.float32)
    expected = is_ref(logits)
    assert METRIC_FNS["is"](torch.from_numpy(logits))["is"] == pytest.approx(expected, rel=1e-9)  # float64 softmax
    # the splits matter (one split over all 500 is larger: p(y) over more samples is flatter), so they were matched
    assert abs(is_one_split(logits) - expected) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall


@pytest.mark.parametrize("shift, scale", [(0.6, 0.6), (0.3, 1.3), (50.0, 1.0)],
                         ids=["narrow gen", "wide gen", "disjoint"])
def test_precision_recall_are_the_k_nn_ball_fractions(shift, scale):
    """gancore's precision/recall vs the reference with k = 3, on unequal set sizes (a swap of the inputs or of
    the two values would show). The same decisions, bar at most one point within float32 reach of its boundary
    (assert_pr)."""
    from gancore.metrics.fidelity import METRIC_FNS

    gen, real = _features(9, 180, 8, shift=shift, scale=scale), _features(10, 240, 8)
    ref = pr_ref(gen, real)
    assert_pr(METRIC_FNS["pr"](torch.from_numpy(gen), _real(real)), ref, len(gen), len(real))
    (precision, _), (recall, _) = ref["precision"], ref["recall"]
    if shift < 10:
        assert 0 < precision < 1 and 0 < recall < 1 and abs(precision - recall) > 0.1, (precision, recall)
    else:
        assert precision == recall == 0.0
    # a narrow generator is precise but misses part of the data; a wide one covers it but strays
    if scale < 1:
        assert precision > recall
    elif shift < 10:
        assert recall > precision


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluate path with an extractor whose outputs are known: all metrics by hand


class _LinearExtractor(torch.nn.Module):
    """A stand-in extractor: fixed random linear maps of the image (pixels / 255, flattened) to 8 features (FID,
    KID, PR) and 10 logits (IS), computed in float64. Declares its layers the way torch-fidelity's classes do."""

    W_FEATURES = np.random.default_rng(11).normal(size=(3 * 28 * 28, 8)) / 28
    W_LOGITS = np.random.default_rng(12).normal(size=(3 * 28 * 28, 10)) / 6

    def __init__(self):
        super().__init__()
        self.calls = 0

    @staticmethod
    def get_requested_features_list():
        return ["features", "logits"]

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def convert_features_tuple_to_dict(feats):
        return dict(zip(["features", "logits"], feats))

    def forward(self, x):
        self.calls += 1
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 28, 28), (x.dtype, x.shape)  # grey repeated to RGB
        flat = x.reshape(len(x), -1).double() / 255
        return flat @ torch.from_numpy(self.W_FEATURES), flat @ torch.from_numpy(self.W_LOGITS)

    @classmethod
    def by_hand(cls, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of uint8 (N, 1, 28, 28) images in numpy, rounded to float32 as gancore stores them."""
        flat = np.repeat(x.numpy(), 3, axis=1).reshape(len(x), -1).astype(np.float64) / 255
        return (flat @ cls.W_FEATURES).astype(np.float32), (flat @ cls.W_LOGITS).astype(np.float32)


@needs_mnist
def test_evaluate_equals_the_references_end_to_end(monkeypatch):
    """gancore's evaluate (sampling, feature extraction, real statistics, the five metric keys) with the linear
    stand-in extractor vs the references on features computed here from the same images: which set is generated
    and which real, the IS layer, the KID subset size and k all have to line up."""
    from gancore.config import DataConfig, load_config
    from gancore.data import load_images
    from gancore.metrics import evaluate, extractors

    fe = _LinearExtractor()
    monkeypatch.setattr(extractors, "load", lambda name, cfg, device: (fe, f"{name}:linear-stand-in"))
    n = 300
    test_x = load_images(DataConfig(name="mnist", split="test"))[0][:n]
    g = torch.Generator().manual_seed(13)
    gen_x = (test_x.int() + torch.randint(-60, 61, test_x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    real_x = load_images(DataConfig(name="mnist", split="train"))[0][:n]  # evaluate's reference: train[:n]

    pos = [0]

    def sample(b: int) -> torch.Tensor:
        pos[0] += b
        return gen_x[pos[0] - b: pos[0]]

    cfg = load_config(None, ["eval.batch_size=64", "eval.extractor=lenet_mnist"])  # a name; load is the stand-in
    out = evaluate(cfg, sample, "cpu", n=n)
    assert fe.calls > 0

    gen_f, gen_logits = _LinearExtractor.by_hand(gen_x)
    real_f, _ = _LinearExtractor.by_hand(real_x)
    pr = pr_ref(gen_f, real_f)
    expected = {"fid_lenet_300": fid_ref(gen_f, real_f), "is_lenet_300": is_ref(gen_logits),
                "kid_lenet_300": mmd2_unbiased(gen_f, real_f),  # 300 vs 300: one subset is the whole set
                "precision_lenet_300": pr["precision"][0], "recall_lenet_300": pr["recall"][0]}
    assert sorted(out) == sorted(expected)
    print({k: (out[k], v) for k, v in expected.items()})
    assert expected["fid_lenet_300"] > 0.01 and expected["kid_lenet_300"] > 0  # noised digits are measurably off
    # features: float64 products rounded to float32 on both sides, but summed in another order (torch vs numpy):
    # ~1e-7 relative per feature, which FID (float64 from there on) keeps
    assert out["fid_lenet_300"] == pytest.approx(expected["fid_lenet_300"], rel=1e-5)
    assert out["is_lenet_300"] == pytest.approx(expected["is_lenet_300"], rel=1e-6)
    assert out["kid_lenet_300"] == pytest.approx(expected["kid_lenet_300"], abs=2e-6)  # float32 kernel (see above)
    assert_pr({"precision": out["precision_lenet_300"], "recall": out["recall_lenet_300"]}, pr, n, n)


# ----------------------------------------------------------------------------------------------------------------
# Inception FID: gancore's in-memory path vs torch-fidelity's own folder path


@needs_mnist
@needs_inception
@pytest.mark.timeout(600)  # 200 Inception forward passes on the CPU: ~25 s on 2 free cores, 2-3 min on busy ones
def test_inception_fid_equals_torch_fidelity_on_png_folders(tmp_path):
    """50 generated (noised test digits) vs 50 real (train[:50]) MNIST images: gancore's evaluate (uint8 grey
    repeated to 3 channels, Inception resizes to 299 itself) vs torch_fidelity.calculate_metrics reading the same
    images as RGB PNG folders, R = G = B = the grey value (exactly what gancore feeds; PIL would make the same of
    grey PNGs). The two paths batch differently, so features agree to float32 round-off, not bit for bit; FID
    from 50 samples in 2048 dimensions (rank-deficient covariances) keeps that well inside 1e-4 relative
    (measured at 100 vs 100: 1.3e-8). Few images keep the test short, and the comparison needs no more: each
    side is the same arithmetic on the same images."""
    import time

    import torch_fidelity
    from PIL import Image

    from gancore.config import DataConfig, load_config
    from gancore.data import load_images
    from gancore.metrics import evaluate

    n = 50
    test_x = load_images(DataConfig(name="mnist", split="test"))[0][:n]
    g = torch.Generator().manual_seed(14)
    gen_x = (test_x.int() + torch.randint(-50, 51, test_x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    real_x = load_images(DataConfig(name="mnist", split="train"))[0][:n]
    for name, x in (("gen", gen_x), ("real", real_x)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()):
            Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(tmp_path / name / f"{i:05d}.png")

    pos = [0]

    def sample(b: int) -> torch.Tensor:
        pos[0] += b
        return gen_x[pos[0] - b: pos[0]]

    cfg = load_config(None, ["eval.batch_size=25", "eval.extractor=inception", f"eval.inception_weights={INCEPTION}"])
    t0 = time.perf_counter()
    ours = evaluate(cfg, sample, "cpu", n=n, metrics=("fid",))["fid_inception_50"]
    t1 = time.perf_counter()
    ref = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "gen"), input2=str(tmp_path / "real"), fid=True,
        feature_extractor_weights_path=str(INCEPTION), batch_size=50, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True)["frechet_inception_distance"]
    print(f"fid_inception_50: gancore {ours} ({t1 - t0:.0f} s), torch-fidelity on PNG folders {ref} "
          f"({time.perf_counter() - t1:.0f} s)")
    assert ours > 10  # noised digits vs other digits: a real distance
    assert ours == pytest.approx(ref, rel=1e-4)
