"""Solvers as tables (ddim_fast.solvers): every builder against an independent float64
implementation or diffusers' own loop, convergence orders on closed-form models, spacings.

The tables run through ``ddim_fast.reference.fused_step`` in float64 (the oracle of every
backend, so no float32 rounding floor), and through the sampler where the public API is the
point (diffusers' UniPC to float32 rounding, every backend giving the same samples).
"""

import math

import numpy as np
import pytest
import torch

from _utils import assert_close
from ddim_fast import FusedSampler, NoiseSchedule, layout, solvers
from ddim_fast.reference import GaussianMixtureEps, fused_step

DIFFUSERS_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
NEW_SOLVERS = ("ipndm", "ipndm_v", "unipc", "unipc_3", "dpmpp_2m_sde")
DETERMINISTIC = tuple(s for s in solvers.SOLVERS if s != "dpmpp_2m_sde")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Every tensor here is tiny; on the shared 2-core machine a (128, 3) float64 softmax takes
    10 us on one thread and 12-20 ms on two (OpenMP waits for a busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture(alphas_cumprod, D, K=3, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64) * scale
    return GaussianMixtureEps(alphas_cumprod, means, stds=torch.tensor([0.3, 0.45, 0.35])[:K])


def run_table(st, model, x_T, tau, noise=None, prediction=0):
    """The trajectory of a SolverTable from x_T along tau in float64 (ring and saved state as the sampler keeps them)."""
    x = x_T.double().clone()
    R = st.history_slots
    history = torch.full((R, *x.shape), float("nan"), dtype=torch.float64) if R else None  # unread slots may hold NaN
    saved = torch.full_like(x, float("nan")) if st.uses_saved else None
    for k, t in enumerate(np.asarray(tau)[::-1].tolist()):
        m = model(x, torch.full((x.shape[0],), int(t))).double()
        out = torch.empty_like(x)
        z = None if noise is None else noise[k].double()
        fused_step(x, m, st.table, k, torch.tensor([0, 0]), prediction, 0.0, st.history_kind, history, saved, z, out, None,
                   None, compute_dtype=torch.float64)  # fmt: skip
        x = out
    return x


# --------------------------------------------------------------------------------------------
# tables: structure shared by every solver
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", solvers.SOLVERS)
@pytest.mark.parametrize("skip", ["uniform", "quad", "logsnr", "karras"])
@pytest.mark.parametrize("S", [1, 2, 5, 10, 50])
def test_tables_are_finite_and_end_on_the_x0_prediction(solver, skip, S):
    sched = NoiseSchedule.linear(1000)
    tau = solvers.timesteps(sched, S, skip)
    eta = 1.0 if solver == "dpmpp_2m_sde" else 0.0
    st = solvers.build(solver, sched, tau, eta)
    st.check()
    assert st.table.shape == (len(tau), layout.NUM_COLUMNS) and st.table.dtype == torch.float64
    if solver not in ("ipndm", "ipndm_v") or S == 1:  # iPNDM keeps its full order on the last step
        last = st.table[-1]
        assert last[[layout.C_SAVED, layout.SIGMA]].abs().sum() == 0 and last[layout.C_H : layout.C_H + 3].abs().sum() == 0
        x, eps = torch.randn(2, 9, dtype=torch.float64)
        x0 = (x - last[layout.SQRT_ONE_MINUS_ALPHA] * eps) / last[layout.SQRT_ALPHA]
        got = last[layout.C_X] * x + last[layout.C_X0] * x0 + last[layout.C_EPS] * eps
        assert_close(got, x0, atol=1e-9 * x0.abs().max().item(), what=f"{solver} last step")


@pytest.mark.parametrize("solver", DETERMINISTIC + ("dpmpp_2m_sde",))
def test_every_solver_is_exact_on_a_point_mass(solver):
    """Data = one point c: eps(x, t) = (x - sqrt(a) c) / sqrt(1 - a) and the ODE keeps x0 = c and
    eps constant, so every consistent solver (any order, any step sizes) lands exactly on c."""
    sched = NoiseSchedule.cosine(1000)
    c = torch.tensor([[0.7, -1.2, 0.1]], dtype=torch.float64)
    a = sched.alphas_cumprod

    def model(x, t):
        at = a[t][:, None]
        return (x - at.sqrt() * c) / (1 - at).sqrt()

    x_T = torch.randn(5, 3, dtype=torch.float64)
    for skip in ("quad", "karras", [3, 17, 40, 41, 300, 998]):
        tau = solvers.timesteps(sched, 6, skip)
        st = solvers.build(solver, sched, tau, 0.0)
        assert_close(run_table(st, model, x_T, tau), c.expand(5, 3), atol=1e-9, what=f"{solver} {skip}")


def test_solver_tables_declare_their_state():
    sched = NoiseSchedule.linear(1000)
    tau = solvers.timesteps(sched, 10, "logsnr")
    for solver, kind, slots, saved in [
        ("ddim", "x0", 0, False), ("dpmpp_2m", "x0", 1, False), ("dpmpp_3m", "x0", 2, False),
        ("ipndm", "eps", 3, False), ("ipndm_v", "eps", 3, False), ("unipc", "x0", 2, True), ("unipc_3", "x0", 3, True),
        ("dpmpp_2m_sde", "x0", 1, False),
    ]:  # fmt: skip
        st = solvers.build(solver, sched, tau, 1.0 if solver == "dpmpp_2m_sde" else 0.0)
        assert (st.history_kind, st.history_slots, st.uses_saved) == (layout.HISTORY_KINDS[kind], slots, saved), solver
    sde = solvers.build("dpmpp_2m_sde", sched, tau, 1.0)
    assert sde.stochastic == (True,) * 9 + (False,)  # the last step lands on alpha = 1 without noise
    assert not any(solvers.build("unipc", sched, tau).stochastic)


def test_first_order_rows_are_the_ddim_step():
    """iPNDM and UniPC at order 1 without corrector history are DDIM (eta = 0): same x_next from the same (x, eps)."""
    sched = NoiseSchedule.linear(1000)
    tau = solvers.timesteps(sched, 10, "quad")
    ddim = solvers.ddim(sched, tau).table
    x, eps = torch.randn(2, 7, dtype=torch.float64)
    for st in (solvers.ipndm(sched, tau, 1), solvers.ipndm(sched, tau, 1, variable=True)):
        for k in range(len(tau)):
            row, ref = st.table[k], ddim[k]
            x0 = (x - ref[layout.SQRT_ONE_MINUS_ALPHA] * eps) / ref[layout.SQRT_ALPHA]
            got = row[layout.C_X] * x + row[layout.C_EPS] * eps
            assert_close(got, ref[layout.C_X0] * x0 + ref[layout.C_EPS] * eps, atol=1e-10, what=f"row {k}")
    unipc0 = solvers.unipc(sched, tau, 2).table[0]  # step 0: first-order predictor, no corrector
    x_next = unipc0[layout.C_X] * x + unipc0[layout.C_X0] * (x - ddim[0, 1] * eps) / ddim[0, 0]
    x0 = (x - ddim[0, 1] * eps) / ddim[0, 0]
    assert_close(x_next, ddim[0, layout.C_X0] * x0 + ddim[0, layout.C_EPS] * eps, atol=1e-10, what="unipc row 0")


def test_builders_reject_bad_arguments():
    sched = NoiseSchedule.linear(100)
    tau = np.arange(0, 100, 10)
    with pytest.raises(ValueError, match="solver: expected one of"):
        solvers.build("heun", sched, tau)
    for solver in ("ipndm", "unipc", "unipc_3"):
        with pytest.raises(ValueError, match="eta: the solver"):
            solvers.build(solver, sched, tau, 0.5)
    with pytest.raises(ValueError, match="eta: dpmpp_2m_sde takes a float"):
        solvers.build("dpmpp_2m_sde", sched, tau, "ddpm_large")
    with pytest.raises(ValueError, match="order: expected 1, 2, 3 or 4"):
        solvers.ipndm(sched, tau, 5)
    with pytest.raises(ValueError, match="order: expected 1, 2 or 3"):
        solvers.unipc(sched, tau, 4)
    for solver in ("ipndm", "unipc", "dpmpp_2m_sde"):
        with pytest.raises(ValueError, match="tau: expected strictly increasing timesteps with distinct alphas"):
            solvers.build(solver, sched, [10, 60, 50], 1.0 if solver == "dpmpp_2m_sde" else 0.0)


# --------------------------------------------------------------------------------------------
# independent float64 implementations, written from the papers
# --------------------------------------------------------------------------------------------


def _ab_weights_by_moments(u):
    """Adams-Bashforth weights by the moment conditions sum_j w_j u_j^m = 1 / (m + 1), m < p
    (exact integration over [0, 1] of every polynomial of degree < p through the nodes u_j)."""
    u = np.asarray(u, dtype=np.float64)
    V = np.vander(u, len(u), increasing=True).T
    return np.linalg.solve(V, 1.0 / np.arange(1, len(u) + 1))


def _ipndm_paper(model, sched, tau, x_T, order=4, variable=False):
    """Zhang & Chen (DEIS, 2023) iPNDM on the DDIM ODE in (xbar, sigmabar) = (x / sqrt(a), sqrt((1 - a) / a))."""
    a = sched.alphas_cumprod
    t_desc = list(np.asarray(tau)[::-1])
    sig = [math.sqrt((1 - a[t].item()) / a[t].item()) for t in t_desc] + [0.0]
    fixed = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -4 / 3, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -3 / 8]}
    xbar = x_T.double() / a[t_desc[0]].sqrt()
    eps_hist = []
    for k, t in enumerate(t_desc):
        x = xbar * a[t].sqrt()
        eps_hist.insert(0, model(x, torch.full((x.shape[0],), int(t))).double())
        p = min(order, k + 1)
        h = sig[k + 1] - sig[k]
        w = _ab_weights_by_moments([(sig[k - j] - sig[k]) / h for j in range(p)]) if variable else fixed[p]
        xbar = xbar + h * sum(wj * e for wj, e in zip(w, eps_hist))
    return xbar  # alpha = 1 at the end: x = xbar


