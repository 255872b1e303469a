"""Solvers as float64 coefficient tables: one builder per solver, nothing else.

A solver is the table that one fused op (``ddim_fast.ops.step``) evaluates row by row, in the
column layout of ``ddim_fast.layout``. Each builder takes the schedule and the increasing
timesteps tau, and returns a ``SolverTable`` for the generative direction (row 0 is the
noisiest step, the step after the smallest timestep lands on alpha = 1). Adding a solver is
adding a builder to ``BUILDERS``; no backend changes.

Notation: ``alpha`` is the cumulative product of the DDIM paper (``schedule.alphas_cumprod``);
the data-prediction solvers work with sqrt_alpha = sqrt(alpha), sqrt_one_minus_alpha =
sqrt(1 - alpha) and the half log-SNR lambda = log(sqrt_alpha / sqrt_one_minus_alpha)
(``half_log_snr``).

Solvers:

- ``"ddim"``: the generalized step of the DDIM paper, Eq. 12, for any eta (Eq. 16) and the
  paper's sigma-hat: x_prev = sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev - sigma^2) eps + sigma z.
  With eta = 0 it is the first-order exponential integrator of the probability-flow ODE in
  data-prediction form (DPM-Solver++ with k = 1), so it is also the multistep solvers' warm-up
  row. ``ddim_inversion`` is the same update run from t = 0 to T (encoding, Eq. 14).
- ``"dpmpp_2m"`` / ``"dpmpp_3m"``: multistep DPM-Solver++ (Lu et al. 2022, Algorithm 2, and the
  third-order update of diffusers' ``DPMSolverMultistepScheduler``) on a ring of earlier
  x0-predictions, with the lower-order steps of diffusers' ``lower_order_final=True,
  final_sigmas_type="zero"``: step 0 is first order, step 1 at most second; the last step
  (alpha = 1, lambda = +inf) is first order and returns the x0-prediction; below 15 steps the
  second-to-last step is at most second order.

- ``"ipndm"`` / ``"ipndm_v"``: iPNDM (Zhang & Chen 2023), Adams-Bashforth up to 4th order on
  the eps history of the DDIM ODE (Eq. 14) with lower-order warm-up; fixed equal-step weights
  (as DEIS and GITS use them) or variable-step weights from the actual sigmabar nodes.
- ``"unipc"`` / ``"unipc_3"``: UniPC (Zhao et al. 2023) bh2 predictor-corrector in data
  prediction, order 2 (diffusers' default) or 3; the corrected state lives in the op's ``saved``
  operand. ``"dpmpp_2m_sde"``: DPM-Solver++(2M) SDE, the noise through the sigma column.

Spacings: ``timesteps(schedule, S, skip)`` adds the schedule-aware "logsnr" and "karras" to
``select_timesteps``' names; ``ddim_fast.tune_timesteps`` returns an explicit sequence. On
DDIM's "uniform" tau the last log-SNR step is ~8x the one before it, and the multistep
extrapolation weight 1 / (2 r) grows with that ratio: use "logsnr" or "quad" with them
(docs/results/quality.md has the measured table).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict

import numpy as np
import torch

from ddim_fast import layout
from ddim_fast.schedule import EtaLike, NoiseSchedule, _check_eta, sigmas_for_eta

__all__ = [
    "SOLVERS",
    "SOLVER_ORDER",
    "BUILDERS",
    "SolverTable",
    "build",
    "ddim",
    "ddim_inversion",
    "dpmpp_multistep",
    "dpmpp_2m_sde",
    "ipndm",
    "unipc",
    "half_log_snr",
    "karras_timesteps",
    "step_orders",
    "logsnr_timesteps",
    "timesteps",
    "model_timesteps",
]


@dataclasses.dataclass(frozen=True)
class SolverTable:
    """What one trajectory's op calls read: the float64 table and how its ring is used.

    table: (S, layout.NUM_COLUMNS) float64, row k for step k. history_kind: what the ring keeps
    (layout.HISTORY_KINDS). The ring size and whether a saved state is needed follow from the
    table itself (``history_slots``, ``uses_saved``), so a builder cannot disagree with them.
    """

    table: torch.Tensor
    history_kind: int = layout.HISTORY_KINDS["x0"]

    @property
    def steps(self) -> int:
        return int(self.table.shape[0])

    @property
    def history_slots(self) -> int:
        """R, the ring's slots: the deepest history term any row reads (0 = no ring)."""
        used = (self.table[:, layout.C_H : layout.C_H + layout.HISTORY_TERMS] != 0) | (
            self.table[:, layout.D_H : layout.D_H + layout.HISTORY_TERMS] != 0
        )
        cols = torch.nonzero(used.any(0)).flatten()
        return int(cols.max()) + 1 if cols.numel() else 0

    @property
    def uses_saved(self) -> bool:
        t = self.table
        return bool((t[:, [layout.C_SAVED, layout.D_X, layout.D_X0, layout.D_EPS, layout.D_SAVED]] != 0).any()) or bool(
            (t[:, layout.D_H : layout.D_H + layout.HISTORY_TERMS] != 0).any()
        )

    @property
    def stochastic(self) -> tuple:
        """(S,) host bools: does step k add sigma z."""
        return tuple(bool(s != 0) for s in self.table[:, layout.SIGMA].tolist())

    def check(self, name: str = "schedule") -> None:
        """A table whose float32 copy would overflow (a degenerate schedule) is an error naming it."""
        t32 = self.table.to(torch.float32)
        if not bool(torch.isfinite(self.table).all()) or not bool(torch.isfinite(t32).all()):
            bad = int(torch.nonzero(~torch.isfinite(t32).all(1))[0, 0])
            raise ValueError(
                f"{name}: the solver's coefficients at step {bad} are not finite in float32 (alphas_cumprod too close "
                "to 0 or 1 for these timesteps); use a schedule whose betas stay inside (0, 1) with margin"
            )


