"""ddim_fast: a fused DDIM sampler (Song, Meng & Ermon, ICLR 2021) for PyTorch diffusion models.

    from ddim_fast import FusedSampler, NoiseSchedule
    sampler = FusedSampler(model, schedule=NoiseSchedule.linear(1000), steps=50, eta=0.0)
    images = sampler.sample(shape=(64, 3, 32, 32), seed=0)
"""

from ddim_fast.schedule import NoiseSchedule
from ddim_fast.sampler import FusedSampler, Trajectory, slerp

__all__ = ["FusedSampler", "NoiseSchedule", "Trajectory", "slerp"]
__version__ = "0.1.0"