@pytest.mark.parametrize("variable", [False, True], ids=["fixed", "variable"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("skip", ["quad", "karras"])
def test_ipndm_matches_the_paper(order, variable, skip):
    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=6)
    x_T = torch.randn(16, 6, dtype=torch.float64)
    tau = solvers.timesteps(sched, 8, skip)
    ours = run_table(solvers.ipndm(sched, tau, order, variable), model, x_T, tau)
    assert_close(ours, _ipndm_paper(model, sched, tau, x_T, order, variable), atol=1e-10, what=f"iPNDM order {order}")


def test_ipndm_fixed_and_variable_agree_on_equal_sigmabar_steps():
    sbar = np.linspace(0.05, 20.0, 61)
    sched = NoiseSchedule.from_alphas_cumprod(1 / (1 + sbar**2))
    tau = np.arange(0, 61, 6)
    fixed, variable = solvers.ipndm(sched, tau, 4).table, solvers.ipndm(sched, tau, 4, variable=True).table
    assert_close(fixed[:-1], variable[:-1], atol=1e-10, rtol=1e-12)  # the last step, 0.05 -> 0, is the only short one


def _unipc_paper(model, sched, tau, x_T, order):
    """UniPC (Zhao et al. 2023): UniP-p with UniC-p in data prediction, B(h) = e^{-h} - 1 (bh2),
    the predictor's order min(order, k + 1, S - k), the corrector after every step but the last."""
    a = sched.alphas_cumprod
    t_desc = list(np.asarray(tau)[::-1])
    S = len(t_desc)
    alpha = [a[t].sqrt().item() for t in t_desc] + [1.0]
    sigma = [(1 - a[t]).sqrt().item() for t in t_desc] + [0.0]
    lam = [math.log(alpha[i] / sigma[i]) for i in range(S)] + [math.inf]

    def phi_rhs(h, p):  # b_m = m! phi_{m+1}(-h) (-h) / B(h), m = 1..p, through phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
        z = -h
        phi = [math.expm1(z) / z]  # phi_1
        for m in range(1, p + 1):
            phi.append((phi[-1] - 1 / math.factorial(m)) / z)
        return np.array([math.factorial(m) * phi[m] * z / math.expm1(z) for m in range(1, p + 1)])

    def update(x_s, s, x0s, p, x0_new=None):
        """One UniP (x0_new None) or UniC step from node s to s + 1; x0s[i] = x0 at node s - i."""
        h = lam[s + 1] - lam[s]
        out = sigma[s + 1] / sigma[s] * x_s - alpha[s + 1] * math.expm1(-h) * x0s[0]
        r = [(lam[s - i] - lam[s]) / h for i in range(1, p)]
        D = [(x0s[i] - x0s[0]) / r[i - 1] for i in range(1, p)]
        if x0_new is None:
            if p == 1:
                return out
            rho = [0.5] if p == 2 else np.linalg.solve(np.array([[ri**m for ri in r] for m in range(p - 1)]), phi_rhs(h, p)[:-1])
        else:
            r, D = r + [1.0], D + [x0_new - x0s[0]]
            rho = [0.5] if p == 1 else np.linalg.solve(np.array([[ri**m for ri in r] for m in range(p)]), phi_rhs(h, p))
        return out - alpha[s + 1] * math.expm1(-h) * sum(rr * d for rr, d in zip(rho, D))

    x, x0s, prev = x_T.double(), [], None
    for k, t in enumerate(t_desc):
        eps = model(x, torch.full((x.shape[0],), int(t))).double()
        x0 = (x - sigma[k] * eps) / alpha[k]
        if prev is not None:  # correct x_k with the model at the predicted x_k
            x = update(prev[0], k - 1, x0s, prev[1], x0_new=x0)
        x0s.insert(0, x0)
        p = min(order, k + 1, S - k)
        prev = (x, p)
        x = update(x, k, x0s, p)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("S", [1, 2, 3, 6, 10])
def test_unipc_matches_the_paper(order, S):
    sched = NoiseSchedule.cosine(1000)
    model = _mixture(sched.alphas_cumprod, D=5)
    x_T = torch.randn(16, 5, dtype=torch.float64)
    tau = solvers.timesteps(sched, S, "logsnr")
    ours = run_table(solvers.unipc(sched, tau, order), model, x_T, tau)
    assert_close(ours, _unipc_paper(model, sched, tau, x_T, order), atol=1e-10, what=f"UniPC order {order}, S={S}")


def test_dpmpp_2m_sde_matches_the_paper_and_is_2m_at_eta_0():
    """Lu et al. (2022) SDE-DPM-Solver++(2M) in (alpha, sigma, lambda), with k-diffusion's eta."""
    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=4)
    tau = solvers.timesteps(sched, 7, "logsnr")
    assert torch.equal(solvers.build("dpmpp_2m_sde", sched, tau, 0.0).table, solvers.build("dpmpp_2m", sched, tau).table)
    x_T = torch.randn(16, 4, dtype=torch.float64)
    noise = torch.randn(7, 16, 4, dtype=torch.float64)
    a = sched.alphas_cumprod
    t_desc = list(tau[::-1])
    alpha = [a[t].sqrt().item() for t in t_desc] + [1.0]
    sigma = [(1 - a[t]).sqrt().item() for t in t_desc] + [0.0]
    lam = [math.log(alpha[i] / sigma[i]) for i in range(7)] + [math.inf]
    for eta in (0.5, 1.0):
        x, old = x_T.clone(), None
        for k, t in enumerate(t_desc):
            x0 = (x - sigma[k] * model(x, torch.full((16,), int(t)))) / alpha[k]
            h = lam[k + 1] - lam[k]
            second = old is not None and k < 6
            D = x0 + 0.5 * (lam[k + 1] - lam[k]) / (lam[k] - lam[k - 1]) * (x0 - old) if second else x0
            decay = math.exp(-eta * h) if k < 6 else 0.0
            x = sigma[k + 1] / sigma[k] * decay * x + alpha[k + 1] * (1 - math.exp(-(1 + eta) * h)) * D
            x = x + sigma[k + 1] * math.sqrt(1 - math.exp(-2 * eta * h)) * noise[k]
            old = x0
        ours = run_table(solvers.build("dpmpp_2m_sde", sched, tau, eta), model, x_T, tau, noise=noise)
        assert_close(ours, x, atol=1e-10, what=f"eta={eta}")


