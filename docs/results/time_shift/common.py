"""Issue 15 helper experiment: decouple the model's noise level from the solver's timestep.

Run from this folder (docs/results/time_shift); the library is only imported. Logs and JSON land here.
"""
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, "/work/main/bench")
sys.path.insert(0, "/work/main")

import numpy as np
import torch

torch.set_num_threads(1)

from ddim_fast import reference, solvers, tune, layout  # noqa: E402
from ddim_fast.reference import fused_step  # noqa: E402
from ddim_fast.schedule import NoiseSchedule  # noqa: E402
from quality_cells import MIXTURES, mixture, quality, run_ours  # noqa: E402

SCHED = NoiseSchedule.linear(1000)
ACP = SCHED.alphas_cumprod.double()
D = 8


def score(model, x, std):
    fd, tv = quality(model, x)
    return fd / (D * std**2) + tv, fd / (D * std**2), tv


def x0_cont(model, y, sig2):
    """Closed-form posterior mean E[x0 | x0 + sigma n = y] of the mixture, any sigma^2 > 0 (float)."""
    s2 = model.stds**2  # (K,)
    var = s2 + sig2  # (K,)
    diff = y[:, None, :] - model.means[None]  # (B,K,D)
    logp = model.log_weights[None] - 0.5 * (diff**2).sum(-1) / var[None] - 0.5 * D * torch.log(var)[None]
    r = torch.softmax(logp, 1)[..., None]
    return (r * (model.means[None] + (s2 / var)[None, :, None] * diff)).sum(1)


def sig2_of(t):
    a = float(ACP[int(t)])
    return (1 - a) / a


def run_shift(model, st, tau, x_T, u=None, tprime=None):
    """The solver `st` on `tau` (increasing), its k-th call (noisiest first) evaluated at another noise level.

    u: per call (noisiest first) log(sigma'_k / sigma_k), continuous (closed-form posterior mean);
    tprime: per call an integer model timestep (None = the solver's own), via the model itself.
    The solver receives eps = (x - sqrt(a_k) x0') / sqrt(1 - a_k), x0' the shifted x0-prediction,
    so every solver (x0- or eps-history) sees the shifted denoiser consistently.
    """
    x = x_T.clone()
    R = st.history_slots
    hist = torch.empty((R, *x.shape), dtype=torch.float64) if R else None
    saved = torch.zeros_like(x) if st.uses_saved else None
    td = np.asarray(tau)[::-1].tolist()
    for k, t in enumerate(td):
        a = float(ACP[int(t)])
        uk = 0.0 if u is None else float(u[k])
        tp = None if tprime is None else tprime[k]
        if tp is not None and int(tp) != int(t):
            ap = float(ACP[int(tp)])
            xh = x * math.sqrt(ap / a)
            e = model(xh, torch.full((x.shape[0],), int(tp)))
            x0p = (xh - math.sqrt(1 - ap) * e) / math.sqrt(ap)
            m = (x - math.sqrt(a) * x0p) / math.sqrt(1 - a)
        elif uk != 0.0:
            sig2 = (1 - a) / a * math.exp(2 * uk)
            x0p = x0_cont(model, x / math.sqrt(a), sig2)
            m = (x - math.sqrt(a) * x0p) / math.sqrt(1 - a)
        else:
            m = model(x, torch.full((x.shape[0],), int(t)))
        out = torch.empty_like(x)
        fused_step(x, m, st.table, k, torch.tensor([0, 0]), 0, 0.0, st.history_kind, hist, saved, None, out, None, None,
                   compute_dtype=torch.float64)
        x = out
    return x


def reference_ode(model, x_T):
    full = np.arange(1000)
    return run_ours(model, solvers.build("dpmpp_3m", SCHED, full), full, x_T)


def tune_xT(batch=256, seed=7):
    return reference.gaussian(seed, (batch, D), step=0, stream=layout.STREAM_X_T).double()


def eval_xT(n=20000):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


LOSS = {"rms": lambda a, b: tune._rms(a, b), "log": lambda a, b: tune._log_rms(a, b)}
