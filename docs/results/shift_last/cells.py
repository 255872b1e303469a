"""Issue 15: timesteps tuned with the last call's model timestep (tune_timesteps(shift_last=True)), against
today's tuner, on the closed-form mixtures; ratios to DDIM quad S = 20 on the same 20,000 x_T.

Run from this folder, one thread: python cells.py MIXTURE SOLVER S LOSS SEEDS (e.g. sharp unipc 5 log 0,7,8).
One JSON line per result on stdout.
"""
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench"))
import torch  # noqa: E402

torch.set_num_threads(1)
from ddim_fast import solvers, tune  # noqa: E402
from ddim_fast.schedule import NoiseSchedule  # noqa: E402
from quality_cells import MIXTURES, mixture, quality, run_ours  # noqa: E402

SCHED = NoiseSchedule.linear(1000)
D = 8


def score(model, x, std):
    fd, tv = quality(model, x)
    return fd / (D * std**2) + tv


def main():
    mname, solver, S, loss, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    std = MIXTURES[mname]
    model = mixture(SCHED, std)
    xT = torch.randn(20000, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tau = solvers.timesteps(SCHED, 20, "quad")
    ref = score(model, run_ours(model, solvers.build("ddim", SCHED, tau), tau, xT), std)
    for seed in [int(s) for s in seeds.split(",")]:
        for shift in (True, False):
            t0, info = time.time(), {}
            tau = tune.tune_timesteps(model, S, (256, D), SCHED, solver, seed=seed, progress=False, loss=loss, shift_last=shift,
                                      info=info).numpy()
            told = dict(zip(tau.tolist(), info["model_timesteps"]))
            sc = score(model, run_ours(lambda x, t: model(x, torch.full_like(t, told[int(t[0])])),
                                       solvers.build(solver, SCHED, tau), tau, xT), std)
            print(json.dumps(dict(mixture=mname, solver=solver, S=S, loss=loss, seed=seed, shift=shift, tau=tau.tolist(),
                                  model_t=info["model_timesteps"], score=sc, ratio=sc / ref, tune_err=info["error_after"],
                                  calls=info["model_calls"], sec=round(time.time() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