# --------------------------------------------------------------------------------------------
# diffusers' own loops on the same timesteps and the same closed-form model
# --------------------------------------------------------------------------------------------


def _diffusers_problem(scheduler, S, prediction):
    """(schedule, model, x_T) for comparing with ``scheduler`` at S steps: the closed-form mixture
    of its schedule, as an epsilon or v model."""
    scheduler.set_timesteps(S)
    schedule = NoiseSchedule.from_diffusers(scheduler)
    eps_model = _mixture(schedule.alphas_cumprod, D=3 * 4 * 4)
    model = eps_model if prediction == "epsilon" else _v_model(eps_model, schedule.alphas_cumprod)
    return schedule, model, torch.randn(4, 3, 4, 4)


def _diffusers_loop(scheduler, model, x_T, noise=None):
    x = x_T.clone()
    for k, t in enumerate(scheduler.timesteps):
        kw = {} if noise is None else {"variance_noise": noise[k]}
        x = scheduler.step(model(x, t.expand(x.shape[0])).float(), t, x, **kw).prev_sample
    return x


def _v_model(eps_model, alphas_cumprod):
    a = alphas_cumprod.float()

    def model(x, t):  # v = sqrt(a) eps - sqrt(1 - a) x0
        eps = eps_model(x, t)
        at = a[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (at.sqrt() * eps - (1 - at).sqrt() * (x - (1 - at).sqrt() * eps) / at.sqrt()).float()

    return model


@DIFFUSERS_WARNINGS
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("order, S, spacing", [(1, 10, "linspace"), (2, 5, "linspace"), (2, 10, "trailing"), (2, 25, "trailing"),
                                               (3, 6, "linspace"), (3, 10, "trailing")])  # fmt: skip
def test_unipc_matches_diffusers(order, S, spacing, prediction):
    """UniPCMultistepScheduler(bh2, predict_x0, lower_order_final, disable_corrector=[]) on its own
    timesteps, through the public sampler in float32, to float32 rounding. (Not with
    use_karras_sigmas: diffusers then calls the model at rounded timesteps but steps with the
    unrounded Karras sigmas, 2.7e-3 apart here; ours are the schedule's values at the timesteps
    the model sees. The timesteps themselves agree: test_karras_timesteps_match_diffusers.)"""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", solver_order=order,
        solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
        prediction_type="epsilon" if prediction == "epsilon" else "v_prediction", timestep_spacing=spacing,
    )  # fmt: skip
    schedule, model, x_T = _diffusers_problem(scheduler, S, prediction)
    expected = _diffusers_loop(scheduler, model, x_T)
    solver = {1: None, 2: "unipc", 3: "unipc_3"}[order]
    tau = np.sort(scheduler.timesteps.numpy())
    if solver is None:  # order 1 has no registered name: its table through the float64 oracle
        ours = run_table(solvers.unipc(schedule, tau, 1), model, x_T, tau, prediction=layout.PREDICTIONS[prediction])
    else:
        sampler = FusedSampler(model, schedule, steps=S, skip=tau, solver=solver,
                               prediction=prediction, precision="fp32", backend="torch")  # fmt: skip
        assert torch.equal(sampler.timesteps, scheduler.timesteps)
        ours = sampler.sample(x_T)
    # The first row's x0 = (x - sqrt(1 - a) eps) / sqrt(a) at sqrt(a) = 0.0064 amplifies float32 rounding ~150x.
    assert_close(ours, expected, atol=2e-6 * expected.abs().max().item(), what=f"unipc order {order} ({prediction}) vs diffusers")


