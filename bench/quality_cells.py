"""Issue 15's quality cells on closed-form Gaussian mixtures: every solver x spacing, tuned
timesteps, and diffusers' schedulers (their own loops), from the same x_T, against the true
distribution. Writes docs/results/quality_mixtures.json (cells checkpointed as they finish).

    OMP_NUM_THREADS=1 nice python bench/quality_cells.py --n 20000 --out docs/results/quality_mixtures.json [--retune]

Measures per cell: ``fd`` = sum_i w_i FD(samples assigned to mode i, N(mu_i, s_i^2 I)) plus the
mode-share error sum_i |share_i - w_i| (``tv``, reported apart), and ``ode`` = RMS distance to
the converged ODE solution from the same x_T (DPM-Solver++(3M) on all 1000 timesteps).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings

import numpy as np
import torch

from ddim_fast import solvers, tune
from ddim_fast.reference import GaussianMixtureEps, fused_step
from ddim_fast.schedule import NoiseSchedule

MIXTURES = {"sharp": 0.05, "medium": 0.15, "broad": 0.4}  # per-mode std; K = 6 modes in D = 8
STEPS = (5, 6, 8, 10, 20)
OURS = [(s, k) for s in ("ddim", "dpmpp_2m", "dpmpp_3m", "ipndm", "ipndm_v", "unipc", "unipc_3")
        for k in ("quad", "logsnr", "karras", "uniform")]  # fmt: skip
TUNED = ("ipndm", "ipndm_v", "unipc", "dpmpp_3m")
# spacing name -> tune_timesteps options: the RMS objective (default) and the per-sample log objective
# (tune._log_rms), whose search takes moves of 16 grid points first and so needs more trials.
TUNINGS = {"tuned": {}, "tuned_log": dict(loss="log", max_trials=120),
           "tuned_log_shift": dict(loss="log", max_trials=120, shift_last=True)}  # + the last call's model timestep
DIFFUSERS = [(name, order, spacing) for name in ("dpm", "unipc", "deis") for order in (2, 3)
             for spacing in ("linspace", "trailing", "karras", "lu") if not (spacing == "lu" and name != "dpm")]  # fmt: skip


def mixture(schedule, std, seed=0, K=6, D=8):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    return GaussianMixtureEps(schedule.alphas_cumprod, means, stds=std)


def run_ours(model, st, tau, x_T, model_tau=None):
    """The float64 reference op along tau; the model told ``model_tau`` (paired with tau) if given."""
    x = x_T.clone()
    R = st.history_slots
    hist = torch.empty((R, *x.shape), dtype=torch.float64) if R else None
    saved = torch.zeros_like(x) if st.uses_saved else None
    told = np.asarray(tau if model_tau is None else model_tau)[::-1].tolist()
    for k, t in enumerate(told):
        m = model(x, torch.full((x.shape[0],), int(t)))
        out = torch.empty_like(x)
        fused_step(x, m, st.table, k, torch.tensor([0, 0]), 0, 0.0, st.history_kind, hist, saved, None, out, None, None,
                   compute_dtype=torch.float64)  # fmt: skip
        x = out
    return x


def diffusers_scheduler(name, order, spacing, S):
    import diffusers

    cls = {"dpm": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler,
           "deis": diffusers.DEISMultistepScheduler}[name]  # fmt: skip
    kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, solver_order=order,
              lower_order_final=True)  # fmt: skip
    if name == "dpm":
        kw.update(algorithm_type="dpmsolver++", final_sigmas_type="zero")
    if spacing in ("linspace", "trailing"):
        kw["timestep_spacing"] = spacing
    elif spacing == "karras":
        kw["use_karras_sigmas"] = True
    elif spacing == "lu":
        kw["use_lu_lambdas"] = True
    sch = cls(**kw)
    sch.set_timesteps(S)
    return sch


def run_diffusers(model, sch, x_T):
    x = x_T.clone()
    for t in sch.timesteps:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def quality(model, x):
    """(weighted per-mode FD, mode-share error) of samples x against the mixture."""
    means, stds, w = model.means, model.stds, model.log_weights.exp()
    D = means.shape[1]
    logp = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1) / stds**2 - D * torch.log(stds) + torch.log(w)
    comp = logp.argmax(1)
    fd, tv = 0.0, 0.0
    for i in range(means.shape[0]):
        xi = x[comp == i]
        share = xi.shape[0] / x.shape[0]
        tv += abs(share - w[i].item())
        if xi.shape[0] < D + 2:
            fd += w[i].item() * float("inf")
            continue
        m, c = xi.mean(0), torch.cov(xi.T)
        s = stds[i].item()
        tr_sqrt = torch.linalg.eigvalsh(c).clamp_min(0).sqrt().sum().item()
        fd += w[i].item() * (((m - means[i]) ** 2).sum().item() + torch.trace(c).item() + D * s * s - 2 * s * tr_sqrt)
    return fd, tv


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--out", default="docs/results/quality_mixtures.json")
    p.add_argument("--tune-batch", type=int, default=256)
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--retune", action="store_true", help="re-tune the tuned cells already in --out (after a tuner change)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    steps = tuple(int(s) for s in args.steps.split(","))
    from _timing import json_cells

    cells, put = json_cells(args.out)
    retuned = set()

    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(args.n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for mname, std in MIXTURES.items():
        model = mixture(schedule, std)
        data = model.sample_data(args.n, generator=torch.Generator().manual_seed(2))
        put(f"{mname}|data|n{args.n}", dict(zip(("fd", "tv"), quality(model, data))))
        full = np.arange(1000)
        conv = run_ours(model, solvers.build("dpmpp_3m", schedule, full), full, x_T)

        def record(key, x, t0, extra=None):
            fd, tv = quality(model, x)
            ode = (x - conv).pow(2).mean().sqrt().item()
            put(key, dict(fd=fd, tv=tv, ode=ode, seconds=round(time.time() - t0, 3), **(extra or {})))

        for S in steps + (50,):
            cfgs = OURS if S != 50 else [("ddim", "quad"), ("ddim", "logsnr"), ("ddim", "uniform")]
            for solver, skip in cfgs:
                key = f"{mname}|ours|{solver}|{skip}|S{S}|n{args.n}"
                if key in cells:
                    continue
                t0 = time.time()
                tau = solvers.timesteps(schedule, S, skip)
                record(key, run_ours(model, solvers.build(solver, schedule, tau), tau, x_T), t0, dict(tau=tau.tolist()))
            if S == 50:
                continue
            for (tuning, options), solver in itertools.product(TUNINGS.items(), TUNED):
                key = f"{mname}|ours|{solver}|{tuning}|S{S}|n{args.n}"
                if key in cells and not (args.retune and key not in retuned):
                    continue
                retuned.add(key)
                t0 = time.time()
                info = {}
                # Tuned on its own batch (seed 7), evaluated on the shared x_T: no overlap.
                tau = tune.tune_timesteps(model, S, (args.tune_batch, 8), schedule, solver, seed=7, progress=False, info=info,
                                          **options)  # fmt: skip
                tau = tau.numpy()
                record(key, run_ours(model, solvers.build(solver, schedule, tau), tau, x_T, info["model_timesteps"]), t0,
                       dict(tau=tau.tolist(), model_timesteps=info["model_timesteps"], tune_seconds=info["seconds"],
                            tune_calls=info["model_calls"], tune_start=info["start"], tune_options=options))  # fmt: skip
            for name, order, spacing in DIFFUSERS:
                key = f"{mname}|diffusers|{name}{order}|{spacing}|S{S}|n{args.n}"
                if key in cells:
                    continue
                t0 = time.time()
                try:
                    sch = diffusers_scheduler(name, order, spacing, S)
                    x = run_diffusers(model, sch, x_T)
                except Exception as e:  # a configuration diffusers refuses
                    put(key, dict(error=f"{type(e).__name__}: {e}"))
                    continue
                record(key, x.double(), t0, dict(tau=sorted(sch.timesteps.tolist())))
        print(mname, "done", file=sys.stderr)


if __name__ == "__main__":
    main()
