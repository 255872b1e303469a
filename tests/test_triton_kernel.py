"""The Triton fused step (kernels/ddim_step.py) against the PyTorch reference, on CPU tensors.

The kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here, before anything
imports triton (the decision is taken when the @triton.jit decorators run). Tensors are small:
the interpreter executes every program in numpy, one after another.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton and of the kernels

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import functools

from _utils import assert_close, good_step_args, run_step as _run, step_inputs, step_seed, step_table32
from ddim_fast import reference
from ddim_fast.kernels import ddim_step as K
from ddim_fast.schedule import NoiseSchedule, inverse_step_table, select_timesteps

DEVICE = torch.device("cpu") if K.is_interpreted() else torch.device("cuda")
_table = functools.partial(step_table32, device=DEVICE)
_seed = functools.partial(step_seed, device=DEVICE)
_inputs = functools.partial(step_inputs, device=DEVICE)
_good_args = functools.partial(good_step_args, device=DEVICE)
pytestmark = pytest.mark.skipif(
    not K.is_interpreted() and not torch.cuda.is_available(),
    reason="ddim_fast.kernels.ddim_step was imported before TRITON_INTERPRET=1 and there is no GPU "
    "(test_kernels_are_interpreted fails to say so)",
)

SHAPES = [(3, 5, 33), (1, 1), (2, 3, 16, 16)]
PREDICTIONS = ["epsilon", "v", "x0"]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps










def _worst(actual, expected):
    """(max abs error, message naming the worst element)."""
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    i = int(torch.argmax(err))
    idx = tuple(int(v) for v in np.unravel_index(i, tuple(err.shape)))
    a, e = actual.reshape(-1)[i].item(), expected.reshape(-1)[i].item()
    return err.max().item(), f"worst at {idx}: {a:.8g} vs {e:.8g}"


def _assert_within_pytorch_error(kernel, inputs, what):
    """The kernel's error vs the float64 oracle is at most 2x PyTorch's own error in the input dtype.

    PyTorch's own error: ``reference.fused_step`` computed in the model output's dtype (bf16 /
    fp16 arithmetic, or fp32), the FlashAttention rule. Two float32 ulps of the output's scale
    are allowed on top, for the rounding of the float32 output itself.
    """
    dtype = inputs["m"].dtype
    args = (inputs["x"], inputs["m"], inputs["coef"], inputs["step"], inputs["seed"], inputs["prediction"])
    rest = (inputs["clip"], inputs["stochastic"], inputs.get("noise"))
    oracle = _run(reference.fused_step, *args, *rest, dtype=torch.float64, compute_dtype=torch.float64)
    torch_own = _run(reference.fused_step, *args, *rest, compute_dtype=dtype)
    for name, k, o, p in zip(("x_prev", "x0"), kernel, oracle, torch_own):
        err_k, where = _worst(k, o)
        err_pt, _ = _worst(p, o)
        bound = 2 * err_pt + 2 * EPS32 * o.abs().max().item()
        assert err_k <= bound, f"{what} {name}: kernel error {err_k:.3e} > 2 x PyTorch {dtype} error {err_pt:.3e}; {where}"


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------


def test_kernels_are_interpreted():
    assert K.is_interpreted() or torch.cuda.is_available(), (
        "the Triton kernels were compiled for a GPU but there is none: TRITON_INTERPRET=1 must be "
        "set before ddim_fast.kernels.ddim_step is first imported"
    )
    assert (K.STREAM_X_T, K.STREAM_STEP) == (reference.STREAM_X_T, reference.STREAM_STEP)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["sigma0", "sigma"])
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_reference(shape, prediction, clip, stochastic, dtype):
    coef = _table(eta=1.0)
    x, m = _inputs(shape, dtype)
    seed = _seed(987654321987, offset=2)
    for step in (0, 4, coef.shape[0] - 1):  # noisiest row (sqrt(a_t) = 0.07), a middle one, the last (a_prev = 1)
        got = _run(K.fused_step, x, m, coef, step, seed, prediction, clip, stochastic)
        ref = _run(reference.fused_step, x, m, coef, step, seed, prediction, clip, stochastic)
        what = f"step {step}"
        if not stochastic and K.is_interpreted():  # the same IEEE float32 operations in the same order
            for name, a, e in zip(("x_prev", "x0"), got, ref):
                assert torch.equal(a, e), f"{what} {name} not bitwise the reference's: {_worst(a, e)[1]}"
        # z may differ by an ulp (numpy vs torch log/cos); compiled code may differ in the last bits.
        assert_close(got[0], ref[0], atol=4e-6, rtol=4 * EPS32, what=f"{what} x_prev")
        assert_close(got[1], ref[1], atol=0.0, rtol=2 * EPS32, what=f"{what} x0")
        inputs = dict(x=x, m=m, coef=coef, step=step, seed=seed, prediction=prediction, clip=clip, stochastic=stochastic)
        _assert_within_pytorch_error(got, inputs, what)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_inverse_step_matches_reference(prediction):
    """Encoding: the same kernel with schedule.inverse_step_table (x0 models are undefined on its
    first row, where sqrt(1 - alpha_cur) = 0, in the reference too)."""
    tau = select_timesteps(1000, 10, "uniform")
    coef = inverse_step_table(NoiseSchedule.linear(1000), tau).to(torch.float32)
    x, m = _inputs((3, 5, 33))
    for step in range(coef.shape[0]):
        got = _run(K.fused_step, x, m, coef, step, _seed(), prediction, 0.0, False)
        ref = _run(reference.fused_step, x, m, coef, step, _seed(), prediction, 0.0, False)
        assert_close(got[0], ref[0], atol=1e-6, rtol=4 * EPS32, what=f"inverse step {step} x_next")
        assert_close(got[1], ref[1], atol=0.0, rtol=2 * EPS32, what=f"inverse step {step} x0")


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float16], ids=str)
def test_explicit_noise(noise_dtype):
    coef = _table()
    x, m = _inputs((3, 5, 33))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(noise_dtype)
    got = _run(K.fused_step, x, m, coef, 2, _seed(), "epsilon", 0.0, True, noise=noise)
    ref = _run(reference.fused_step, x, m, coef, 2, _seed(), "epsilon", 0.0, True, noise=noise)
    assert_close(got[0], ref[0], atol=1e-6, rtol=4 * EPS32, what="x_prev with explicit noise")
    # Passing the reference's own Philox noise explicitly gives the in-kernel draw.
    z = reference.gaussian(1234, x.shape, step=2, stream=reference.STREAM_STEP)
    explicit = _run(K.fused_step, x, m, coef, 2, _seed(), "epsilon", 0.0, True, noise=z)
    in_kernel = _run(K.fused_step, x, m, coef, 2, _seed(), "epsilon", 0.0, True)
    sigma = coef[2, 4].item()
    assert_close(in_kernel[0], explicit[0], atol=1e-6 * sigma + 1e-6, what="in-kernel vs explicit Philox noise")


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_x(x_dtype):
    coef = _table()
    x, m = _inputs((2, 3, 16, 16), torch.float16)
    x = x.to(x_dtype)
    got = _run(K.fused_step, x, m, coef, 3, _seed(), "v", 0.0, True)
    ref = _run(reference.fused_step, x, m, coef, 3, _seed(), "v", 0.0, True)
    assert_close(got[0], ref[0], atol=4e-6, rtol=4 * EPS32, what=f"{x_dtype} x")


def test_noncontiguous_inputs_and_outputs():
    coef = _table()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 33, 3, generator=g).permute(0, 2, 1)  # (5, 3, 33), not contiguous
    m = torch.randn(5, 3, 66, generator=g)[..., ::2]  # strided
    noise = torch.randn(3, 33, 5, generator=g).permute(2, 0, 1)
    out = torch.zeros(5, 3, 33, 2)[..., 0]  # the kernel writes a temporary, then copies into it
    x0_out = torch.zeros(3, 33, 5).permute(2, 0, 1)
    for z in (None, noise):
        K.fused_step(x, m, coef, 1, _seed(), 1, 1.5, True, z, out, x0_out)
        ref = _run(reference.fused_step, x.contiguous(), m.contiguous(), coef, 1, _seed(), "v", 1.5, True, noise=z)
        assert_close(out, ref[0], atol=4e-6, rtol=4 * EPS32, what="non-contiguous x_prev")
        assert_close(x0_out, ref[1], atol=0.0, rtol=2 * EPS32, what="non-contiguous x0")
    # a non-contiguous table row stride
    wide = torch.zeros(coef.shape[0], 10)
    wide[:, ::2] = coef
    out2 = torch.empty(5, 3, 33)
    K.fused_step(x, m, wide[:, ::2], 1, _seed(), 1, 1.5, False, None, out2, None)
    ref = _run(reference.fused_step, x, m, coef, 1, _seed(), "v", 1.5, False)
    assert_close(out2, ref[0], atol=4e-6, rtol=4 * EPS32, what="strided table")


def test_out_may_alias_x():
    coef = _table()
    x, m = _inputs((3, 5, 33))
    ref = _run(reference.fused_step, x, m, coef, 4, _seed(), "epsilon", 0.0, True, x0=False)
    x_inplace = x.clone()
    K.fused_step(x_inplace, m, coef, 4, _seed(), 0, 0.0, True, None, x_inplace, None)
    assert_close(x_inplace, ref[0], atol=4e-6, rtol=4 * EPS32, what="in-place x_prev")


def test_empty_batch_is_a_no_op():
    coef = _table()
    x = torch.empty(0, 3, 4)
    K.fused_step(x, x, coef, 0, _seed(), 0, 0.0, True, None, torch.empty(0, 3, 4), None)


# --------------------------------------------------------------------------------------------
# the noise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, shape, step, stream, offset",
    [
        (0, (1, 1), 0, 0, 0),
        (1234, (3, 5, 33), 7, 1, 5),
        (2**40 + 17, (2, 3, 16, 16), 999, 1, 0),  # the key's high word in use
        (2**63 - 1, (4, 7), 2**32 - 1, 0, 2**32 - 2),  # largest seed, step; sample index wraps at 2^32
    ],
)
def test_noise_matches_reference(seed, shape, step, stream, offset):
    z = K.triton_gaussian(seed, shape, step=step, stream=stream, sample_offset=offset, device=DEVICE)
    z_ref = reference.gaussian(seed, shape, step=step, stream=stream, sample_offset=offset)
    assert_close(z, z_ref, atol=1e-6, what=f"z(seed={seed}, step={step}, stream={stream}, offset={offset})")


@triton.jit
def _randn4x_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    g = tl.arange(0, BLOCK)
    z0, z1, z2, z3 = tl.randn4x(seed, g)
    tl.store(out_ptr + 4 * g, z0)
    tl.store(out_ptr + 4 * g + 1, z1)
    tl.store(out_ptr + 4 * g + 2, z2)
    tl.store(out_ptr + 4 * g + 3, z3)


@pytest.mark.parametrize("seed", [0, 31337, 2**40 + 5])
def test_contract_is_tl_randn4x(seed):
    """Sample 0, step 0, stream 0 of the contract are Triton's own randn4x at offsets 0, 1, 2, ..."""
    out = torch.empty(64, device=DEVICE)
    _randn4x_kernel[(1,)](out, seed, BLOCK=16)
    assert_close(out[None], K.triton_gaussian(seed, (1, 64), stream=0, device=DEVICE), atol=1e-6, what="randn4x vs kernel")
    assert_close(out[None], reference.gaussian(seed, (1, 64), stream=0), atol=1e-6, what="randn4x vs reference")