@DIFFUSERS_WARNINGS
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("solver, S", [("dpmpp_2m", 10), ("dpmpp_2m", 25), ("dpmpp_3m", 10), ("dpmpp_3m", 20),
                                       ("dpmpp_2m_sde", 6), ("dpmpp_2m_sde", 20)])  # fmt: skip
def test_dpm_solver_matches_diffusers(solver, S, prediction):
    """DPMSolverMultistepScheduler(dpmsolver++ or sde-dpmsolver++, midpoint, lower_order_final,
    final_sigmas_type="zero") on its own timesteps and the same noise, to float32 rounding."""
    diffusers = pytest.importorskip("diffusers")
    sde = solver == "dpmpp_2m_sde"
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_order=3 if solver == "dpmpp_3m" else 2,
        solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True,
        prediction_type="epsilon" if prediction == "epsilon" else "v_prediction",
    )  # fmt: skip
    schedule, model, x_T = _diffusers_problem(scheduler, S, prediction)
    noise = torch.randn(S, 4, 3, 4, 4) if sde else None
    expected = _diffusers_loop(scheduler, model, x_T, noise)
    sampler = FusedSampler(model, schedule, skip=np.sort(scheduler.timesteps.numpy()), solver=solver, eta=1.0 if sde else 0.0,
                           prediction=prediction, precision="fp32", backend="torch")  # fmt: skip
    ours = sampler.sample(x_T, noise=noise)
    assert_close(ours, expected, atol=2e-6 * expected.abs().max().item(), what=f"{solver} ({prediction}) vs diffusers")


