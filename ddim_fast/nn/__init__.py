"""Training-time model code: the DDPM/DDIM UNet."""

from ddim_fast.nn.unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding"]
