"""ddim_fast: a fused DDIM sampler (Song, Meng & Ermon, ICLR 2021) for PyTorch diffusion models.

    from ddim_fast import FusedSampler, NoiseSchedule
    sampler = FusedSampler(model, schedule=NoiseSchedule.linear(1000), steps=50, eta=0.0)
    images = sampler.sample(shape=(64, 3, 32, 32), seed=0)

The public names are imported on first use, so ``import ddim_fast.solvers`` (or the kernels)
does not pull in the sampler, and ``FusedScheduler`` imports diffusers only when it is used.
"""

import importlib

__all__ = ["FusedSampler", "FusedScheduler", "NoiseSchedule", "Trajectory", "slerp", "tune_timesteps"]
__version__ = "0.2.0"

_WHERE = {
    "FusedSampler": "ddim_fast.sampler",
    "Trajectory": "ddim_fast.trajectory",
    "slerp": "ddim_fast.sampler",
    "NoiseSchedule": "ddim_fast.schedule",
    "FusedScheduler": "ddim_fast.scheduler",
    "tune_timesteps": "ddim_fast.tune",
}


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddim_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
