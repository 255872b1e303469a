"""Multistep solvers of the DDIM ODE: coefficient tables, log-SNR spacing, and the reference step.

DDIM with eta = 0 is the first-order exponential integrator of the probability-flow ODE in
data-prediction form (DPM-Solver++, Lu et al. 2022, Eq. 9 with k = 1). With alpha = sqrt(a_t),
sigma = sqrt(1 - a_t) (a_t the cumulative product), lambda = log(alpha / sigma) and
h = lambda_next - lambda_t, one step from t to `next` is

    x_next = (sigma_next / sigma_t) x_t + alpha_next (1 - e^{-h}) x0_t            (= DDIM, Eq. 12)

and the multistep solvers add the x0-predictions of the previous steps, each step being the
same linear form

    x_next = c_x x_t + c_0 x0_k + c_1 x0_{k-1} + c_2 x0_{k-2}

whose coefficients depend only on the schedule. They are computed once per sampler in float64
(``multistep_table``) and stored as float32 rows

    sqrt(a_t), sqrt(1 - a_t), c_x, c_0, c_1, c_2        (MULTISTEP_COLUMNS)

so ONE fused op (``ddim_fast::multistep_step``: Triton ``kernels/multistep.py``, the plain
PyTorch ``multistep_step`` below) runs every solver: convert the model output to x0 with the
first two columns, clip it, read the previous x0-predictions from a ring buffer on the device,
write x_next and store x0_k in the ring. The step index is the only per-launch host value.

Solvers (``SOLVERS``):

- ``"ddim"``: the DDIM step (``ddim_fast::step``; any eta). Order 1.
- ``"dpmpp_2m"``: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint")``). Order 2.
- ``"dpmpp_3m"``: the third-order multistep DPM-Solver++ (diffusers' ``solver_order=3``). Order 3.

Lower-order steps, exactly as diffusers with ``lower_order_final=True, final_sigmas_type="zero"``:
step 0 is first order (no history yet), step 1 at most second order; the last step, which lands
on alpha = 1 (lambda = +inf: every higher-order coefficient degenerates), is first order, i.e.
it returns the x0-prediction as the DDIM sampler's last step does; for trajectories shorter than
15 steps the second-to-last step is at most second order.

Which solver, how many steps (measured; commands in the issue-8 note):

- ``solver="dpmpp_3m"`` with ``skip="logsnr"`` at 10-20 steps is the fast choice. On the
  embedded digits model (Frechet distance in the digit classifier's features vs all 1,797
  digits, N = 1000, fp32, seeds 0 / 1): 3M at S = 10 2.12 / 5.93 vs DDIM ("uniform") at
  S = 50 2.15 / 6.56 and at S = 10 7.71 / 13.68; 3M at S = 20 1.87 / 6.20 vs DDIM at S = 100
  1.96 / 6.25 (equal within the seed-to-seed spread). 2M: 2.40 / 7.01 at S = 10 (between
  DDIM 20 and 50), 1.92 / 6.24 at S = 20. Past ~20 steps all are at the model's own limit.
- Use the log-SNR spacing with them. On DDIM's default "uniform" tau the last log-SNR step
  (t = 100 -> 0 at S = 10) is ~8x the one before and the multistep extrapolation weight
  1 / (2 r) grows with that ratio: 2M there was further from the exact ODE solution than DDIM
  (Gaussian mixture, tests/test_solvers.py). DDIM itself prefers its "uniform" spacing.
- On a closed-form 16-D Gaussian mixture (linear schedule, fp32, median error vs the exact ODE
  solution from the same x_T): S = 10: DDIM 9.4e-2, 2M 3.4e-2, 3M 3.8e-2; S = 20: DDIM
  5.4e-2, 2M 5.9e-3, 3M 3.9e-3; S = 50: DDIM 2.4e-2, 2M 1.0e-3, 3M 8.2e-4. 3M is third order
  while its steps are large (3.7 and 2.6 per halving from S = 11 to 41 on the uniform log-SNR
  test problem) and tends to second order as its first-order warm-up step's O(h^2) error
  takes over (2.2 from 41 to 81), as in diffusers.
- ``solver="ddim"`` for eta > 0, and for the exact DDIM trajectories of the paper.

The multistep solvers are deterministic (eta = 0). Encoding (x0 -> x_T) is DDIM inversion
whatever the solver: a multistep method run backwards is not the same method's inverse, and
the first inversion step starts at alpha = 1 where the data-prediction form needs an epsilon
that no history provides. Decoding uses the sampler's solver.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

__all__ = [
    "SOLVERS",
    "SOLVER_ORDER",
    "MULTISTEP_COLUMNS",
    "HISTORY_SLOTS",
    "step_orders",
    "multistep_coefficients",
    "multistep_table",
    "logsnr_timesteps",
    "history_slots",
    "multistep_step",
]

SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m")
SOLVER_ORDER = {"ddim": 1, "dpmpp_2m": 2, "dpmpp_3m": 3}

# Column order of the (S, 6) multistep table.
MULTISTEP_COLUMNS = ("sqrt_alpha_t", "sqrt_one_minus_alpha_t", "c_x", "c_0", "c_1", "c_2")

# Ring-buffer slots the sampler allocates per solver: the step writes slot step % H and reads
# slots (step - 1) % H and (step - 2) % H, so H = order keeps the write and the reads apart.
HISTORY_SLOTS = {"dpmpp_2m": 2, "dpmpp_3m": 3}

# diffusers' DPMSolverMultistepScheduler lowers the second-to-last step's order below this length.
_LOWER_ORDER_SECOND_BELOW = 15


def _check_solver(solver: str) -> int:
    if solver not in SOLVER_ORDER:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    return SOLVER_ORDER[solver]


def step_orders(S: int, order: int) -> np.ndarray:
    """The order of each of S steps: min(order, k + 1), first order at the end (see module docstring)."""
    orders = np.minimum(order, np.arange(S) + 1)
    if S >= 2 and S < _LOWER_ORDER_SECOND_BELOW:
        orders[S - 2] = min(orders[S - 2], 2)
    if S >= 1:
        orders[S - 1] = 1
    return orders.astype(np.int64)


def multistep_coefficients(alphas, order: int) -> torch.Tensor:
    """The (S, 6) float64 table for steps at cumulative alphas ``alphas`` (noisiest first).

    Step k moves from a_k = alphas[k] to a_{k+1} (a := 1 past the end). Each row is
    (sqrt(a_k), sqrt(1 - a_k), c_x, c_0, c_1, c_2) with the multistep DPM-Solver++ update of
    order ``step_orders(S, order)[k]`` written as x_next = c_x x + c_0 x0_k + c_1 x0_{k-1} + c_2 x0_{k-2}:

    - order 1 (Lu et al. 2022, Eq. 9 / DDIM): c_x = sigma_n / sigma_k, c_0 = alpha_n phi1,
      phi1 = 1 - e^{-h};
    - order 2 (midpoint, Algorithm 2): D1 = (x0_k - x0_{k-1}) / r0, r0 = h_{k-1} / h,
      x_next = c_x x + alpha_n phi1 (x0_k + D1 / 2);
    - order 3 (diffusers' ``multistep_dpm_solver_third_order_update``): D1, D2 from the divided
      differences of three x0-predictions, x_next = c_x x + alpha_n (phi1 D0 + (1 - phi1 / h) D1
      - ((h - phi1) / h^2 - 1/2) D2).
    """
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.numel() < 1 or not bool(((a > 0) & (a < 1)).all()):
        raise ValueError("alphas: expected a non-empty 1-D sequence of cumulative alphas in (0, 1)")
    S = a.numel()
    orders = step_orders(S, order)
    alpha = a.sqrt().tolist()
    sigma = (1.0 - a).sqrt().tolist()
    lam = [math.log(al) - math.log(si) for al, si in zip(alpha, sigma)]  # increasing along the trajectory
    rows = []
    for k in range(S):
        last = k == S - 1
        alpha_n, sigma_n = (1.0, 0.0) if last else (alpha[k + 1], sigma[k + 1])
        c_x = sigma_n / sigma[k]
        if last:
            h = math.inf
            phi1 = 1.0
        else:
            h = lam[k + 1] - lam[k]
            if not h > 0:
                raise ValueError(f"alphas: expected increasing cumulative alphas along the trajectory, got {a.tolist()}")
            phi1 = -math.expm1(-h)  # 1 - e^{-h}, exact for small h
        c = np.zeros(3)
        A = alpha_n * phi1
        if orders[k] == 1:
            c[0] = A
        elif orders[k] == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            c[0] = A * (1.0 + 0.5 / r0)
            c[1] = -A * 0.5 / r0
        else:
            r0 = (lam[k] - lam[k - 1]) / h
            r1 = (lam[k - 1] - lam[k - 2]) / h
            d1_0 = np.array([1.0 / r0, -1.0 / r0, 0.0])  # (x0_k - x0_{k-1}) / r0
            d1_1 = np.array([0.0, 1.0 / r1, -1.0 / r1])  # (x0_{k-1} - x0_{k-2}) / r1
            D1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            D2 = (d1_0 - d1_1) / (r0 + r1)
            B = alpha_n * (1.0 - phi1 / h)
            C = -alpha_n * ((h - phi1) / h**2 - 0.5)
            c = np.array([A, 0.0, 0.0]) + B * D1 + C * D2
        rows.append([alpha[k], sigma[k], c_x, *c.tolist()])
    return torch.tensor(rows, dtype=torch.float64)


def multistep_table(schedule, tau: np.ndarray, solver: str) -> torch.Tensor:
    """The (S, 6) float64 table of ``solver`` along the increasing timesteps ``tau`` (first step = tau[-1])."""
    order = _check_solver(solver)
    t_desc = torch.as_tensor(np.asarray(tau, dtype=np.int64)[::-1].copy())
    return multistep_coefficients(schedule.alphas_cumprod[t_desc], order)


def logsnr_timesteps(schedule, steps: int) -> np.ndarray:
    """``skip="logsnr"``: S timesteps uniform in log-SNR (increasing int64, distinct, the last T - 1).

    S + 1 points lambda_i = linspace(lambda(T - 1), lambda(0), S + 1) are the ends of S equal
    log-SNR steps (DPM-Solver's "logSNR" skip type); the model is called at the first S, each
    mapped to the nearest timestep (lambda interpolated linearly between integer timesteps),
    and the last step lands on alpha = 1 instead of on t = 0. Evaluating at t = 0 as well
    (S points with both ends included) was worse at small S on a 16-D Gaussian mixture, linear
    schedule, Frechet distance to the data: S = 10, 2M 0.058 vs 0.038, 3M 0.064 vs 0.038;
    S = 5, 3M 5.2 vs 0.35; equal from S = 20. Where rounding would merge neighbours (the
    linear T = 1000 schedule moves lambda by ~0.8 per timestep near t = 0) they are pushed one
    timestep apart, so exactly S distinct timesteps run for any S <= T.
    """
    T = schedule.T
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
    S = int(steps)
    lam = schedule.log_snr().numpy()  # decreasing in t
    targets = np.linspace(lam[0], lam[T - 1], S + 1)[1:]  # cleanest first, t = 0 itself dropped
    t_cont = np.interp(-targets, -lam, np.arange(T, dtype=np.float64))  # np.interp needs increasing x
    tau = np.rint(t_cont).astype(np.int64)
    for i in range(1, S):
        tau[i] = max(tau[i], tau[i - 1] + 1)
    for i in range(S - 1, -1, -1):
        tau[i] = min(tau[i], T - S + i)
    return tau


def history_slots(step: int, slots: int):
    """(slot written with x0_step, slot of x0_{step-1}, slot of x0_{step-2}) of a ring of ``slots`` entries."""
    return step % slots, (step - 1) % slots, (step - 2) % slots


def multistep_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    step: int,
    prediction: int,
    clip: float,
    history: torch.Tensor,
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """The fused multistep step in plain PyTorch (the oracle of ``ddim_fast::multistep_step``).

    coef: (S, 6) table (MULTISTEP_COLUMNS); step: its row; prediction: 0/1/2 = epsilon/v/x0;
    clip > 0 clamps x0; history: (H, *x.shape) float32 ring of x0-predictions, H in {1, 2, 3}:
    x0_k is written to slot step % H, and x0_{k-1} (H >= 2) and x0_{k-2} (H = 3) are read from
    the slots before it; a term whose coefficient is 0 is not read (the ring may hold anything
    there, NaN included: the first step reads nothing). out: x_next (float32); x0_out: optional
    copy of x0_k. No host synchronisation (capturable). ``compute_dtype=float64`` is the test oracle.
    """
    row = coef[step].to(compute_dtype)
    sa_t, s1m_t, c_x, c_0, c_1, c_2 = row.unbind(0)
    xf = x.to(compute_dtype)
    m = model_out.to(compute_dtype)
    if prediction == 0:
        x0 = (xf - s1m_t * m) / sa_t
    elif prediction == 1:
        x0 = sa_t * xf - s1m_t * m
    elif prediction == 2:
        x0 = m
    else:
        raise ValueError(f"prediction: expected 0 (epsilon), 1 (v) or 2 (x0), got {prediction!r}")
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    H = history.shape[0]
    w, p1, p2 = history_slots(step, H)
    zero = torch.zeros((), dtype=compute_dtype, device=x.device)
    x_next = c_x * xf + c_0 * x0
    if H >= 2:
        x_next = x_next + torch.where(c_1 != 0, c_1 * history[p1].to(compute_dtype), zero)
    if H >= 3:
        x_next = x_next + torch.where(c_2 != 0, c_2 * history[p2].to(compute_dtype), zero)
    out.copy_(x_next)
    history[w].copy_(x0)
    if x0_out is not None:
        x0_out.copy_(x0)