def _rows(S: int) -> torch.Tensor:
    return torch.zeros((S, layout.NUM_COLUMNS), dtype=torch.float64)


def half_log_snr(alpha) -> torch.Tensor:
    """lambda = log(sqrt(alpha) / sqrt(1 - alpha)) of cumulative alphas, float64 (+inf at alpha = 1)."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    return 0.5 * (torch.log(a) - torch.log1p(-a))


def _alphas_desc(schedule: NoiseSchedule, tau) -> torch.Tensor:
    t_desc = torch.as_tensor(np.asarray(tau, dtype=np.int64)[::-1].copy())
    return schedule.alphas_cumprod[t_desc]


def _nodes(schedule: NoiseSchedule, tau):
    """(S, sqrt_alpha, sqrt_one_minus_alpha, lambda) along tau, noisiest first, each with the final
    node alpha = 1 appended (lambda = +inf there); lambda must increase strictly."""
    a = _alphas_desc(schedule, tau)
    S = a.numel()
    lam = half_log_snr(a).tolist() + [math.inf]
    if any(not lam[k + 1] > lam[k] for k in range(S)):
        raise ValueError(f"tau: expected strictly increasing timesteps with distinct alphas, got {list(tau)}")
    return S, a.sqrt().tolist() + [1.0], (1.0 - a).sqrt().tolist() + [0.0], lam


def ddim(schedule: NoiseSchedule, tau, eta: EtaLike = 0.0) -> SolverTable:
    """Eq. 12 along tau (noisiest first): row (sqrt(alpha_t), sqrt(1 - alpha_t); c_x0 = sqrt(alpha_prev),
    c_eps = sqrt(1 - alpha_prev - sigma^2), sigma), alpha_prev := 1 after the last step."""
    alpha_t = _alphas_desc(schedule, tau)
    alpha_prev = torch.cat([alpha_t[1:], torch.ones(1, dtype=torch.float64)])
    sigma_dir, sigma_noise = sigmas_for_eta(alpha_t, alpha_prev, eta)
    c_eps2 = 1.0 - alpha_prev - sigma_dir**2
    if (c_eps2 < -1e-12).any():  # eta > 1 asks for the root of a negative number
        raise ValueError(f"eta: {eta!r} makes sigma^2 exceed 1 - alpha_prev (Eq. 12 needs eta <= 1 here)")
    rows = _rows(alpha_t.numel())
    rows[:, layout.SQRT_ALPHA] = alpha_t.sqrt()
    rows[:, layout.SQRT_ONE_MINUS_ALPHA] = (1.0 - alpha_t).sqrt()
    rows[:, layout.C_X0] = alpha_prev.sqrt()
    rows[:, layout.C_EPS] = c_eps2.clamp_min(0.0).sqrt()
    rows[:, layout.SIGMA] = sigma_noise
    return SolverTable(rows)


def ddim_inversion(schedule: NoiseSchedule, tau) -> SolverTable:
    """Encoding x_0 -> x_T (cleanest step first): Eq. 12 with eta = 0 run from alpha = 1 up the
    increasing tau, the model evaluated at tau[k]: row (sqrt(alpha_cur), sqrt(1 - alpha_cur);
    c_x0 = sqrt(alpha_next), c_eps = sqrt(1 - alpha_next)), alpha_cur := 1 at the start."""
    alpha_next = schedule.alphas_cumprod[torch.as_tensor(np.asarray(tau, dtype=np.int64))]
    alpha_cur = torch.cat([torch.ones(1, dtype=torch.float64), alpha_next[:-1]])
    rows = _rows(alpha_next.numel())
    rows[:, layout.SQRT_ALPHA] = alpha_cur.sqrt()
    rows[:, layout.SQRT_ONE_MINUS_ALPHA] = (1.0 - alpha_cur).sqrt()
    rows[:, layout.C_X0] = alpha_next.sqrt()
    rows[:, layout.C_EPS] = (1.0 - alpha_next).sqrt()
    return SolverTable(rows)


# diffusers' DPMSolverMultistepScheduler lowers the second-to-last step's order below this length.
_LOWER_ORDER_SECOND_BELOW = 15


def step_orders(S: int, order: int) -> np.ndarray:
    """The order of each of S multistep steps: min(order, k + 1), lowered at the end (module docstring)."""
    orders = np.minimum(order, np.arange(S) + 1)
    if 2 <= S < _LOWER_ORDER_SECOND_BELOW:
        orders[S - 2] = min(orders[S - 2], 2)
    if S >= 1:
        orders[S - 1] = 1
    return orders.astype(np.int64)


def dpmpp_multistep(schedule: NoiseSchedule, tau, order: int) -> SolverTable:
    """Multistep DPM-Solver++ of ``order`` (1-3) in data prediction, along tau (noisiest first).

    With h = lambda_next - lambda_k, phi1 = 1 - e^{-h} and x0_j the x0-prediction of step j:
    x_next = (sqrt_one_minus_alpha_next / sqrt_one_minus_alpha_k) x_t + sqrt_alpha_next * D, with
    - order 1: D = phi1 x0_k (= DDIM at eta = 0);
    - order 2 (midpoint, Lu et al. 2022 Algorithm 2): D = phi1 (x0_k + (x0_k - x0_{k-1}) / (2 r0)),
      r0 = h_{k-1} / h;
    - order 3: D = phi1 D0 + (1 - phi1 / h) D1 - ((h - phi1) / h^2 - 1/2) D2, D1 and D2 the first
      and second divided differences of three x0-predictions.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    a = _alphas_desc(schedule, tau)
    S = a.numel()
    orders = step_orders(S, order)
    sqrt_alpha = a.sqrt().tolist()
    sqrt_one_minus_alpha = (1.0 - a).sqrt().tolist()
    lam = half_log_snr(a).tolist()  # increasing along the trajectory
    rows = _rows(S)
    for k in range(S):
        last = k == S - 1
        sa_n, s1m_n = (1.0, 0.0) if last else (sqrt_alpha[k + 1], sqrt_one_minus_alpha[k + 1])
        if last:
            h, phi1 = math.inf, 1.0
        else:
            h = lam[k + 1] - lam[k]
            if not h > 0:
                raise ValueError(f"tau: expected strictly increasing timesteps with distinct alphas, got {list(tau)}")
            phi1 = -math.expm1(-h)  # 1 - e^{-h}, exact for small h
        A = sa_n * phi1
        c = np.zeros(3)  # coefficients of x0_k, x0_{k-1}, x0_{k-2}
        if orders[k] == 1:
            c[0] = A
        elif orders[k] == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            c[:2] = A * (1.0 + 0.5 / r0), -A * 0.5 / r0
        else:
            r0 = (lam[k] - lam[k - 1]) / h
            r1 = (lam[k - 1] - lam[k - 2]) / h
            d1_0 = np.array([1.0 / r0, -1.0 / r0, 0.0])  # (x0_k - x0_{k-1}) / r0
            d1_1 = np.array([0.0, 1.0 / r1, -1.0 / r1])  # (x0_{k-1} - x0_{k-2}) / r1
            D1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            D2 = (d1_0 - d1_1) / (r0 + r1)
            c = np.array([A, 0.0, 0.0]) + sa_n * (1.0 - phi1 / h) * D1 - sa_n * ((h - phi1) / h**2 - 0.5) * D2
        rows[k, layout.SQRT_ALPHA] = sqrt_alpha[k]
        rows[k, layout.SQRT_ONE_MINUS_ALPHA] = sqrt_one_minus_alpha[k]
        rows[k, layout.C_X] = s1m_n / sqrt_one_minus_alpha[k]
        rows[k, layout.C_X0] = c[0]
        rows[k, layout.C_H] = c[1]
        rows[k, layout.C_H + 1] = c[2]
    return SolverTable(rows, layout.HISTORY_KINDS["x0"])