def test_in_kernel_noise_matches_reference():
    """Pure noise through the step: a row (1, 1, 1, 0, sigma = 1) makes x_prev = x0 + z = x + z."""
    coef = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    x = torch.zeros(3, 5, 33)
    got, _ = _run(K.fused_step, x, x, coef, 0, _seed(55, 9), "epsilon", 0.0, True, x0=False)
    z_ref = reference.gaussian(55, x.shape, step=0, stream=reference.STREAM_STEP, sample_offset=9)
    assert_close(got, z_ref, atol=1e-6, what="in-kernel z")


def test_sample_is_independent_of_batch():
    """Sample i is the same drawn in a batch of 7, alone (offset i), or in a batch of 2 at offset 5."""
    coef = _table()
    x7, m7 = _inputs((7, 3, 5, 11))
    batch, _ = _run(K.fused_step, x7, m7, coef, 3, _seed(77, 0), "epsilon", 0.0, True, x0=False)
    for i in range(7):
        alone, _ = _run(K.fused_step, x7[i : i + 1], m7[i : i + 1], coef, 3, _seed(77, i), "epsilon", 0.0, True, x0=False)
        assert torch.equal(alone[0], batch[i]), f"sample {i} alone differs: {_worst(alone[0], batch[i])[1]}"
    at5, _ = _run(K.fused_step, x7[5:], m7[5:], coef, 3, _seed(77, 5), "epsilon", 0.0, True, x0=False)
    assert torch.equal(at5, batch[5:]), f"samples 5, 6 at offset 5 differ: {_worst(at5, batch[5:])[1]}"
    z7 = K.triton_gaussian(77, (7, 3, 5, 11), stream=reference.STREAM_X_T, device=DEVICE)
    z1 = K.triton_gaussian(77, (1, 3, 5, 11), stream=reference.STREAM_X_T, sample_offset=4, device=DEVICE)
    assert torch.equal(z1[0], z7[4]), f"x_T of sample 4 differs: {_worst(z1[0], z7[4])[1]}"