# --------------------------------------------------------------------------------------------
# convergence orders on closed-form models
# --------------------------------------------------------------------------------------------


def _exact_ode_solution(means, stds, x_T, lam_start, lam_end, n=400):
    """The probability-flow ODE from log-SNR lam_start to lam_end, then the x0-prediction there, in float64.

    Data-prediction form (DPM-Solver++, Eq. 8): with y = x / sigma, dy/dlambda = e^lambda x0(x, lambda),
    classic RK4 on n uniform steps (n = 400 vs 4000 differ by < 1e-6; the smallest error measured
    below is 3e-5). The mixture's exact model is evaluated at the RK4 stage log-SNRs."""
    lam = torch.linspace(lam_start, lam_end, 2 * n + 1, dtype=torch.float64)
    a = torch.sigmoid(2.0 * lam)
    model = GaussianMixtureEps(a, means, stds)
    sig = (1.0 - a).sqrt()

    def f(y, j):
        x = sig[j] * y
        eps = model(x, torch.full((x.shape[0],), j, dtype=torch.int64))
        return lam[j].exp() * (x - sig[j] * eps) / a[j].sqrt()

    h = (lam_end - lam_start) / n
    y = x_T.double() / sig[0]
    for i in range(n):
        k1 = f(y, 2 * i)
        k2 = f(y + h / 2 * k1, 2 * i + 1)
        k3 = f(y + h / 2 * k2, 2 * i + 1)
        k4 = f(y + h * k3, 2 * i + 2)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    x = sig[-1] * y
    eps = model(x, torch.full((x.shape[0],), 2 * n, dtype=torch.int64))
    return (x - sig[-1] * eps) / a[-1].sqrt()


