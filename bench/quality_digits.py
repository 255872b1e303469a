"""Issue 15's digits cells: Frechet distance (ddim_fast.metrics, the digit classifier's features)
of n samples per cell from the embedded model, every cell from the same x_T (sample i of seed 0),
ours (solver x spacing, tuned) and diffusers' schedulers in their own loops. Cells are
checkpointed to JSON as they finish, so the run can be stopped and resumed.

    OMP_NUM_THREADS=1 nice python bench/quality_digits.py --n 1000 --out docs/results/quality_digits.json
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from ddim_fast import FusedSampler, layout, metrics, reference, tune
from ddim_fast.train import load_model

# The configurations that lead on the mixtures (docs/results/quality.md); the CPU budget of a
# shared 2-core machine (~3.5 s per call of batch 500) does not fit every cell.
OURS = [("ipndm", "logsnr"), ("ipndm", "quad"), ("ipndm", "tuned"), ("unipc", "logsnr"), ("unipc", "quad"),
        ("dpmpp_3m", "logsnr"), ("ipndm_v", "quad"), ("unipc", "tuned"), ("unipc", "tuned_log"),
        ("unipc", "tuned_shift"), ("ipndm", "tuned_log_shift"), ("unipc", "tuned_log_shift"),
        ("ipndm", "tuned_shift")]  # fmt: skip  (*_shift: shift_last=True)
DIFFUSERS = [("dpm", 2, "karras"), ("dpm", 3, "linspace"), ("unipc", 2, "linspace"), ("deis", 3, "linspace")]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", default="5,6,8,10")
    p.add_argument("--tune-batch", type=int, default=32)
    p.add_argument("--tune-trials", type=int, default=40)
    p.add_argument("--tune-seed", type=int, default=1, help="the tuning batch's seed (the cells in docs/results: 1)")
    p.add_argument("--out", default="docs/results/quality_digits.json")
    p.add_argument("--only", default=None, help='run only these cells, e.g. "ddim|quad|S20,unipc|quad|S8" (ours)')
    p.add_argument("--tuned-from", default=None, help="reuse the tuned timesteps recorded in this JSON (same solver and S)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from quality_cells import diffusers_scheduler

    from ddim_fast.experiments.driver import image_shape, quantize

    model, schedule = load_model()
    C, H, W = image_shape(model)
    from _timing import json_cells

    cells, put = json_cells(args.out)

    x_T_all = reference.gaussian(0, (args.n, C, H, W), stream=layout.STREAM_X_T)

    def batched(fn):
        out = []
        with torch.inference_mode():
            for i in range(0, args.n, args.batch):
                out.append(fn(x_T_all[i : i + args.batch]))
        return torch.cat(out)

    def record(key, fn, extra):
        t0 = time.time()
        x = batched(fn)
        fd = metrics.frechet_distance_images(quantize(x))  # as saved uint8 images, like Table 1
        put(key, dict(fd=fd, seconds=round(time.time() - t0, 1), **extra))
        print(key, round(fd, 3), flush=True)

    steps = [int(s) for s in args.steps.split(",")]
    only = None if args.only is None else set(args.only.split(","))
    tuned_from = {}
    if args.tuned_from:
        import json

        for k, v in json.load(open(args.tuned_from)).items():
            parts = k.split("|")
            if parts[0] == "ours" and parts[2] == "tuned" and "tau" in v:
                tuned_from[(parts[1], parts[3])] = v["tau"]

    def wanted(solver, skip, S):
        return only is None or f"{solver}|{skip}|S{S}" in only

    for S in (20, 50):
        key = f"ours|ddim|quad|S{S}|n{args.n}"
        if key not in cells and wanted("ddim", "quad", S):
            s = FusedSampler(model, schedule, steps=S, skip="quad", precision="fp32")
            record(key, s.sample, dict(tau=np.sort(s.timesteps.numpy()).tolist()))
    for S in steps:
        for solver, skip in [("ddim", "quad")] + OURS:
            key = f"ours|{solver}|{skip}|S{S}|n{args.n}"
            if key in cells or not wanted(solver, skip, S):
                continue
            extra = {}
            if skip == "tuned" and (solver, f"S{S}") in tuned_from:
                skip_arg = np.array(tuned_from[(solver, f"S{S}")])
                extra = dict(tuned_from=args.tuned_from)
            elif skip in ("tuned", "tuned_log", "tuned_shift", "tuned_log_shift"):
                info = {}
                loss = "log" if "log" in skip else "rms"
                tau = tune.tune_timesteps(model, S, (args.tune_batch, C, H, W), schedule, solver, seed=args.tune_seed, info=info,
                                          progress=False,
                                          max_trials=args.tune_trials if loss == "rms" else 3 * args.tune_trials, loss=loss,
                                          shift_last=skip.endswith("_shift"))  # fmt: skip
                skip_arg = tau.numpy()
                extra = dict(tune_seconds=info["seconds"], tune_start=info["start"], tune_calls=info["model_calls"],
                             model_timesteps=info["model_timesteps"])  # fmt: skip
            else:
                skip_arg = skip
            told = extra.get("model_timesteps")
            s = FusedSampler(model, schedule, steps=S, skip=skip_arg, solver=solver, precision="fp32", model_timesteps=told)
            record(key, s.sample, dict(tau=np.sort(s.timesteps.numpy()).tolist(), **extra))
        for name, order, spacing in DIFFUSERS:
            key = f"diffusers|{name}{order}|{spacing}|S{S}|n{args.n}"
            if key in cells or not wanted(f"diffusers-{name}{order}", spacing, S):
                continue

            def run(x, name=name, order=order, spacing=spacing):
                sch = diffusers_scheduler(name, order, spacing, S)
                for t in sch.timesteps:
                    x = sch.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
                return x

            record(key, run, dict(tau=sorted(diffusers_scheduler(name, order, spacing, S).timesteps.tolist())))


if __name__ == "__main__":
    main()