def test_seed_is_read_from_device_memory():
    """Overwriting the seed tensor in place changes the draw (what a replayed CUDA graph relies on)."""
    coef = _table()
    x, m = _inputs((2, 3, 16))
    seed = _seed(1, 0)
    first, _ = _run(K.fused_step, x, m, coef, 0, seed, "epsilon", 0.0, True, x0=False)
    seed.copy_(torch.tensor([2, 0]))
    second, _ = _run(K.fused_step, x, m, coef, 0, seed, "epsilon", 0.0, True, x0=False)
    seed.copy_(torch.tensor([1, 1]))
    shifted, _ = _run(K.fused_step, x[1:], m[1:], coef, 0, seed, "epsilon", 0.0, True, x0=False)
    assert not torch.equal(first, second)
    assert_close(second, _run(reference.fused_step, x, m, coef, 0, _seed(2, 0), "epsilon", 0.0, True, x0=False)[0], atol=4e-6)
    assert torch.equal(shifted[0], first[1]), "the sample offset was not read from the seed tensor"
    z = K.triton_gaussian(_seed(9, 3), (2, 8), sample_offset=1)  # tensor seed: offsets add up
    assert_close(z, reference.gaussian(9, (2, 8), sample_offset=4), atol=1e-6, what="z with a tensor seed")