# Adams-Bashforth weights of the eps history (newest first) on an equal-step grid, orders 1-4.
_AB_FIXED = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ab_weights(nodes, s_cur: float, s_next: float) -> np.ndarray:
    """Variable-step Adams-Bashforth weights: (1/h) * integral over [s_cur, s_next] of the Lagrange
    basis polynomials through ``nodes`` (newest first, nodes[0] = s_cur), h = s_next - s_cur."""
    h = s_next - s_cur
    u = (np.asarray(nodes, dtype=np.float64) - s_cur) / h  # nodes in units of the step: 0, -r1, -r2, ...
    if len(u) == 1:
        return np.ones(1)
    w = np.empty(len(u))
    for j in range(len(u)):
        others = np.delete(u, j)
        poly = np.polynomial.Polynomial.fromroots(others) / np.prod(u[j] - others)
        w[j] = poly.integ()(1.0)
    return w


def ipndm(schedule: NoiseSchedule, tau, order: int = 4, variable: bool = False) -> SolverTable:
    """iPNDM (Zhang & Chen 2023, the DEIS paper): Adams-Bashforth on the eps history
    of the DDIM ODE (Eq. 14), dxbar = eps dsigmabar with xbar = x / sqrt(alpha) and
    sigmabar = sqrt((1 - alpha) / alpha), of ``order`` (1-4) with lower-order warm-up steps:

        x_next = (sqrt_alpha_next / sqrt_alpha_k) x_t
                 + sqrt_alpha_next (sigmabar_next - sigmabar_k) sum_j b_j eps_{k-j}

    ``variable=False``: the fixed equal-step weights (k-diffusion's ``sample_ipndm``, GITS);
    ``variable=True``: weights integrated from the Lagrange polynomial through the actual
    sigmabar nodes (k-diffusion's ``sample_ipndm_v``). Order 1 is DDIM at eta = 0. The last
    step (alpha = 1, sigmabar = 0) keeps the full order, as the paper and k-diffusion do.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order: expected 1, 2, 3 or 4, got {order!r}")
    a = _alphas_desc(schedule, tau)
    S = a.numel()
    sa = a.sqrt().tolist() + [1.0]
    sbar = ((1.0 - a) / a).sqrt().tolist() + [0.0]
    if any(not sbar[k + 1] < sbar[k] for k in range(S)):
        raise ValueError(f"tau: expected strictly increasing timesteps with distinct alphas, got {list(tau)}")
    rows = _rows(S)
    for k in range(S):
        p = min(order, k + 1)
        b = _ab_weights(sbar[k::-1][:p], sbar[k], sbar[k + 1]) if variable else np.asarray(_AB_FIXED[p])
        scale = sa[k + 1] * (sbar[k + 1] - sbar[k])
        rows[k, layout.SQRT_ALPHA] = sa[k]
        rows[k, layout.SQRT_ONE_MINUS_ALPHA] = math.sqrt(1.0 - a[k].item())
        rows[k, layout.C_X] = sa[k + 1] / sa[k]
        rows[k, layout.C_EPS] = scale * b[0]
        for j in range(1, p):
            rows[k, layout.C_H + j - 1] = scale * b[j]
    return SolverTable(rows, layout.HISTORY_KINDS["eps"])


def _unipc_b(h: float, order: int) -> np.ndarray:
    """UniPC's right-hand side b_i = i! phi_{i+1}(-h) h / B(h), i = 1..order, with the bh2 choice
    B(h) = e^{-h} - 1 in data prediction (Zhao et al. 2023, UniPC)."""
    hh = -h
    h_phi = math.expm1(hh) / hh - 1.0  # phi_2-like term, then the phi recursion phi_{k+1} = (phi_k - 1/k!) / hh
    B_h = math.expm1(hh)
    b, fact = [], 1.0
    for i in range(1, order + 1):
        b.append(h_phi * fact / B_h)
        fact *= i + 1
        h_phi = h_phi / hh - 1.0 / fact
    return np.asarray(b)


def unipc(schedule: NoiseSchedule, tau, order: int = 2) -> SolverTable:
    """UniPC (Zhao et al. 2023): the bh2 predictor UniP-p and corrector UniC in data prediction,
    orders 1-3, the predictor's order lowered at the end (diffusers' ``lower_order_final``: step k
    is at most order S - k), the corrector after every step but the last.

    With lambda the half log-SNR, h = lambda_next - lambda_k, r_i = (lambda_{k-i} - lambda_k) / h
    and D_i = (x0_{k-i} - x0_k) / r_i, the predictor from the corrected state x^c_k is

        x_next = (sqrt_1m_alpha_next / sqrt_1m_alpha_k) x^c_k - sqrt_alpha_next (e^{-h} - 1) x0_k
                 - sqrt_alpha_next (e^{-h} - 1) sum_i rho_i D_i

    (rho = 1/2 at order 2, else R rho = b on the r_i), and the corrector UniC, once the model has
    been evaluated at the predicted x_k, redoes step k - 1 from x^c_{k-1} with x0_k as one more
    node (rho_c = 1/2 at order 1). Everything is linear in (x_t, x^c_{k-1}, x0_k, x0_{k-1..k-3}),
    so row k gives x_next through the c_* columns and the new x^c_k, kept in ``saved``, through d_*.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    S, sa, s1m, lam = _nodes(schedule, tau)
    orders = [min(order, S - k, k + 1) for k in range(S)]
    # Linear forms over the basis (x_t, x^c_{k-1}, x0_k, x0_{k-1}, x0_{k-2}, x0_{k-3}).
    X, SAVED, X0 = 0, 1, 2

    def update(k_from: int, p: int, extra_x0_new: bool):
        """The order-p UniP (extra_x0_new=False) or UniC (True) update from state node k_from to
        k_from + 1, as (coefficient of the start state, coefficients of x0 at nodes k_from + 1,
        k_from, k_from - 1, ... indexed by the node)."""
        h = lam[k_from + 1] - lam[k_from]
        sa_n, ratio = sa[k_from + 1], s1m[k_from + 1] / s1m[k_from]
        h_phi_1 = math.expm1(-h)
        coef = {k_from: -sa_n * h_phi_1}  # node index -> coefficient of its x0
        if p == 1 and not extra_x0_new:
            return ratio, coef
        B_h = h_phi_1  # bh2
        rks = [(lam[k_from - i] - lam[k_from]) / h for i in range(1, p)]
        b = _unipc_b(h, p)
        if extra_x0_new:
            if p == 1:
                rhos = np.array([0.5])
            else:
                R = np.vander(np.asarray(rks + [1.0]), p, increasing=True).T
                rhos = np.linalg.solve(R, b)
            rho_d, rho_new = rhos[:-1], rhos[-1]
            coef[k_from + 1] = -sa_n * B_h * rho_new
            coef[k_from] += sa_n * B_h * rho_new
        else:
            rho_d = np.array([0.5]) if p == 2 else np.linalg.solve(np.vander(np.asarray(rks), p - 1, increasing=True).T, b[:-1])
        for i, (rk, rho) in enumerate(zip(rks, rho_d), start=1):  # D_i = (x0_{k-i} - x0_k) / r_i
            coef[k_from - i] = coef.get(k_from - i, 0.0) - sa_n * B_h * rho / rk
            coef[k_from] += sa_n * B_h * rho / rk
        return ratio, coef

    rows = _rows(S)
    for k in range(S):
        corrected = np.zeros(6)  # x^c_k
        if k == 0:
            corrected[X] = 1.0
        else:
            ratio, coef = update(k - 1, orders[k - 1], extra_x0_new=True)
            corrected[SAVED] = ratio
            for node, c in coef.items():
                corrected[X0 + (k - node)] += c
        ratio, coef = update(k, orders[k], extra_x0_new=False)
        x_next = ratio * corrected
        for node, c in coef.items():
            x_next[X0 + (k - node)] += c
        rows[k, layout.SQRT_ALPHA] = sa[k]
        rows[k, layout.SQRT_ONE_MINUS_ALPHA] = s1m[k]
        for cols, form in (((layout.C_X, layout.C_SAVED, layout.C_X0, layout.C_H), x_next),
                           ((layout.D_X, layout.D_SAVED, layout.D_X0, layout.D_H), corrected)):  # fmt: skip
            rows[k, cols[0]], rows[k, cols[1]], rows[k, cols[2]] = form[X], form[SAVED], form[X0]
            rows[k, cols[3] : cols[3] + layout.HISTORY_TERMS] = torch.as_tensor(form[X0 + 1 :])
    return SolverTable(rows, layout.HISTORY_KINDS["x0"])


