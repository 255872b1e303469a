"""ddim_fast.metrics: the Frechet distance (against scipy), the shipped digit classifier, MSE units."""

import json
import os

import numpy as np
import pytest
import torch

from ddim_fast import metrics

scipy_linalg = pytest.importorskip("scipy.linalg")


def _random_cov(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, rank))
    return a @ a.T / rank


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """FID's reference implementation (pytorch-fid): scipy.linalg.sqrtm of the product."""
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 2, 5, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(d, d + 3, rng), _random_cov(d, d + 5, rng)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9), f"d={d}: ours {ours!r} vs scipy {ref!r}"
    tr = np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(tr, rel=1e-9)


def test_frechet_distance_singular_covariances():
    """Fewer samples than features (rank-deficient covariances): no epsilon needed. The oracle is
    scipy's sqrtm applied to the symmetric form taken from the other side, S2^(1/2) S1 S2^(1/2);
    FID's epsilon on the diagonal moves the result by O(sqrt(eps)) and converges to it."""
    rng = np.random.default_rng(3)
    d = 12
    s1, s2 = _random_cov(d, 4, rng), _random_cov(d, 6, rng)
    mu = np.zeros(d)
    r2 = scipy_linalg.sqrtm(s2).real
    tr = np.trace(scipy_linalg.sqrtm(r2 @ s1 @ r2).real)
    ours = metrics.frechet_distance(mu, s1, mu, s2)
    assert ours == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-7, abs=1e-7)
    gaps = [abs(ours - _scipy_fd(mu, s1 + e * np.eye(d), mu, s2 + e * np.eye(d))) for e in (1e-6, 1e-8, 1e-10)]
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_frechet_distance_of_commuting_gaussians_closed_form():
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    mu, s = feats.mean(0), np.cov(feats, rowvar=False)
    assert metrics.frechet_distance(mu, s, mu, s) < 1e-9 * np.trace(s)
    mu2, s2 = mu + 0.1, s * 1.5
    assert metrics.frechet_distance(mu, s, mu2, s2) == pytest.approx(metrics.frechet_distance(mu2, s2, mu, s), rel=1e-10)
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(mu, s, mu[:3], s[:3, :3])


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return metrics._digits()


def test_frechet_distance_of_images_zero_for_identical_sets_and_grows_with_noise(digits):
    x = digits[0][:400]
    assert metrics.frechet_distance_images(x, x) < 1e-6
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fds = [metrics.frechet_distance_images(x + s * noise, x) for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    assert fds[0] < 1e-6
    assert all(b > a for a, b in zip(fds, fds[1:])), f"FD should grow with the noise level: {fds}"


def test_user_feature_extractor_is_used(digits):
    """A user's callable (numpy out, as an Inception wrapper might return) replaces the classifier."""
    x = digits[0][:200]
    y = x.flip(-1)
    calls = []

    def pooled(imgs):
        calls.append(imgs.shape[0])
        return torch.nn.functional.avg_pool2d(imgs, 4).reshape(imgs.shape[0], -1).numpy()  # 16 features

    fd = metrics.frechet_distance_images(y, x, extractor=pooled)
    fx, fy = pooled(x), pooled(y)
    expected = metrics.frechet_distance(fy.mean(0), np.cov(fy, rowvar=False), fx.mean(0), np.cov(fx, rowvar=False))
    assert fd == pytest.approx(expected, rel=1e-6)
    assert sum(calls) == 2 * 200 + 2 * 200


def test_classifier_reaches_its_stated_accuracy(digits):
    """The shipped weights, on the held-out split recorded next to them."""
    info = metrics.classifier_info()
    x, y = digits
    test_idx = np.asarray(info["split"]["test_indices"])
    train_idx, split_test = metrics.digits_split(len(x), seed=info["split"]["seed"])
    assert np.array_equal(test_idx, split_test) and not set(train_idx) & set(test_idx)
    acc = metrics.classifier_accuracy(x[torch.as_tensor(test_idx)], y[test_idx])
    assert acc >= info["test_accuracy"] - 1.0 / len(test_idx)
    assert info["test_accuracy"] >= 0.98


def test_shipped_reference_statistics_are_the_digits(digits):
    mu, sigma = metrics.reference_statistics()
    mu2, sigma2 = metrics.feature_statistics(digits[0])
    np.testing.assert_allclose(mu, mu2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sigma, sigma2, rtol=1e-4, atol=1e-3)


def test_classifier_asset_is_small_and_has_no_pickle():
    base = os.path.splitext(metrics.CLASSIFIER_PATH)[0]
    assert os.path.getsize(base + ".safetensors") < 300_000
    with open(base + ".json") as f:
        info = json.load(f)
    assert info["weights"].endswith(".safetensors") and info["feature_dim"] == 64


def test_classifier_accepts_uint8_npz_layout_and_other_sizes(digits):
    from ddim_fast.data import to_uint8

    x = digits[0][:32]
    clf = metrics.load_digit_classifier()
    f_float = clf.features(x)
    f_uint8 = clf.features(metrics.as_images(to_uint8(x)))
    assert f_float.shape == (32, 64)
    assert (f_float - f_uint8).abs().max() < 0.05 * f_float.abs().max()
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
    assert clf(small).argmax(1).eq(clf(x).argmax(1)).float().mean() > 0.8
    assert clf(x.repeat(1, 3, 1, 1)).shape == (32, 10)


def test_label_distribution_of_real_digits_covers_every_class(digits):
    x, y = digits
    lab = metrics.label_distribution(x[:500])
    assert lab["n"] == 500 and sum(lab["counts"]) == 500
    assert lab["coverage"] == 10 and lab["tv_uniform"] < 0.1 and lab["entropy_bits"] > 3.2
    ones = x[torch.as_tensor(np.flatnonzero(y == 1)[:50])]
    lab1 = metrics.label_distribution(ones)
    assert lab1["coverage"] == 1 and lab1["tv_uniform"] > 0.85


def test_reconstruction_mse_is_in_unit_interval_units():
    x = torch.zeros(4, 1, 8, 8)
    y = x + 0.2  # 0.2 in [-1, 1] is 0.1 in [0, 1]
    assert metrics.reconstruction_mse(y, x) == pytest.approx(0.01)
    per = metrics.reconstruction_mse(y, x, reduction="none")
    assert per.shape == (4,) and torch.allclose(per, torch.full((4,), 0.01, dtype=torch.float64))
    with pytest.raises(ValueError):
        metrics.reconstruction_mse(x, x[:2])


def test_seconds_per_sample_times_the_sampler():
    class Fake:
        def __init__(self):
            self.shapes = []

        def sample(self, shape, seed):
            self.shapes.append(shape)

    f = Fake()
    s = metrics.seconds_per_sample(f, (8, 1, 4, 4), repeats=2)
    assert s >= 0 and f.shapes == [(1, 1, 4, 4), (8, 1, 4, 4), (8, 1, 4, 4)]