# --------------------------------------------------------------------------------------------
# validation: clear errors from the launcher, never from inside the kernel
# --------------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_out=torch.zeros(2, 3, 5)), "model_out: expected shape"),
        (dict(out=torch.zeros(2, 3, 4, dtype=torch.float16)), "out: expected a float32"),
        (dict(x0_out=torch.zeros(2, 12)), "x0_out: expected shape"),
        (dict(noise=torch.zeros(3, 3, 4)), "noise: expected shape"),
        (dict(model_out=torch.zeros(2, 3, 4, dtype=torch.int32)), "model_out: expected float32, float16"),
        (dict(coef=torch.zeros(10, 4)), r"coef: expected the \(S, 5\) float32"),
        (dict(coef=torch.zeros(10, 5, dtype=torch.float64)), r"coef: expected the \(S, 5\) float32"),
        (dict(step=10), r"step: expected an integer row of the table in \[0, 10\)"),
        (dict(step=-1), "step: expected an integer row"),
        (dict(prediction=3), "prediction: expected 0"),
        (dict(seed=torch.tensor([1, 2], dtype=torch.int32)), "seed: expected an int64 tensor"),
        (dict(seed=torch.tensor([1], dtype=torch.int64)), "seed: expected an int64 tensor"),
        (dict(x=torch.tensor(1.0)), "x: expected a tensor with a leading batch dimension"),
    ],
)
def test_invalid_arguments_raise_clearly(change, message):
    args = {**_good_args(), **change}
    with pytest.raises(ValueError, match=message):
        K.fused_step(**args)


def test_gaussian_invalid_arguments():
    with pytest.raises(ValueError, match="seed: expected an integer"):
        K.triton_gaussian(-1, (1, 4), device=DEVICE)
    with pytest.raises(ValueError, match="shape: expected at least a batch dimension"):
        K.triton_gaussian(0, (), device=DEVICE)


# --------------------------------------------------------------------------------------------
# the torch.library op
# --------------------------------------------------------------------------------------------


def _op_args(backend, x0_out=True, noise=False):
    x, m = _inputs((2, 3, 5))
    z = torch.randn(x.shape) if noise else None
    x0 = torch.empty(x.shape) if x0_out else None
    return (x, m, _table(), 3, _seed(), 1, 1.0, True, z, torch.empty(x.shape), x0, backend)


@pytest.mark.parametrize("x0_out, noise", [(True, False), (False, True)], ids=["x0_out", "noise"])
def test_op_triton_backend_passes_opcheck(x0_out, noise):
    from ddim_fast import ops  # noqa: F401 -- registers torch.ops.ddim_fast.step

    args = _op_args("triton", x0_out, noise)
    torch.library.opcheck(torch.ops.ddim_fast.step.default, args)
    torch.ops.ddim_fast.step(*args)
    ref = _run(reference.fused_step, *args[:3], 3, args[4], "v", 1.0, True, noise=args[8], x0=x0_out)
    assert_close(args[9], ref[0], atol=4e-6, rtol=4 * EPS32, what="op(backend='triton') x_prev")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_under_torch_compile_fullgraph(backend):
    """The opaque custom op as one graph node (~5 s to compile the first, cold inductor cache, 2 cores)."""
    from ddim_fast import ops  # noqa: F401

    def sample_step(x, m, coef, seed):
        out = torch.empty_like(x)
        x0 = torch.empty_like(x)
        torch.ops.ddim_fast.step(x, m, coef, 4, seed, 0, 1.0, True, None, out, x0, backend)
        return out, x0

    torch._dynamo.reset()
    x, m = _inputs((2, 3, 16))
    compiled = torch.compile(sample_step, fullgraph=True)
    got = compiled(x, m, _table(), _seed(5, 1))
    ref = _run(reference.fused_step, x, m, _table(), 4, _seed(5, 1), "epsilon", 1.0, True)
    assert_close(got[0], ref[0], atol=4e-6, rtol=4 * EPS32, what=f"compiled op({backend}) x_prev")
    assert_close(got[1], ref[1], atol=0.0, rtol=2 * EPS32, what=f"compiled op({backend}) x0")


