"""Small helpers shared by the tests."""

import numpy as np
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "tensor"):
    """torch.testing-style check whose message names the worst element (xformers' habit)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    excess = err - tol
    if excess.numel() and excess.max() > 0:
        idx = np.unravel_index(int(torch.argmax(excess)), tuple(err.shape))
        raise AssertionError(
            f"{what}: max abs error {err.max().item():.3e} (atol={atol:g}, rtol={rtol:g}); worst at {tuple(int(i) for i in idx)}: "
            f"actual {actual[idx].item():.8g} vs expected {expected[idx].item():.8g}"
        )


class EagerReplayCapturer:
    """Stands in for CUDA graphs on the CPU: 'capture' records the loop, 'replay' reruns it eagerly
    on the same static buffers, so everything but the CUDA calls themselves is exercised."""

    device_types = frozenset({"cpu"})

    def __init__(self, fail_with=None):
        self.fail_with = fail_with
        self.warmups = self.captures = self.replays = 0

    def warmup(self, fn):
        self.warmups += 1
        fn()

    def capture(self, fn):
        self.captures += 1
        if self.fail_with is not None:
            raise self.fail_with

        def replay():
            self.replays += 1
            fn()

        return replay


class TinyConvModel(torch.nn.Module):
    """A 3-channel epsilon model in one 3x3 convolution, timestep-dependent: a real conv module
    (the sampler's channels_last and autocast paths apply to it) that runs in microseconds."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t.float()[:, None, None, None] / 1000)


# ---------------------------------------------------------------------------------------------
# Inputs of the fused DDIM step op (the C++ and Triton kernels' tests share them)
# ---------------------------------------------------------------------------------------------
def step_table32(eta=1.0, steps=10, device="cpu"):
    """The float32 (S, 5) table of a linear T=1000 schedule (sigma > 0 on every row but the last)."""
    from ddim_fast.schedule import NoiseSchedule, select_timesteps, step_table as table64

    tau = select_timesteps(1000, steps, "uniform")
    return table64(NoiseSchedule.linear(1000), tau, eta).to(torch.float32).to(device)


def step_seed(seed=1234, offset=0, device="cpu"):
    """The op's (2,) int64 seed tensor: (seed, sample offset)."""
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def step_inputs(shape, dtype=torch.float32, seed=0, device="cpu"):
    """x (float32) and a model output (``dtype``), standard normal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g)
    return x.to(device), m.to(dtype).to(device)


def run_step(impl, x, m, coef, step, seed, prediction, clip, stochastic, noise=None, x0=True, dtype=torch.float32, **kw):
    """(x_prev, x0_pred) written by ``impl`` (the op's signature) into fresh NaN-filled buffers of ``dtype``."""
    from ddim_fast import reference

    out = torch.full(x.shape, float("nan"), dtype=dtype, device=x.device)
    x0_out = torch.full_like(out, float("nan")) if x0 else None
    impl(x, m, coef, step, seed, reference.PREDICTIONS[prediction], clip, stochastic, noise, out, x0_out, **kw)
    return out, x0_out


def good_step_args(device="cpu"):
    """A valid argument set of the op (2x3x4), for tests that break one argument at a time."""
    x, m = step_inputs((2, 3, 4), device=device)
    return dict(
        x=x, model_out=m, coef=step_table32(device=device), step=0, seed=step_seed(device=device), prediction=0, clip=0.0,
        stochastic=True, noise=None, out=torch.empty(2, 3, 4, device=device), x0_out=None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inputs of the fused multistep op (the C++ and Triton multistep tests share them)
# ---------------------------------------------------------------------------------------------
def multistep_table32(solver, S=10, schedule=None, device="cpu"):
    """The float32 (S, 6) multistep table of ``solver`` on log-SNR timesteps (linear T=1000 schedule by default)."""
    from ddim_fast import NoiseSchedule, solvers

    schedule = schedule or NoiseSchedule.linear(1000)
    tau = solvers.logsnr_timesteps(schedule, S)
    return solvers.multistep_table(schedule, tau, solver).to(torch.float32).to(device)


def good_multistep_args(device="cpu"):
    """A valid argument set of the multistep op (2x3x4, dpmpp_2m), for tests that break one argument at a time."""
    return dict(
        x=torch.randn(2, 3, 4, device=device), model_out=torch.randn(2, 3, 4, device=device),
        coef=multistep_table32("dpmpp_2m", device=device), step=0, prediction=0, clip=0.0,
        history=torch.zeros(2, 2, 3, 4, device=device), out=torch.empty(2, 3, 4, device=device), x0_out=None,
    )  # fmt: skip
