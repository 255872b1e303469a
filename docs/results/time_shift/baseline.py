"""Baselines: DDIM quad S=20 and the library's tuned cells, n=20000 eval x_T (seed 1), tuning batch 256 (seed 7)."""
import json, time
from common import *
out = {}
xT = eval_xT()
cells = [("sharp", "unipc", 5), ("sharp", "unipc", 6), ("sharp", "ipndm_v", 5), ("medium", "unipc", 5), ("medium", "ipndm", 5),
         ("broad", "unipc", 5), ("broad", "ipndm", 5)]
for mname, std in MIXTURES.items():
    m = mixture(SCHED, std)
    tau = solvers.timesteps(SCHED, 20, "quad")
    x = run_ours(m, solvers.build("ddim", SCHED, tau), tau, xT)
    out[f"{mname}|ddim|quad|S20"] = dict(score=score(m, x, std), tau=tau.tolist())
    print(mname, "ddim quad S20", out[f"{mname}|ddim|quad|S20"], flush=True)
for mname, solver, S in cells:
    std = MIXTURES[mname]; m = mixture(SCHED, std)
    for loss in ("rms", "log"):
        t0 = time.time(); info = {}
        tau = tune.tune_timesteps(m, S, (256, 8), SCHED, solver, seed=7, progress=False, info=info, loss=loss,
                                  **(dict(max_trials=120) if loss == "log" else {})).numpy()
        x = run_ours(m, solvers.build(solver, SCHED, tau), tau, xT)
        key = f"{mname}|{solver}|tuned_{loss}|S{S}"
        out[key] = dict(score=score(m, x, std), tau=tau.tolist(), tune_err=info["error_after"], sec=time.time() - t0)
        print(key, out[key], flush=True)
json.dump(out, open("baseline.json", "w"), indent=1)
