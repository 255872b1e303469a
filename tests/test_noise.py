"""The counter-based Gaussian of the noise contract (ddim_fast.reference.gaussian): Philox4x32-10
known answers, and the statistics of 2^20 draws.

The Triton kernel draws the same numbers (tests/test_triton_kernel.py checks equality to 1e-6),
so the statistics are measured on the vectorized reference, which is fast on a CPU. Every bound
is 5 standard errors of the statistic for a true N(0, 1) sample of that size; the generator is
deterministic, so a pass is reproducible, and a correct generator fails a bound with
probability ~6e-7 per check, whatever the seed.
"""

import math

import numpy as np
import pytest
import torch

from ddim_fast import reference

SEED = 20210101
B, D = 64, 16384  # 2^20 draws: 64 samples of 16384 elements
N = B * D


@pytest.fixture(scope="module")
def z():
    return reference.gaussian(SEED, (B, D), step=3, stream=reference.STREAM_STEP).double()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().reshape(-1)
    b = b.double().reshape(-1)
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _assert_uncorrelated(a, b, what):
    n = a.numel()
    r = _corr(a, b)
    assert abs(r) < 5 / math.sqrt(n), f"{what}: corr {r:.2e} over {n} pairs exceeds 5/sqrt(n) = {5 / math.sqrt(n):.2e}"


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's kat_vectors for philox4x32_10 (Salmon et al., SC'11)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32(*counter, *key)
    assert tuple(int(w) for w in words) == expected, [f"{int(w):08x}" for w in words]


def test_moments(z):
    """Mean 0, variance 1, skewness 0, kurtosis 3, and the 3-sigma tail mass."""
    x = z.reshape(-1)
    checks = [
        ("mean", x.mean(), 0.0, 1.0),  # (statistic, expected, variance of one term)
        ("variance", (x**2).mean(), 1.0, 2.0),
        ("third moment", (x**3).mean(), 0.0, 15.0),
        ("fourth moment", (x**4).mean(), 3.0, 96.0),
    ]
    p3 = math.erfc(3 / math.sqrt(2))
    checks.append(("P(|z| > 3)", (x.abs() > 3).double().mean(), p3, p3 * (1 - p3)))
    for name, value, expected, var in checks:
        bound = 5 * math.sqrt(var / N)
        assert abs(float(value) - expected) < bound, f"{name}: {float(value):.5f} vs {expected:.5f} (bound {bound:.1e})"
    assert torch.isfinite(x).all()


def test_normality_ks(z):
    """Kolmogorov-Smirnov against N(0, 1) over all 2^20 draws, and over each of the four Philox outputs."""
    stats = pytest.importorskip("scipy.stats")
    x = z.reshape(-1).numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-4
    for lane in range(4):  # z0, z1 (cos, sin of the first pair) and z2, z3 (the second pair)
        p = stats.kstest(x.reshape(-1, 4)[:, lane], "norm").pvalue
        assert p > 1e-4, f"output {lane} of each Philox call: KS p-value {p:.2e}"


@pytest.mark.parametrize("lag", [1, 2, 3, 4])
def test_neighbouring_elements_uncorrelated(z, lag):
    """Elements j and j + lag of a sample, for each position j % 4 inside the Philox call."""
    for lane in range(4):
        a = z[:, lane : D - lag : 4]
        b = z[:, lane + lag :: 4][:, : a.shape[1]]
        _assert_uncorrelated(a, b, f"z[j] vs z[j+{lag}] for j % 4 = {lane}")


def test_box_muller_pairs_independent(z):
    """z0 = r cos(th) and z1 = r sin(th) share r: uncorrelated is not enough, their squares must be too."""
    pairs = z.reshape(-1, 2)
    _assert_uncorrelated(pairs[:, 0] ** 2, pairs[:, 1] ** 2, "z0^2 vs z1^2 of a Box-Muller pair")
    quads = z.reshape(-1, 4)
    _assert_uncorrelated(quads[:, 0] ** 2, quads[:, 2] ** 2, "z0^2 vs z2^2 of a Philox call")


def test_samples_uncorrelated(z):
    _assert_uncorrelated(z[:-1], z[1:], "sample n vs n + 1")


@pytest.mark.parametrize(
    "other",
    [
        dict(seed=SEED, step=4, stream=reference.STREAM_STEP),  # next step
        dict(seed=SEED + 1, step=3, stream=reference.STREAM_STEP),  # next seed
        dict(seed=SEED + 2**32, step=3, stream=reference.STREAM_STEP),  # seed differing in the key's high word
        dict(seed=SEED, step=3, stream=reference.STREAM_X_T),  # x_T stream vs step noise
        dict(seed=SEED, step=3, stream=reference.STREAM_STEP, sample_offset=1),  # next sample, same element
    ],
    ids=["step", "seed", "seed_hi", "stream", "sample"],
)
def test_counters_and_keys_uncorrelated(z, other):
    """Over 2^18 pairs (the first 16 samples), to keep the test file under ~5 s on 2 cores."""
    other = dict(other)
    w = reference.gaussian(other.pop("seed"), (16, D), **other)
    _assert_uncorrelated(z[:16], w, f"draw vs {other}")
    assert not torch.equal(z[:16].float(), w)


def test_pure_function_of_its_counters():
    """A draw depends on (seed, sample, step, element) only: any sub-block reproduces it."""
    full = reference.gaussian(7, (6, 3, 5, 7), step=11, sample_offset=100)
    part = reference.gaussian(7, (2, 3, 5, 7), step=11, sample_offset=103)
    assert torch.equal(full[3:5], part)
    flat = reference.gaussian(7, (6, 105), step=11, sample_offset=100)
    assert torch.equal(full.reshape(6, -1), flat)
    assert torch.equal(reference.gaussian(7, (6, 105), step=11, sample_offset=100), flat)


def test_uniform_and_box_muller_edges():
    """The uniform conversion stays in [0, 1] and the clamp keeps Box-Muller finite at u = 0."""
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = reference.uint32_to_uniform(words)
    assert u.min() >= 0 and u.max() <= 1, u
    assert u[0] == 0 and u[-1] == 0, "~x of the int32 reinterpretation maps 0 and 2^32 - 1 to 0"
    z0, z1 = reference.box_muller(torch.zeros(1), torch.full((1,), 0.25))
    assert torch.isfinite(z0).all() and torch.isfinite(z1).all()
    assert float(torch.hypot(z0, z1)) == pytest.approx(math.sqrt(-2 * math.log(1e-7)), rel=1e-6)
    assert np.isclose(float(z0), 0.0, atol=1e-5)