def dpmpp_2m_sde(schedule: NoiseSchedule, tau, eta: float = 1.0) -> SolverTable:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M); diffusers' ``sde-dpmsolver++``, midpoint),
    with k-diffusion's noise amount eta (1 = the SDE, 0 = ``dpmpp_2m`` exactly):

        x_next = (sqrt_1m_alpha_next / sqrt_1m_alpha_k) e^{-eta h} x_t + sqrt_alpha_next (1 - e^{-(1 + eta) h}) D
                 + sqrt_1m_alpha_next sqrt(1 - e^{-2 eta h}) z,   D = x0_k + (x0_k - x0_{k-1}) / (2 r),

    r = h_{k-1} / h, the step orders of ``step_orders(S, 2)`` (first and last steps first order).
    """
    if isinstance(eta, str) or not eta >= 0:
        raise ValueError(f"eta: dpmpp_2m_sde takes a float >= 0 (1 = diffusers' sde-dpmsolver++), got {eta!r}")
    eta = float(eta)
    S, sa, s1m, lam = _nodes(schedule, tau)
    orders = step_orders(S, 2)
    rows = _rows(S)
    for k in range(S):
        h = lam[k + 1] - lam[k]
        eta_h = eta * h if eta else 0.0  # 0 * inf on the last step would be NaN
        A = sa[k + 1] * -math.expm1(-h - eta_h)
        rows[k, layout.SQRT_ALPHA] = sa[k]
        rows[k, layout.SQRT_ONE_MINUS_ALPHA] = s1m[k]
        rows[k, layout.C_X] = s1m[k + 1] / s1m[k] * math.exp(-eta_h)
        rows[k, layout.SIGMA] = s1m[k + 1] * math.sqrt(-math.expm1(-2.0 * eta_h))
        if orders[k] == 1:
            rows[k, layout.C_X0] = A
        else:
            r = (lam[k] - lam[k - 1]) / h
            rows[k, layout.C_X0] = A * (1.0 + 0.5 / r)
            rows[k, layout.C_H] = -A * 0.5 / r
    return SolverTable(rows, layout.HISTORY_KINDS["x0"])


def _deterministic(name: str, builder: Callable) -> Callable:
    def build_deterministic(schedule, tau, eta=0.0):
        if eta != 0:
            raise ValueError(f"eta: the solver {name!r} is deterministic (eta = 0), got eta={eta!r}; use solver='ddim'")
        return builder(schedule, tau)

    return build_deterministic


# solver name -> builder(schedule, increasing tau, eta) -> SolverTable (generative direction).
BUILDERS: Dict[str, Callable[..., SolverTable]] = {
    "ddim": ddim,
    "dpmpp_2m": _deterministic("dpmpp_2m", lambda s, tau: dpmpp_multistep(s, tau, 2)),
    "dpmpp_3m": _deterministic("dpmpp_3m", lambda s, tau: dpmpp_multistep(s, tau, 3)),
    "ipndm": _deterministic("ipndm", lambda s, tau: ipndm(s, tau, 4)),
    "ipndm_v": _deterministic("ipndm_v", lambda s, tau: ipndm(s, tau, 4, variable=True)),
    "unipc": _deterministic("unipc", lambda s, tau: unipc(s, tau, 2)),
    "unipc_3": _deterministic("unipc_3", lambda s, tau: unipc(s, tau, 3)),
    "dpmpp_2m_sde": dpmpp_2m_sde,
}
SOLVERS = tuple(BUILDERS)
# The order of the highest-order step (UniPC: the predictor's; its corrector adds one).
SOLVER_ORDER = {"ddim": 1, "dpmpp_2m": 2, "dpmpp_3m": 3, "ipndm": 4, "ipndm_v": 4, "unipc": 2, "unipc_3": 3, "dpmpp_2m_sde": 2}


def build(solver: str, schedule: NoiseSchedule, tau, eta: EtaLike = 0.0) -> SolverTable:
    """The table of ``solver`` along the increasing timesteps ``tau`` (first step = tau[-1])."""
    if solver not in BUILDERS:
        raise ValueError(f"solver: expected one of {tuple(BUILDERS)}, got {solver!r}")
    _check_eta(eta)
    return BUILDERS[solver](schedule, tau, eta)


def logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """``skip="logsnr"``: S timesteps uniform in log-SNR (increasing int64, distinct, the last T - 1).

    S + 1 points uniform in lambda between lambda(T - 1) and lambda(0) are the ends of S equal
    log-SNR steps (DPM-Solver's "logSNR" skip type); the model is called at the first S, each
    mapped to the nearest timestep, and the last step lands on alpha = 1 instead of on t = 0
    (evaluating at t = 0 as well was worse at small S: on a 16-D Gaussian mixture, S = 5, 3M
    5.2 vs 0.35 in Frechet distance). Neighbours that rounding would merge are pushed one
    timestep apart, so exactly S distinct timesteps run for any S <= T.
    """
    T = schedule.T
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
    S = int(steps)
    lam = half_log_snr(schedule.alphas_cumprod).numpy()  # decreasing in t
    targets = np.linspace(lam[0], lam[T - 1], S + 1)[1:]  # cleanest first, t = 0 itself dropped
    t_cont = np.interp(-targets, -lam, np.arange(T, dtype=np.float64))  # np.interp needs increasing x
    return _distinct(np.rint(t_cont).astype(np.int64), T)


def _distinct(tau: np.ndarray, T: int) -> np.ndarray:
    """Increasing rounded timesteps made distinct: neighbours that rounding merged are pushed one
    timestep apart (upwards, then back below T), so exactly len(tau) <= T timesteps run."""
    tau = tau.copy()
    S = len(tau)
    for i in range(1, S):
        tau[i] = max(tau[i], tau[i - 1] + 1)
    for i in range(S - 1, -1, -1):
        tau[i] = min(tau[i], T - S + i)
    return tau


KARRAS_RHO = 7.0


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """``skip="karras"``: Karras et al. (2022, Eq. 5) spacing, increasing int64, distinct.

    sigma = sqrt((1 - alpha) / alpha) runs from sigma(T - 1) to sigma(0) in S points uniform in
    sigma^(1 / rho); each is mapped to a timestep by interpolating log sigma over t and rounded, as
    diffusers' ``use_karras_sigmas=True`` does (so both run the same timesteps wherever rounding
    merges none; here merged neighbours are pushed apart instead of run twice). The model is
    called at t = 0 too and the last step lands on alpha = 1.
    """
    T = schedule.T
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho: expected a float > 0, got {rho!r}")
    a = schedule.alphas_cumprod.numpy()
    log_sigma = 0.5 * (np.log1p(-a) - np.log(a))  # increasing in t
    s_min, s_max = np.exp(log_sigma[0]), np.exp(log_sigma[-1])
    ramp = np.linspace(0.0, 1.0, int(steps))
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho  # noisiest first
    t_cont = np.interp(np.log(sigmas[::-1]), log_sigma, np.arange(T, dtype=np.float64))
    return _distinct(np.rint(t_cont).astype(np.int64), T)


def timesteps(schedule: NoiseSchedule, steps: int, skip="uniform") -> np.ndarray:
    """The increasing, distinct int64 timesteps tau that ``FusedSampler(skip=...)`` runs.

    Named spacings of ``schedule.select_timesteps`` ("uniform", "quad", "trailing", "linspace"),
    the schedule-aware ones here ("logsnr", "karras"), or an explicit increasing sequence (what
    ``ddim_fast.tune_timesteps`` returns).
    """
    from ddim_fast.schedule import select_timesteps

    if isinstance(skip, str) and skip in SCHEDULE_SKIPS:
        return SCHEDULE_SKIPS[skip](schedule, steps)
    return select_timesteps(schedule.T, steps, skip)


def model_timesteps(given, tau, T: int) -> np.ndarray:
    """``FusedSampler(model_timesteps=...)`` and its twins: int64 timesteps the model is told, one per
    step, paired with the increasing ``tau`` (``given`` None: tau itself); a clear error otherwise."""
    tau = np.asarray(tau, dtype=np.int64)
    if given is None:
        return tau
    what = f"a sequence of {len(tau)} integer timesteps in [0, {T}), one per step, paired with the increasing skip timesteps"
    if isinstance(given, (str, bytes)):
        raise ValueError(f"model_timesteps: expected {what}, got {given!r}")
    try:
        arr = np.asarray(given.detach().cpu()) if torch.is_tensor(given) else np.asarray(given)
    except Exception:  # noqa: BLE001 - anything that is not an array of numbers
        raise ValueError(f"model_timesteps: expected {what}, got {given!r}") from None
    if arr.ndim != 1 or len(arr) != len(tau) or arr.dtype.kind not in "iu" or (arr < 0).any() or (arr >= T).any():
        raise ValueError(f"model_timesteps: expected {what}, got {arr.tolist()!r}")
    return np.ascontiguousarray(arr, dtype=np.int64)


# Spacings that need the schedule (select_timesteps knows only T).
SCHEDULE_SKIPS = {"logsnr": logsnr_timesteps, "karras": karras_timesteps}
