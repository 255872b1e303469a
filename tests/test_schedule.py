"""Schedules, tau selection and sigma(eta) against diffusers and the original DDIM code's formulas."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ddim_fast import FusedSampler, NoiseSchedule
from ddim_fast import layout, solvers
from ddim_fast.schedule import select_timesteps, sigmas_for_eta


@pytest.mark.parametrize(
    "ours, beta_schedule, kw",
    [
        (NoiseSchedule.linear(1000), "linear", dict(beta_start=1e-4, beta_end=0.02)),
        (NoiseSchedule.scaled_linear(1000), "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        (NoiseSchedule.cosine(1000), "squaredcos_cap_v2", {}),
    ],
    ids=["linear", "scaled_linear", "cosine"],
)
def test_alphas_cumprod_match_diffusers(ours, beta_schedule, kw):
    theirs = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, **kw)
    assert ours.alphas_cumprod.dtype == torch.float64 and ours.T == 1000
    # diffusers builds its betas in float32: agreement is to float32 rounding, accumulated over 1000 products.
    np.testing.assert_allclose(ours.betas.numpy(), theirs.betas.double().numpy(), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), theirs.alphas_cumprod.double().numpy(), rtol=5e-5, atol=1e-7)


def test_linear_schedule_closed_form():
    s = NoiseSchedule.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert s.alphas_cumprod[-1] < 1e-4  # x_T is (almost) pure noise: the prior N(0, I) is right


def test_from_betas_and_alphas_roundtrip():
    s = NoiseSchedule.cosine(200)
    t = NoiseSchedule.from_alphas_cumprod(s.alphas_cumprod)
    np.testing.assert_allclose(t.betas.numpy(), s.betas.numpy(), rtol=1e-10)
    u = NoiseSchedule.from_betas(s.betas.numpy())
    assert torch.equal(u.alphas_cumprod, s.alphas_cumprod)


@pytest.mark.parametrize("betas", [[0.1, 1.2], [0.0, 0.1], [[0.1, 0.2]], []])
def test_bad_betas_rejected(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(np.asarray(betas, dtype=np.float64))


@pytest.mark.parametrize("T, S", [(1000, 50), (1000, 10), (1000, 1000), (1000, 300), (1000, 7), (100, 3)])
def test_uniform_is_original_codes_range(T, S):
    tau = select_timesteps(T, S, "uniform")
    assert tau.tolist() == list(range(0, T, T // S))


@pytest.mark.parametrize("T, S", [(1000, 20), (1000, 50), (1000, 100), (1000, 3)])
def test_uniform_equals_diffusers_leading_when_divisible(T, S):
    sch = DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=0)
    sch.set_timesteps(S)
    if T % S == 0:
        assert select_timesteps(T, S, "uniform")[::-1].tolist() == sch.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("S", [10, 33, 50, 999])
def test_trailing_and_linspace_match_diffusers(spacing, S):
    sch = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    sch.set_timesteps(S)
    assert select_timesteps(1000, S, spacing)[::-1].tolist() == sch.timesteps.tolist()


def test_quad_removes_duplicates():
    T, S = 1000, 100
    raw = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]  # the original code's list
    assert len(set(raw)) < len(raw)  # this S does produce duplicates
    tau = select_timesteps(T, S, "quad")
    assert tau.tolist() == sorted(set(raw))
    sampler = FusedSampler(lambda x, t: x, steps=S, skip="quad")
    assert len(sampler.timesteps) == len(set(raw)) == sampler.num_steps
    assert sampler.timesteps.tolist() == sorted(set(raw), reverse=True)


def test_timesteps_property_descending_int64():
    sampler = FusedSampler(lambda x, t: x, steps=10, skip=[3, 10, 500, 999])
    ts = sampler.timesteps
    assert ts.dtype == torch.int64 and ts.tolist() == [999, 500, 10, 3]


@pytest.mark.parametrize(
    "steps, skip, match",
    [
        (0, "uniform", "steps"),
        (1001, "uniform", "steps"),
        (2.5, "uniform", "steps"),
        (10, "cubic", "skip"),
        (10, [5, 3, 7], "strictly increasing"),
        (10, [1, 1, 2], "strictly increasing"),
        (10, [0, 1000], r"\[0, T=1000\)"),
        (10, [-1, 5], r"\[0, T=1000\)"),
        (10, [0.5, 1.5], "integers"),
    ],
)
def test_bad_tau_rejected(steps, skip, match):
    with pytest.raises(ValueError, match=match):
        select_timesteps(1000, steps, skip)


def test_sigma_eta_matches_diffusers_variance():
    s = NoiseSchedule.linear(1000)
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
    sch.set_timesteps(50)
    tau = select_timesteps(1000, 50, "uniform")
    table = solvers.ddim(s, tau, eta=0.7).table
    for k, t in enumerate(sch.timesteps.tolist()):
        prev = t - 1000 // 50
        expected = 0.7 * float(sch._get_variance(t, prev)) ** 0.5
        assert table[k, layout.SIGMA].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_table_rows_are_eq12_coefficients():
    s = NoiseSchedule.linear(1000)
    tau = np.array([0, 250, 500, 999])
    tab = solvers.ddim(s, tau, eta=1.0).table
    a = s.alphas_cumprod
    cols = [layout.SQRT_ALPHA, layout.SQRT_ONE_MINUS_ALPHA, layout.C_X0, layout.C_EPS, layout.SIGMA]
    # row 0: t = 999 -> prev = 500
    at, ap = a[999], a[500]
    sigma = ((1 - ap) / (1 - at) * (1 - at / ap)).sqrt()
    expected = torch.stack([at.sqrt(), (1 - at).sqrt(), ap.sqrt(), (1 - ap - sigma**2).sqrt(), sigma])
    assert torch.allclose(tab[0, cols], expected, rtol=1e-12)
    others = [c for c in range(layout.NUM_COLUMNS) if c not in cols]
    assert (tab[:, others] == 0).all()  # DDIM reads x_t only through the model: no c_x, ring or saved state
    # last row lands on alpha := 1 with no noise: it returns the x0-prediction
    assert tab[-1, layout.C_X0] == 1.0 and tab[-1, layout.C_EPS] == 0.0 and tab[-1, layout.SIGMA] == 0.0
    # eta = 1 with consecutive timesteps is DDPM's posterior variance beta_tilde
    full = solvers.ddim(s, np.arange(1000), eta=1.0).table
    beta_tilde = (1 - a[:-1]) / (1 - a[1:]) * s.betas[1:]
    assert torch.allclose(full[:-1, layout.SIGMA].flip(0) ** 2, beta_tilde, rtol=1e-10)


def test_ddpm_large_sigma_hat_and_posterior_mean():
    s = NoiseSchedule.linear(1000)
    a = s.alphas_cumprod
    sig_dir, sig_noise = sigmas_for_eta(a[10:], a[:-10], "ddpm_large")
    assert torch.allclose(sig_noise**2, 1 - a[10:] / a[:-10])  # the paper's sigma-hat
    assert torch.allclose(sig_dir, sigmas_for_eta(a[10:], a[:-10], 1.0)[0])  # mean of DDPM (eta = 1)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), "ddim", None, True])
def test_bad_eta_rejected(eta):
    with pytest.raises(ValueError, match="eta"):
        FusedSampler(lambda x, t: x, steps=10, eta=eta)


def test_eta_above_one_rejected_where_eq12_breaks():
    with pytest.raises(ValueError, match="eta"):
        FusedSampler(lambda x, t: x, steps=10, eta=3.0)


def test_inverse_table_starts_from_data():
    s = NoiseSchedule.linear(1000)
    tau = np.array([0, 100, 999])
    inv = solvers.ddim_inversion(s, tau).table
    assert inv[0, layout.SQRT_ALPHA] == 1.0 and inv[0, layout.SQRT_ONE_MINUS_ALPHA] == 0.0  # starts at alpha = 1: the data
    assert torch.allclose(inv[1:, layout.SQRT_ALPHA] ** 2, s.alphas_cumprod[tau[:-1]])
    assert torch.allclose(inv[:, layout.C_X0] ** 2, s.alphas_cumprod[tau])
    assert torch.allclose(inv[:, layout.C_EPS] ** 2, 1 - s.alphas_cumprod[tau])
    assert (inv[:, layout.SIGMA] == 0).all()
