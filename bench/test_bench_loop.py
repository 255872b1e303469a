"""The sampler's own cost per step (issue 13): a model that costs nothing, 64x3x32x32 fp32, S = 50.

Run: ``pytest bench/test_bench_loop.py --benchmark-only``. ``FusedSampler.sample`` wall time / S is
compared, in interleaved rounds of the same test, with (a) diffusers' ``DDIMScheduler.step`` loop on
the same model (eta 0 and eta 1; issue 13's target: >= 10x) and (b) one
``torch.add(x, e, alpha=, out=)`` per step (eta 0; target: <= 2x). Ratios go to ``extra_info``
and the terminal summary, with the thread count they were measured at (``torch.get_num_threads()``:
OMP_NUM_THREADS, else one per core; run it at 1 and at the default); nothing here asserts a speed.
"""

import statistics

import pytest
import torch

from _timing import interleaved_seconds, paired_ratio
from ddim_fast import FusedSampler, NoiseSchedule, ops

SHAPE, S, ROUNDS = (64, 3, 32, 32), 50, 15


class NullModel(torch.nn.Module):
    """Returns one preallocated tensor: the loop's cost is all that is timed."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("eps", 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t):
        return self.eps


def _diffusers_loop(scheduler, model, x_T, eta, generator):
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_cost_per_step(benchmark, report_ratio, eta):
    from diffusers import DDIMScheduler

    model = NullModel(SHAPE)
    sampler = FusedSampler(model, NoiseSchedule.linear(1000), steps=S, eta=eta, precision="fp32")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading",
                              steps_offset=0, set_alpha_to_one=True, clip_sample=False)  # fmt: skip
    scheduler.set_timesteps(S)
    assert torch.equal(sampler.timesteps, scheduler.timesteps)
    x_T = torch.randn(SHAPE)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ours, theirs = sampler.sample(x_T, seed=0), _diffusers_loop(scheduler, model, x_T, eta, generator)
    if eta == 0:  # the same trajectory, so both loops do the same work
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    e, buf = model.eps, torch.empty(SHAPE)

    def adds():
        for _ in range(S):
            torch.add(x_T, e, alpha=0.5, out=buf)

    benchmark.group = f"loop cost per step, null model, 64x3x32x32 S={S} ({torch.get_num_threads()} threads)"
    benchmark.pedantic(lambda: sampler.sample(x_T, seed=0), rounds=5, warmup_rounds=1)
    if benchmark.stats is None:
        return
    with torch.inference_mode():
        times = interleaved_seconds(
            {"ours": lambda: sampler.sample(x_T, seed=0),
             "diffusers": lambda: _diffusers_loop(scheduler, model, x_T, eta, generator), "torch_add": adds},
            rounds=ROUNDS, warmup=2,
        )  # fmt: skip
    per_step_us = {k: 1e6 * statistics.median(v) / S for k, v in times.items()}
    vs_diffusers = paired_ratio(times, "diffusers", "ours")
    vs_add = paired_ratio(times, "ours", "torch_add")  # > 1: ours costs more than one add
    benchmark.extra_info.update({
        "backend_auto_cpu": ops.resolve_backend("auto", "cpu"), "threads": torch.get_num_threads(), "rounds": ROUNDS,
        "us_per_step": per_step_us,
        "speedup_vs_diffusers_step_loop": vs_diffusers, "ours_per_step_over_one_torch_add": vs_add,
        "steps_per_s": 1e6 / per_step_us["ours"],
    })  # fmt: skip
    report_ratio(f"null model 64x3x32x32 S={S} eta={eta}, {torch.get_num_threads()} threads: ours {per_step_us['ours']:.1f} us/step, "
                 f"{vs_diffusers:.1f}x diffusers' step loop ({per_step_us['diffusers']:.1f} us), "
                 f"{vs_add:.2f}x one torch.add ({per_step_us['torch_add']:.1f} us); median of {ROUNDS} paired rounds")  # fmt: skip
