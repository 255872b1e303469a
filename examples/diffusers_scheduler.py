"""ddim_fast's fused step inside a diffusers pipeline: swap the scheduler in one line.

    python examples/diffusers_scheduler.py

Any pipeline that takes a scheduler (DDIMPipeline, DDPMPipeline, StableDiffusionPipeline, ...)
runs with ``FusedScheduler``:

    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)                       # the same sampler
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config, solver="unipc", skip="logsnr")

The first reproduces the pipeline's own DDIM/DDPM/DPM-Solver++/UniPC loop (same images, to
float32 rounding, for the deterministic ones); the second is any ddim_fast solver on any spacing.
The UNet here is randomly initialised (no downloads); for a real model use
``DDIMPipeline.from_pretrained(local_dir)`` or ``StableDiffusionPipeline.from_pretrained(local_dir)``.
"""

import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

from ddim_fast import FusedScheduler


def build_unet(size: int = 16) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def images(pipe, steps: int, seed: int, batch_size: int = 2, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                   output_type="np", **kw).images
    return torch.from_numpy(out)


def same_sampler(pipe, steps: int, seed: int = 0, **kw) -> float:
    """max |images with the pipeline's scheduler - images with FusedScheduler from its config|."""
    theirs = images(pipe, steps, seed, **kw)
    own = pipe.scheduler
    pipe.scheduler = FusedScheduler.from_config(own.config)
    try:
        ours = images(pipe, steps, seed, **kw)
    finally:
        pipe.scheduler = own
    return (ours - theirs).abs().max().item()


def main(size: int = 16, steps: int = 20) -> dict:
    unet = build_unet(size)
    ddim = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    # DDPMPipeline keeps the scheduler it is given (DDIMPipeline would convert a DPM-Solver to DDIM).
    dpm = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
    for pipe in (ddim, dpm):
        pipe.set_progress_bar_config(disable=True)
    diffs = {"DDIMPipeline, eta=0": same_sampler(ddim, steps, eta=0.0), "DPM-Solver++(2M)": same_sampler(dpm, steps)}
    for name, diff in diffs.items():
        print(f"{name}: {steps} steps, max |FusedScheduler - diffusers| = {diff:.2e}")

    # Another solver and spacing, by name: UniPC on timesteps uniform in log-SNR, 10 model calls.
    ddim.scheduler = FusedScheduler.from_config(ddim.scheduler.config, solver="unipc", skip="logsnr")
    t0 = time.perf_counter()
    fast = images(ddim, 10, seed=0)
    print(f"FusedScheduler(solver='unipc', skip='logsnr'), 10 steps: {time.perf_counter() - t0:.2f}s, images {tuple(fast.shape)}")
    return diffs


if __name__ == "__main__":
    main()
