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
# Inputs of the one fused step op (the C++ and Triton kernels' tests share them)
# ---------------------------------------------------------------------------------------------
STEP_KINDS = ("ddim", "ddim_eta0.5", "ddim_eta1", "ddpm_large", "encode", "dpmpp_2m", "dpmpp_3m", "synthetic", "synthetic_ring")
OP_ARGS = ("x", "model_out", "table", "step", "seed", "prediction", "clip", "history_kind", "history", "saved", "noise",
           "out", "x0_out", "flags")  # fmt: skip


def solver_table(kind="ddim", steps=10):
    """The float64 ``SolverTable`` of a step kind (STEP_KINDS) on a linear T=1000 schedule.

    DDIM kinds use "uniform" timesteps, the multistep ones "logsnr"; "synthetic" is a random
    4-row table that uses every column (c_saved, d_*, three eps-history terms, sigma);
    "synthetic_ring" the same without the saved state (c_saved = d_* = 0: a ring of 3 eps, all
    three read, so the slot written is also read, and noise)."""
    from ddim_fast import layout, solvers
    from ddim_fast.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear(1000)
    if kind in ("synthetic", "synthetic_ring"):
        g = torch.Generator().manual_seed(7)
        t = torch.randn((4, layout.NUM_COLUMNS), generator=g, dtype=torch.float64) * 0.5
        sa = torch.rand(4, generator=g, dtype=torch.float64) * 0.6 + 0.3
        t[:, layout.SQRT_ALPHA], t[:, layout.SQRT_ONE_MINUS_ALPHA] = sa, (1 - sa**2).sqrt()
        if kind == "synthetic_ring":
            t[:, layout.C_SAVED] = 0.0
            t[:, layout.D_X :] = 0.0
        return solvers.SolverTable(t, layout.HISTORY_KINDS["eps"])
    if kind == "encode":
        return solvers.ddim_inversion(schedule, solvers.timesteps(schedule, steps, "uniform"))
    if kind in ("dpmpp_2m", "dpmpp_3m"):
        return solvers.build(kind, schedule, solvers.logsnr_timesteps(schedule, steps))
    eta = {"ddim": 0.0, "ddim_eta0.5": 0.5, "ddim_eta1": 1.0, "ddpm_large": "ddpm_large"}[kind]
    return solvers.build("ddim", schedule, solvers.timesteps(schedule, steps, "uniform"), eta)


def step_seed(seed=1234, offset=0, device="cpu"):
    """The op's (2,) int64 seed tensor: (seed, sample offset)."""
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def make_step_args(kind="ddim", shape=(2, 3, 4), *, prediction="epsilon", dtype=torch.float32, clip=0.0, step=None,
                   steps=10, noise=False, x0_out=True, flags=True, seed=1234, offset=0, data_seed=0, device="cpu"):  # fmt: skip
    """The 14 arguments of ``ddim_fast::step`` (minus backend) as a dict, for one row of ``kind``.

    step defaults to the middle row (every history term of 2M/3M in use); the ring (when the
    table has one) holds normals in the slots this row reads and NaN in every other slot, as an
    uninitialised ``torch.empty`` ring would, so a kernel that reads an unused term fails; out
    and x0_out are NaN-filled; noise=True passes explicit normals instead of the Philox stream.
    """
    from ddim_fast import layout

    st = solver_table(kind, steps)
    S = st.steps
    step = S // 2 if step is None else step
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g).to(dtype)
    R = st.history_slots
    history = None
    if R:
        history = torch.full((R, *shape), float("nan"))
        row = st.table[step]
        for j in range(1, min(layout.HISTORY_TERMS, R) + 1):
            if row[layout.C_H + j - 1] != 0 or row[layout.D_H + j - 1] != 0:
                history[(step - j) % R] = torch.randn(shape, generator=g)
    saved = torch.randn(shape, generator=g) if st.uses_saved else None
    z = torch.randn(shape, generator=g) if noise else None
    args = dict(
        x=x, model_out=m, table=st.table.to(torch.float32), step=step, seed=step_seed(seed, offset), prediction=layout.PREDICTIONS[prediction],
        clip=float(clip), history_kind=st.history_kind, history=history, saved=saved, noise=z,
        out=torch.full(shape, float("nan")), x0_out=torch.full(shape, float("nan")) if x0_out else None,
        flags=torch.zeros((S, 2), dtype=torch.int32) if flags else None,
    )  # fmt: skip
    return {k: (v.to(device).contiguous() if torch.is_tensor(v) else v) for k, v in args.items()}


def copy_step_args(args):
    """A copy whose tensors are fresh (``out is x`` in-place aliasing is kept)."""
    new = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    if args["out"] is args["x"]:
        new["out"] = new["x"]
    return new


def step_outputs(args):
    """(out, x0_out, history, saved, flags) of an argument dict after the op ran."""
    return tuple(args[k] for k in ("out", "x0_out", "history", "saved", "flags"))


def reference_result(args, compute_dtype=torch.float64):
    """(out, x0_out, history, saved, flags) of ``reference.fused_step`` on copies of ``args``, in
    ``compute_dtype`` (float64: the oracle; float32: PyTorch's own float32 result)."""
    from ddim_fast import reference

    a = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    for k in ("out", "x0_out", "history", "saved"):
        if a[k] is not None:
            a[k] = a[k].to(compute_dtype)
    reference.fused_step(*(a[k] for k in OP_ARGS), compute_dtype=compute_dtype)
    return step_outputs(a)


def run_op(fn, args):
    """Runs ``fn(*the 14 args)`` on a copy of ``args``; returns (out, x0_out, history, saved, flags)."""
    a = copy_step_args(args)
    fn(*(a[k] for k in OP_ARGS))
    return step_outputs(a)


def assert_step_close(actual, args, what="step"):
    """Each output of ``actual`` (from ``run_op``) within 2x PyTorch's own float32 error of the
    float64 reference (floored at one float32 ulp of the largest value); flags exactly equal."""
    expected = reference_result(args, torch.float64)
    torch32 = reference_result(args, torch.float32)
    names = ("out", "x0_out", "history", "saved", "flags")
    for name, a, e, t in zip(names, actual, expected, torch32):
        if e is None:
            assert a is None, f"{what}: {name} is {a!r}, expected None"
            continue
        if name == "flags":
            assert torch.equal(a.cpu(), e.cpu()), f"{what}: flags {a.tolist()} != {e.tolist()}"
            continue
        e64, t64 = e.double().cpu(), t.double().cpu()
        finite = torch.isfinite(e64)
        assert torch.equal(torch.isfinite(a.double().cpu()), finite), f"{what}: {name} is non-finite in other places than the reference"
        e_f, t_f = torch.where(finite, e64, 0), torch.where(finite, t64, 0)
        torch_err = (t_f - e_f).abs().max().item() if e_f.numel() else 0.0
        ulp = torch.finfo(torch.float32).eps * (e_f.abs().max().item() if e_f.numel() else 0.0)
        assert_close(torch.where(finite, a.double().cpu(), 0), e_f, atol=2 * max(torch_err, ulp), what=f"{what}: {name}")


def tiny_unet():
    """A seeded diffusers UNet2DModel of 8x8 RGB with attention: a real pipeline model in milliseconds."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
