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

Use the multistep solvers with ``skip="logsnr"``: on DDIM's "uniform" tau the last log-SNR
step is ~8x the one before it, and the extrapolation weight 1 / (2 r) grows with that ratio.
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
    "half_log_snr",
    "step_orders",
    "logsnr_timesteps",
    "timesteps",
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
}
SOLVERS = tuple(BUILDERS)
SOLVER_ORDER = {"ddim": 1, "dpmpp_2m": 2, "dpmpp_3m": 3}


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
    tau = np.rint(t_cont).astype(np.int64)
    for i in range(1, S):
        tau[i] = max(tau[i], tau[i - 1] + 1)
    for i in range(S - 1, -1, -1):
        tau[i] = min(tau[i], T - S + i)
    return tau


def timesteps(schedule: NoiseSchedule, steps: int, skip="uniform") -> np.ndarray:
    """The increasing, distinct int64 timesteps tau that ``FusedSampler(skip=...)`` runs.

    Named spacings of ``schedule.select_timesteps`` ("uniform", "quad", "trailing", "linspace"),
    the schedule-aware ones here ("logsnr"), or an explicit increasing sequence.
    """
    from ddim_fast.schedule import select_timesteps

    if isinstance(skip, str) and skip == "logsnr":
        return logsnr_timesteps(schedule, steps)
    return select_timesteps(schedule.T, steps, skip)
