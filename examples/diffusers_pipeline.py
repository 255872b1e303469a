"""Replace the sampling loop of a diffusers DDPMPipeline with ddim_fast.

    python examples/diffusers_pipeline.py

A diffusers user keeps the UNet and scheduler they trained with and swaps the pipeline's loop
for one line: ``FusedSampler.from_diffusers(pipe, steps=S)``. With ``steps = T`` and
``eta = 1`` it *is* the pipeline's ancestral DDPM loop (same noise in, same image out); with
``steps = 50`` and ``eta = 0`` it is the usual 20x faster DDIM. The UNet here is randomly
initialised (no downloads); use ``DDPMPipeline.from_pretrained(local_dir)`` for a real one.

Difference to know: with ``clip_sample=True`` diffusers' DDPMScheduler re-derives epsilon from
the clipped x0, while ddim_fast (like DDIMScheduler's default) keeps the model's epsilon; the
two loops then differ wherever clipping is active. This example disables clipping.
"""

import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddim_fast import FusedSampler


def build_pipeline(T: int = 1000, size: int = 16) -> DDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=T, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_noise(pipe: DDPMPipeline, batch_size: int, seed: int):
    """x_T and the per-step noise exactly as DDPMPipeline draws them from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x_T = torch.randn(shape, generator=g)
    T = pipe.scheduler.config.num_train_timesteps
    noise = torch.zeros((T, *shape))
    for k in range(T - 1):  # DDPMScheduler draws for every t > 0, noisiest first; t = 0 adds none
        noise[k] = torch.randn(shape, generator=g)
    return x_T, noise


def run_pipeline(pipe: DDPMPipeline, batch_size: int, seed: int) -> torch.Tensor:
    """The pipeline's own loop (images in [0, 1], NCHW)."""
    g = torch.Generator().manual_seed(seed)
    T = pipe.scheduler.config.num_train_timesteps
    with torch.no_grad():
        return pipe(batch_size=batch_size, generator=g, num_inference_steps=T, output_type="pt").images


def run_fused(pipe: DDPMPipeline, batch_size: int, seed: int) -> torch.Tensor:
    """The same images from ddim_fast: ancestral DDPM is eta = 1 along every training timestep."""
    x_T, noise = pipeline_noise(pipe, batch_size, seed)
    T = pipe.scheduler.config.num_train_timesteps
    sampler = FusedSampler.from_diffusers(pipe, steps=T, eta=1.0, precision="fp32")
    return (sampler.sample(x_T, noise=noise) / 2 + 0.5).clamp(0, 1)


def main(T: int = 1000, batch_size: int = 4) -> float:
    pipe = build_pipeline(T)
    t0 = time.perf_counter()
    theirs = run_pipeline(pipe, batch_size, seed=0)
    t1 = time.perf_counter()
    ours = run_fused(pipe, batch_size, seed=0)
    t2 = time.perf_counter()
    diff = (ours - theirs).abs().max().item()
    print(f"DDPMPipeline loop: {t1 - t0:.2f}s   FusedSampler (same noise): {t2 - t1:.2f}s   max |diff| = {diff:.2e}")
    fast = FusedSampler.from_diffusers(pipe, steps=50, eta=0.0)
    t3 = time.perf_counter()
    fast.sample(shape=(batch_size, 3, 16, 16), seed=0)
    print(f"DDIM, 50 steps: {time.perf_counter() - t3:.2f}s")
    return diff


if __name__ == "__main__":
    main()