def _rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def uniform_logsnr_problem():
    """A schedule uniform in log-SNR on [-9, 9] (241 timesteps), a 2-D mixture, and the exact solution."""
    lam = np.linspace(9.0, -9.0, 241)
    schedule = NoiseSchedule.from_alphas_cumprod(1 / (1 + np.exp(-2 * lam)))
    model = _mixture(schedule.alphas_cumprod, D=2, seed=1)
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = _exact_ode_solution(model.means, model.stds, x_T, -9.0, 9.0)
    return schedule, model, x_T, exact


def _errors(problem, solver, steps):
    schedule, model, x_T, exact = problem
    out = []
    for S in steps:
        tau = np.arange(0, 241, 240 // (S - 1))  # uniform in log-SNR from -9 to 9, both ends
        out.append(_rms(run_table(solvers.build(solver, schedule, tau), model, x_T, tau), exact))
    return out


@pytest.mark.parametrize(
    "solver, steps, order_range",
    [
        ("ddim", (21, 41, 81), (0.85, 1.15)),
        ("dpmpp_2m", (21, 41, 81), (1.7, 2.25)),
        # 3M: third order until its first-order warm-up step (local error O(h^2), as in diffusers)
        # dominates: measured 2.9, 2.8, 2.3 per halving from S = 11 to 81.
        ("dpmpp_3m", (11, 21, 41), (2.6, 3.2)),
        # UniPC: the corrector raises the predictor's order by one; measured 2.6, 2.9 (order 2) and
        # 4.1, 4.3 (order 3) per halving.
        ("unipc", (21, 41, 81), (2.5, 3.3)),
        ("unipc_3", (11, 21, 41), (3.7, 4.7)),
        # iPNDM: Adams-Bashforth 4 after Euler, AB2, AB3 warm-up steps; on a log-SNR grid the
        # sigmabar steps shrink geometrically, so fixed weights are second order (measured 2.0, 2.1)
        # and variable-step weights reach 2.4, 3.1 before the warm-up's O(h^2) takes over.
        ("ipndm", (21, 41, 81), (1.8, 2.4)),
        ("ipndm_v", (21, 41, 81), (2.4, 3.2)),
    ],
)
def test_convergence_order_on_a_gaussian_mixture(uniform_logsnr_problem, solver, steps, order_range):
    """Error vs the exact ODE solution falls as h^order when the log-SNR step h halves."""
    errors = _errors(uniform_logsnr_problem, solver, steps)
    order = math.log2(errors[0] / errors[-1]) / (len(steps) - 1)
    assert order_range[0] <= order <= order_range[1], f"{solver}: errors {errors} give order {order:.2f}"


@pytest.mark.parametrize("variable, uneven, expected_order", [(False, False, 5), (True, False, 5), (True, True, 5), (False, True, 2)])
def test_ipndm_local_order_on_a_gaussian(variable, uneven, expected_order):
    """One full-order (AB4) step from the exact solution and exact eps history, on data N(mu, s^2):
    xbar - mu = A sqrt(s^2 + sigmabar^2) exactly. Local error h^5 on equal sigmabar steps and, for
    variable-step weights, on uneven ones too; fixed weights on uneven steps are only O(h^2) locally."""
    mu, s = 0.3, 0.5
    A = torch.tensor([[1.0, -0.7, 0.4]], dtype=torch.float64)
    errors = []
    for h in (0.2, 0.1, 0.05):
        offsets = np.array([-1.0, 0.0, 1.3, 2.1, 3.7]) if uneven else np.array([-1.0, 0.0, 1.0, 2.0, 3.0])
        sbar = 1.0 + h * offsets  # increasing in t: tau = 0..4, row 3 steps from sbar[1] to sbar[0]
        sched = NoiseSchedule.from_alphas_cumprod(1 / (1 + sbar**2))
        st = solvers.ipndm(sched, np.arange(5), 4, variable)
        xbar = [mu + A * math.sqrt(s * s + q * q) for q in sbar]
        eps = [q * (xb - mu) / (s * s + q * q) for q, xb in zip(sbar, xbar)]
        sa = [1 / math.sqrt(1 + q * q) for q in sbar]
        history = torch.stack([eps[4], eps[3], eps[2]])  # ring slots (3 - j) % 3 hold eps at rows 3 - j
        out = torch.empty_like(A)
        fused_step(sa[1] * xbar[1], eps[1], st.table, 3, torch.tensor([0, 0]), 0, 0.0, st.history_kind, history, None, None,
                   out, None, None, compute_dtype=torch.float64)  # fmt: skip
        errors.append(_rms(out, sa[0] * xbar[0]))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - expected_order) < 0.5 for o in orders), f"local errors {errors}: orders {orders}"


