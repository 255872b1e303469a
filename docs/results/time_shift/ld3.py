"""Hybrid recipe (hybrid.py / seedcheck.py) with a choice of how the model's noise level is decoupled.
variant: rescale = previous (x_hat = sqrt(a'/a) x, eps scaled; continuous closed form),
         ld3     = LD3-style, x unchanged, eps used as is, continuous sigma' (closed form),
         ld3i    = LD3-style, integer t' through the model itself (nearest integer to sigma').
Usage: python ld3.py MIXTURE SOLVER S VARIANT SEED[,SEED..] [--starts tuned_log,logsnr] [--batch 256]"""
import json, sys, time
from common import *

mname, solver, S, variant = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
seeds = [int(s) for s in sys.argv[5].split(",")]
opt = dict(zip(sys.argv[6::2], sys.argv[7::2]))
starts_names = opt.get("--starts", "tuned_log").split(","); batch = int(opt.get("--batch", 256))
std = MIXTURES[mname]; m = mixture(SCHED, std)
xt_eval = eval_xT(); ref_eval = reference_ode(m, xt_eval)
xt_ho = tune_xT(1024, seed=12345); ref_ho = reference_ode(m, xt_ho)   # held-out batch for selection
base = json.load(open("baseline.json")); d20 = base[f"{mname}|ddim|quad|S20"]["score"][0]
cand = np.union1d(solvers.logsnr_timesteps(SCHED, 80), solvers.karras_timesteps(SCHED, 80))
RMS, LOG = LOSS["rms"], LOSS["log"]
S2 = ((1 - ACP) / ACP).numpy(); AR = np.arange(1000)
NL = [0]  # loss evaluations on the tuning batch (each = S model calls on the batch)


def tprime_of(t, uk):
    if uk == 0.0: return int(t)
    return int(np.clip(round(float(np.interp(sig2_of(t) * math.exp(2 * uk), S2, AR))), 0, 999))


def run_var(tau, x_T, u):
    st = solvers.build(solver, SCHED, tau)
    if variant == "rescale": return run_shift(m, st, tau, x_T, u=u)
    x = x_T.clone(); R = st.history_slots
    hist = torch.empty((R, *x.shape), dtype=torch.float64) if R else None
    saved = torch.zeros_like(x) if st.uses_saved else None
    for k, t in enumerate(np.asarray(tau)[::-1].tolist()):
        uk = float(u[k])
        if uk == 0.0:
            e = m(x, torch.full((x.shape[0],), int(t)))
        elif variant == "ld3i":
            e = m(x, torch.full((x.shape[0],), tprime_of(t, uk)))
        else:  # ld3 continuous: the model's eps at noise level sigma', same x
            sp2 = sig2_of(t) * math.exp(2 * uk); ap = 1 / (1 + sp2)
            x0p = x0_cont(m, x / math.sqrt(ap), sp2); e = (x - math.sqrt(ap) * x0p) / math.sqrt(1 - ap)
        out = torch.empty_like(x)
        fused_step(x, e, st.table, k, torch.tensor([0, 0]), 0, 0.0, st.history_kind, hist, saved, None, out, None, None,
                   compute_dtype=torch.float64)
        x = out
    return x


def loss(tau, u, fn):
    NL[0] += 1; return fn(run_var(tau, xt_tune, u), ref_tune)


exec(open("recipe.py").read())

for sd in seeds:
    xt_tune = tune_xT(batch, seed=sd); ref_tune = reference_ode(m, xt_tune)
    t0 = time.time(); info = {}
    tau_l = tune.tune_timesteps(m, S, (batch, 8), SCHED, solver, seed=sd, progress=False, loss="log", info=info).numpy()
    t_tune = time.time() - t0
    for sn in starts_names:
        tau = tau_l if sn == "tuned_log" else solvers.timesteps(SCHED, S, sn)
        t1 = time.time(); n1 = NL[0]
        evaluate(f"{sd}|{sn}|as is", tau, np.zeros(S))
        NL[0] = n1
        u, e = best_last_u(tau, np.zeros(S)); tauJ, uJ, eJ = cd_tau(tau, u, e)
        evaluate(f"{sd}|{sn}|joint", tauJ, uJ, count=False)
        uH = uJ.copy()
        for _ in range(2):
            uH, _ = cd_u(tauJ, uH, RMS, which=range(S - 1)); uH, _ = best_last_u(tauJ, uH, LOG)
        dt = time.time() - t1; nl = NL[0] - n1
        evaluate(f"{sd}|{sn}|hybrid", tauJ, uH, extra=dict(sec=round(dt, 1), loss_evals=nl, batch_model_calls=nl * S,
                 tune_sec=round(t_tune, 1), tune_info={k: v for k, v in info.items() if isinstance(v, (int, float))}))
