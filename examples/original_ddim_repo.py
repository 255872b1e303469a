"""Replace ``generalized_steps`` in a repository written like the original DDIM code.

    python examples/original_ddim_repo.py

Research repos in the style of ermongroup/ddim call ``model(x, t)`` with a *float* timestep
tensor, keep betas in a config, and sample with ``generalized_steps(x, seq, model, b, eta)``.
The replacement is three lines (see ``fused_generalized_steps``): wrap the model so it gets the
float t it expects, build the schedule from the same betas, and give ``seq`` as tau.
"""

import math
import time

import numpy as np
import torch

from ddim_fast import FusedSampler, NoiseSchedule

CONFIG = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000}


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """The original code's schedule helper (the linear case)."""
    if beta_schedule != "linear":
        raise NotImplementedError(beta_schedule)
    return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)


class StandInModel(torch.nn.Module):
    """A small stand-in for the repo's UNet with its call convention: model(x, t) with float t."""

    def __init__(self, ch: int = 3):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(ch, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, ch, 3, padding=1)
        self.temb = torch.nn.Linear(16, 32)

    def forward(self, x, t):
        assert t.dtype == torch.float32, "this repo's model expects a float timestep"
        half = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float32) / 8)
        emb = torch.cat([torch.sin(t[:, None] * half), torch.cos(t[:, None] * half)], dim=1)
        h = torch.nn.functional.silu(self.conv1(x) + self.temb(emb)[:, :, None, None])
        return 0.5 * torch.tanh(self.conv2(h))


def compute_alpha(beta, t):
    beta = torch.cat([torch.zeros(1).to(beta.device), beta], dim=0)
    return (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)


def generalized_steps(x, seq, model, b, eta=0.0, noise=None):
    """The original code's sampler (functions/denoising.py), with an optional noise list for testing."""
    with torch.no_grad():
        n = x.size(0)
        seq_next = [-1] + list(seq[:-1])
        x0_preds, xs = [], [x]
        for k, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
            t = torch.ones(n) * i
            next_t = torch.ones(n) * j
            at = compute_alpha(b, t.long())
            at_next = compute_alpha(b, next_t.long())
            xt = xs[-1]
            et = model(xt, t)
            x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
            x0_preds.append(x0_t)
            c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
            c2 = ((1 - at_next) - c1**2).sqrt()
            z = torch.randn_like(x) if noise is None else noise[k]
            xs.append(at_next.sqrt() * x0_t + c1 * z + c2 * et)
    return xs, x0_preds


def fused_generalized_steps(x, seq, model, b, eta=0.0, noise=None):
    """The drop-in replacement: same arguments, returns the final sample."""
    sampler = FusedSampler(
        lambda x_t, t: model(x_t, t.float()),  # the repo's model wants a float t
        NoiseSchedule.from_betas(b),
        skip=sorted(set(int(s) for s in seq)),
        eta=eta,
        precision="fp32",
    )
    return sampler.sample(x, noise=noise)


def main(steps: int = 50, batch_size: int = 8) -> float:
    torch.manual_seed(0)
    model = StandInModel().eval()
    b = torch.from_numpy(get_beta_schedule(**CONFIG)).float()
    seq = list(range(0, CONFIG["num_diffusion_timesteps"], CONFIG["num_diffusion_timesteps"] // steps))
    x = torch.randn(batch_size, 3, 16, 16)
    t0 = time.perf_counter()
    theirs = generalized_steps(x, seq, model, b)[0][-1]
    t1 = time.perf_counter()
    ours = fused_generalized_steps(x, seq, model, b)
    t2 = time.perf_counter()
    diff = (ours - theirs).abs().max().item()
    print(f"generalized_steps: {t1 - t0:.2f}s   FusedSampler: {t2 - t1:.2f}s   max |diff| = {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