def test_higher_order_is_more_accurate_on_a_gaussian_mixture(uniform_logsnr_problem):
    for S in (21, 41):
        e = {s: _errors(uniform_logsnr_problem, s, (S,))[0] for s in ("ddim", "dpmpp_2m", "unipc", "unipc_3")}
        assert e["unipc_3"] < e["unipc"] < e["dpmpp_2m"] < e["ddim"] / 2, f"S={S}: {e}"


# --------------------------------------------------------------------------------------------
# spacings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000), NoiseSchedule.linear(50)])
@pytest.mark.parametrize("skip", ["logsnr", "karras"])
@pytest.mark.parametrize("S", [1, 2, 7, 10, 25, 50])
def test_schedule_spacings_are_distinct_and_start_at_pure_noise(schedule, skip, S):
    tau = solvers.timesteps(schedule, S, skip)
    assert tau.dtype == np.int64 and len(tau) == S and (np.diff(tau) > 0).all()
    assert tau[-1] == schedule.T - 1 and tau[0] >= 0
    if skip == "karras" and S >= 2:
        assert tau[0] == 0  # Karras' sigma_min is sigma(t = 0)


def test_logsnr_timesteps_are_uniform_in_log_snr():
    lam = np.linspace(9.0, -9.0, 241)
    sched = NoiseSchedule.from_alphas_cumprod(1 / (1 + np.exp(-2 * lam)))
    for S in (1, 2, 10, 20, 40, 80, 240):
        assert solvers.logsnr_timesteps(sched, S).tolist() == list(range(240 // S, 241, 240 // S))
    sched = NoiseSchedule.linear(1000)
    gaps = np.diff(solvers.half_log_snr(sched.alphas_cumprod).numpy()[solvers.logsnr_timesteps(sched, 10)])
    assert np.ptp(gaps) < 0.1 * abs(gaps.mean())
    assert solvers.logsnr_timesteps(sched, 1000).tolist() == list(range(1000))


def test_karras_timesteps_follow_sigma_to_the_one_over_rho():
    """On a schedule whose sigma^(1/7) is linear in t, Karras spacing is uniform in t."""
    u = np.linspace(0.02 ** (1 / 7), 80 ** (1 / 7), 241)  # sigma^(1/7), increasing in t
    sched = NoiseSchedule.from_alphas_cumprod(1 / (1 + u**14))
    for S in (2, 5, 9, 13, 41, 241):
        assert solvers.karras_timesteps(sched, S).tolist() == np.linspace(0, 240, S).round().astype(int).tolist()
    assert solvers.karras_timesteps(NoiseSchedule.linear(1000), 1000).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="steps: expected an integer"):
        solvers.karras_timesteps(sched, 0)
    with pytest.raises(ValueError, match="rho: expected a float > 0"):
        solvers.karras_timesteps(sched, 5, rho=0)


@DIFFUSERS_WARNINGS
@pytest.mark.parametrize("S", [5, 6, 8, 10, 20, 50, 100, 200])  # diffusers merges timesteps from S = 100 on
def test_karras_timesteps_match_diffusers(S):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", use_karras_sigmas=True)
    scheduler.set_timesteps(S)
    theirs = np.sort(scheduler.timesteps.numpy())
    ours = solvers.timesteps(NoiseSchedule.from_diffusers(scheduler), S, "karras")
    if len(np.unique(theirs)) == S:
        assert ours.tolist() == theirs.tolist()
    else:  # diffusers runs timesteps that rounding merged twice; ours pushes them apart, by at most the merged count
        merged = S - len(np.unique(theirs))
        assert len(np.unique(ours)) == S and np.abs(ours - theirs).max() <= merged
        assert ours[-S // 5 :].tolist() == theirs[-S // 5 :].tolist()  # the noisy end is untouched


# --------------------------------------------------------------------------------------------
# the sampler: every backend, quality at small S
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", NEW_SOLVERS)
def test_sampler_backends_agree(solver, step_backend):
    """Each new solver's whole trajectory on each backend (the fixture fails the test if the
    named backend is unavailable or never ran) against the reference backend."""
    backend = step_backend
    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=3 * 5 * 7)

    def image_model(x, t):
        return model(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    kw = dict(steps=6, solver=solver, skip="karras", precision="fp32", cuda_graph=False, eta=1.0 if solver == "dpmpp_2m_sde" else 0.0)
    ref = FusedSampler(image_model, sched, backend="torch", **kw).sample(shape=(2, 3, 5, 7), seed=3)
    got = FusedSampler(image_model, sched, backend=backend, **kw).sample(shape=(2, 3, 5, 7), seed=3)
    # The reference and the kernels round the same float32 operations (the op tests pin it per step);
    # over a trajectory the conversion x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies it ~150x.
    assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), what=f"{solver} on {backend}")


