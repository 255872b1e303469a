"""Five model calls tuned to your model: timesteps, and the last call's model timestep.

    python examples/tuned_timesteps.py

The model here is a closed-form Gaussian mixture (``ddim_fast.reference.GaussianMixtureEps``:
six narrow modes, std 0.05, in 8 dimensions), so what a sample should look like is known
exactly. ``tune_timesteps`` searches the 5 timesteps for this model and solver against a fine
reference trajectory; with ``shift_last=True`` it also searches the timestep the model is told
at the last call. The tuned file records both, and ``load_tuned(..., with_model_timesteps=True)``
gives them back for ``FusedSampler``. Printed: how much of each mode's width the samples keep
(1 is right; the last x0-prediction from a coarse timestep shrinks it) and the mode shares' error.
"""

import os
import tempfile

import torch

import ddim_fast
from ddim_fast import FusedSampler, NoiseSchedule
from ddim_fast.reference import GaussianMixtureEps
from ddim_fast.tune import load_tuned, save_tuned

STD = 0.05


def mixture(schedule: NoiseSchedule):
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixtureEps(schedule.alphas_cumprod, means, stds=STD), means


def judge(x: torch.Tensor, means: torch.Tensor) -> dict:
    """Each mode's width kept (RMS distance to the nearest mean / STD) and the mode shares' error."""
    x = x.double()
    dist = torch.cdist(x, means)
    nearest = dist.argmin(1)
    inside = dist.min(1).values < 0.5
    width = float((x - means[nearest])[inside].pow(2).mean().sqrt()) / STD
    shares = torch.bincount(nearest, minlength=len(means)).double() / len(x)
    return {"width kept": round(width, 3), "share error": round(float((shares - 1 / len(means)).abs().sum()), 3)}


def main(n: int = 4000) -> dict:
    schedule = NoiseSchedule.linear(1000)
    model, means = mixture(schedule)
    results = {}
    ddim = FusedSampler(model, schedule, steps=20, skip="quad", backend="torch", precision="fp32")
    results["ddim, quad, S = 20"] = judge(ddim.sample(shape=(n, 8), seed=1), means)
    with tempfile.TemporaryDirectory() as tmp:
        for shift in (False, True):
            info = {}
            tau = ddim_fast.tune_timesteps(model, 5, (256, 8), schedule, solver="ipndm", seed=7, loss="log", shift_last=shift,
                                           info=info, progress=False)
            path = os.path.join(tmp, "steps.json")
            save_tuned(path, tau, model=model, schedule=schedule, solver="ipndm", steps=5, info=info,
                       model_timesteps=info["model_timesteps"])
            tau, told = load_tuned(path, schedule=schedule, solver="ipndm", with_model_timesteps=True)
            sampler = FusedSampler(model, schedule, steps=5, skip=tau, solver="ipndm", model_timesteps=told, backend="torch",
                                   precision="fp32")
            name = f"ipndm, tuned, S = 5{', last call shifted' if shift else ''}"
            results[name] = {**judge(sampler.sample(shape=(n, 8), seed=1), means), "timesteps": tau.tolist(),
                             "model told": told.tolist()}
    return results


if __name__ == "__main__":
    for name, row in main().items():
        print(f"{name}: {row}")