@pytest.mark.parametrize("prediction, clip_x0", [("epsilon", None), ("v", 1.0)])
def test_sampler_triton_equals_torch_backend(prediction, clip_x0, monkeypatch):
    """A full FusedSampler run (x_T from the seed, eta = 0.7) and an encode, kernel vs reference."""
    from ddim_fast import FusedSampler

    launches = []
    launch = K.fused_step
    monkeypatch.setattr(K, "fused_step", lambda *a: launches.append(1) or launch(*a))

    def model(x, t):  # deterministic, depends on x and t
        return torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / 2000)

    results = {}
    for backend in ("torch", "triton"):
        sampler = FusedSampler(
            model, steps=8, eta=0.7, prediction=prediction, clip_x0=clip_x0, precision="fp32", backend=backend
        )
        sample = sampler.sample(shape=(2, 3, 8, 8), seed=11, device=DEVICE)
        results[backend] = (sample, sampler.encode(sample, eta=0))
    assert len(launches) == 2 * 8, "backend='triton' did not run the Triton kernel at every step"
    for i, what in enumerate(("sample", "encode")):
        assert_close(results["triton"][i], results["torch"][i], atol=1e-5, rtol=1e-5, what=f"{what}, triton vs torch")


# --------------------------------------------------------------------------------------------
# compiled mode, without a GPU: the kernel lowers to PTX for sm_90
# --------------------------------------------------------------------------------------------

_AOT = textwrap.dedent(
    """
    import re, sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ddim_fast.kernels import ddim_step as K
    assert not K.is_interpreted()
    sig = dict(x_ptr="*fp32", m_ptr="*fp16", noise_ptr="*fp32", out_ptr="*fp32", x0_ptr="*fp32",
               coef_ptr="*fp32", coef_stride_row="i32", coef_stride_col="i32", seed_ptr="*i64",
               step="i32", batch_start="i32", D="i32", clip="fp32")
    const = dict(PREDICTION=0, HAS_CLIP=True, STOCHASTIC=True, HAS_NOISE=False, HAS_X0_OUT=False,
                 STREAM=1, BLOCK=K.MAX_GROUPS)
    names = list(sig) + list(const)
    sig.update({k: "constexpr" for k in const})
    aligned = ["x_ptr", "m_ptr", "out_ptr", "seed_ptr", "coef_ptr", "D"]  # as a launch with D % 16 == 0 sees them
    src = ASTSource(fn=K._ddim_step_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False))
    ptx = ck.asm["ptx"]
    count = lambda p: len(re.findall(p, ptx))
    print(ck.metadata.shared, count(r"ld\\.global\\.v4\\.b32"), count(r"ld\\.global\\.v2\\.b32"),
          count(r"st\\.global\\.v4\\.b32"), count(r"mul\\.hi\\.u32"), count(r"fma\\.rn\\.f32"), count(r"div\\.rn\\.f32"))
    """
)


def test_kernel_compiles_for_sm90_with_vector_loads():
    """Compiled mode cannot run here, but it can be compiled: the (BLOCK, 4) tile with a column
    select lowers without shared memory, with 128-bit fp32 loads/stores (8 elements per thread
    at BLOCK = 256 groups and 4 warps), one Philox (2 x 10 mulhi) per group, and no FMA."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas for the CUDA target")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared, v4_fp32, v2_fp16x2, v4_store, mulhi, fma, div = map(int, proc.stdout.split()[-7:])
    assert shared == 0, "the noise tile went through shared memory"
    assert v4_fp32 == 2 and v2_fp16x2 == 2 and v4_store == 2, proc.stdout
    assert mulhi <= 2 * 10 * 2, f"{mulhi} mulhi for 2 groups per thread: Philox is not shared by 4 outputs"
    assert fma == 0 and div == 2 * 4, proc.stdout