def test_sampler_encode_stays_ddim_inversion():
    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=6)
    x0 = torch.randn(3, 6)
    kw = dict(steps=8, precision="fp32", backend="torch", skip="karras")
    ddim = FusedSampler(model, sched, **kw)
    for solver in ("ipndm", "unipc"):
        s = FusedSampler(model, sched, solver=solver, **kw)
        assert torch.equal(s.encode(x0), ddim.encode(x0))
        assert not torch.equal(s.decode(s.encode(x0)), ddim.decode(ddim.encode(x0)))


def test_new_solvers_beat_ddim_at_6_steps_on_a_mixture():
    """At S = 6 (the sampler itself, fp32), iPNDM and UniPC are closer to the converged ODE solution
    from the same x_T than DDIM on the same timesteps (measured: ~2-4x, docs/results/quality.md)."""
    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=4, seed=1)
    x_T = torch.randn(512, 4, generator=torch.Generator().manual_seed(6))
    full = np.arange(1000)
    converged = run_table(solvers.build("dpmpp_3m", sched, full), model, x_T, full)
    err = {}
    for solver in ("ddim", "ipndm", "unipc"):
        s = FusedSampler(model, sched, steps=6, skip="logsnr", solver=solver, precision="fp32", backend="torch")
        err[solver] = _rms(s.sample(x_T), converged)
    assert err["ipndm"] < 0.7 * err["ddim"] and err["unipc"] < 0.7 * err["ddim"], err


@pytest.mark.parametrize("solver", ["ipndm", "unipc_3", "dpmpp_2m_sde"])
def test_sampler_graph_loop_equals_eager(solver):
    """The captured loop (CUDA graphs, replayed eagerly on the CPU here) gives the eager samples; a
    second replay with another seed must not see the ring or UniPC's saved state of the first."""
    from _utils import EagerReplayCapturer
    from ddim_fast.graphs import GraphCache

    sched = NoiseSchedule.linear(1000)
    model = _mixture(sched.alphas_cumprod, D=6)
    kw = dict(steps=7, solver=solver, skip="logsnr", precision="fp32", backend="torch", eta=1.0 if solver == "dpmpp_2m_sde" else 0.0)
    eager = FusedSampler(model, sched, cuda_graph=False, **kw)
    graphed = FusedSampler(model, sched, **kw)
    capturer = EagerReplayCapturer()
    graphed._graphs = GraphCache(capturer)
    for seed in (1, 2):
        assert torch.equal(graphed.sample(shape=(3, 6), seed=seed), eager.sample(shape=(3, 6), seed=seed)), seed
    assert capturer.captures == 1 and capturer.replays >= 1
