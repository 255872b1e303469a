"""The Triton backend of the one fused step (kernels/ddim_step.py) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports triton (the choice is made when the
@triton.jit decorators run). Tensors are small: the interpreter runs every program in numpy,
one after another. Every step is held to the one numeric rule of issue 13 (``assert_step_close``:
within 2x PyTorch's own float32 error of ``reference.fused_step(..., compute_dtype=float64)``),
and every test calls the Triton launcher (or the op with backend="triton") explicitly.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

from _utils import STEP_KINDS, assert_close, assert_step_close, make_step_args, reference_result, run_op, step_seed
from ddim_fast import layout, ops, reference
from ddim_fast.kernels import ddim_step as K

DEVICE = torch.device("cpu") if K.is_interpreted() else torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not K.is_interpreted() and not torch.cuda.is_available(),
    reason="ddim_fast.kernels.ddim_step was imported before TRITON_INTERPRET=1 and there is no GPU "
    "(test_triton_backend_runs fails to say so)",
)

PREDICTIONS = ["epsilon", "v", "x0"]
SHAPES = [(3, 5, 33), (1, 1), (2, 3, 16, 16)]
STOCHASTIC_KINDS = ["ddim_eta0.5", "ddim_eta1", "ddpm_large", "synthetic"]


def _args(kind, shape=(3, 5, 33), **kw):
    return make_step_args(kind, shape, device=DEVICE, **kw)


def _run(args):
    """(out, x0_out, history, saved, flags) of the Triton launcher on a copy of ``args``."""
    return run_op(K.fused_step, args)


def _solver_table(kind, steps=10):
    from _utils import solver_table

    return solver_table(kind, steps)


def test_triton_backend_runs():
    """The launcher really is Triton's (interpreted here, compiled on a GPU), and the op resolves to it."""
    assert K.is_interpreted() or torch.cuda.is_available(), (
        "the Triton kernels were compiled for a GPU but there is none: TRITON_INTERPRET=1 must be "
        "set before ddim_fast.kernels.ddim_step is first imported (tests/conftest.py)"
    )
    assert type(K._step_kernel).__name__ == ("InterpretedFunction" if K.is_interpreted() else "JITFunction")
    assert ops.resolve_backend("triton", DEVICE) == "triton"
    assert ops._triton_module() is K


# --------------------------------------------------------------------------------------------
# every row kind against the float64 reference
# --------------------------------------------------------------------------------------------


# An x0 model on encode's first row (sqrt(1 - alpha) = 0) divides by 0, in the reference too:
# the non-finite elements must then be the reference's, and numpy (the interpreter) warns.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_row_kind_matches_reference(kind, prediction):
    """DDIM eta 0 / 0.5 / 1 / sigma-hat, encode, 2M, 3M, and a synthetic row using every column
    (c_saved, d_*, three eps-history terms), at the noisiest, a middle and the last row."""
    S = _solver_table(kind).steps
    for step in sorted({0, S // 2, S - 1}):
        args = _args(kind, prediction=prediction, step=step)
        assert_step_close(_run(args), args, what=f"{kind} {prediction} row {step}")


@pytest.mark.parametrize("clip", [1.0, 0.25])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", ["ddim_eta1", "dpmpp_3m", "synthetic"])
def test_clip(kind, prediction, clip):
    """x0 clamped (eps stays the model's), in the output, x0_out and an x0 ring alike."""
    args = _args(kind, prediction=prediction, clip=clip)
    got = _run(args)
    assert float(got[1].abs().max()) <= clip
    assert_step_close(got, args, what=f"{kind} {prediction} clip {clip}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["ddim_eta1", "dpmpp_2m", "synthetic"])
def test_shapes(kind, shape):
    """Samples whose size is not a multiple of 4 or of a program's block, a single element, two programs."""
    args = _args(kind, shape, prediction="v")
    assert_step_close(_run(args), args, what=f"{kind} {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["ddim_eta1", "dpmpp_3m", "synthetic"])
def test_model_output_dtypes(kind, dtype):
    """A model output in fp16/bf16/fp64 is loaded in its dtype and cast (no bf16 arithmetic: the interpreter has none)."""
    for prediction in PREDICTIONS:
        args = _args(kind, prediction=prediction, dtype=dtype)
        assert args["model_out"].dtype == dtype
        assert_step_close(_run(args), args, what=f"{kind} {prediction} {dtype}")


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "dpmpp_3m", "synthetic"])
def test_in_place(kind):
    """out aliasing x: every element is read before it is written, by the same program."""
    args = _args(kind, prediction="x0", clip=1.5)
    args["out"] = args["x"]
    got = _run(args)  # run_op's copy keeps the aliasing; reference_result's does not need it
    assert_step_close(got, args, what=f"{kind} in place")


@pytest.mark.parametrize("kind", STOCHASTIC_KINDS)
def test_explicit_noise(kind):
    args = _args(kind, noise=True)
    assert_step_close(_run(args), args, what=f"{kind} explicit noise")


def test_optional_outputs_are_optional():
    """No x0_out, no flags: nothing else changes."""
    for kind in ("ddim_eta1", "synthetic"):
        args = _args(kind, x0_out=False, flags=False)
        got = _run(args)
        assert got[1] is None and got[4] is None
        assert_step_close(got, args, what=f"{kind} without x0_out and flags")


def test_batches_past_the_grid_limit_are_chunked(monkeypatch):
    """Batches larger than gridDim.y are launched in chunks whose sample index (noise) and offsets
    continue: with the limit lowered to 2, a batch of 5 is 3 launches."""
    launches = []
    kernel = K._step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_MAX_GRID_Y", 2)
    monkeypatch.setattr(K, "_step_kernel", Counting())
    args = _args("synthetic", (5, 3, 7), offset=2**32 - 3)  # the chunks straddle sample 2^32
    assert_step_close(_run(args), args, what="chunked batch")
    assert [g[1] for g in launches] == [2, 2, 1]


def test_empty_batch_is_a_no_op():
    args = _args("ddim_eta1", (0, 3, 4))
    _run(args)


# --------------------------------------------------------------------------------------------
# the ring and the saved state over whole trajectories
# --------------------------------------------------------------------------------------------


def _trajectory(kind, fn, compute_dtype, shape=(2, 3, 9), prediction="epsilon"):
    """All S rows of ``kind`` on one state, ring and saved buffer (NaN-initialised, as torch.empty
    may be), with a deterministic model of x; returns the final (x, ring, saved)."""
    st = _solver_table(kind, 8)
    table = st.table.to(torch.float32).to(DEVICE)
    dt = torch.float32 if compute_dtype is None else compute_dtype
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(DEVICE, dt)
    ring = None
    if st.history_slots:  # a real solver's first rows read no history; the synthetic table's do
        ring = torch.full((st.history_slots, *shape), float("nan"), dtype=dt)
        if kind == "synthetic":
            ring = torch.randn(ring.shape, generator=g).to(dt)
        ring = ring.to(DEVICE)
    saved = torch.randn(shape, generator=g).to(DEVICE, dt) if st.uses_saved else None
    flags = torch.zeros((st.steps, 2), dtype=torch.int32, device=DEVICE)
    seed = step_seed(5, 1, device=DEVICE)
    for k in range(st.steps):
        m = torch.tanh(x) * 0.5 + 0.1 * k  # depends on x and the step
        kw = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
        fn(x, m, table, k, seed, layout.PREDICTIONS[prediction], 0.0, st.history_kind, ring, saved, None, x, None, flags, **kw)
    assert not flags.any(), f"{kind}: a finite trajectory raised flags {flags.tolist()}"
    return x, ring, saved


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("kind", ["dpmpp_2m", "dpmpp_3m", "synthetic"])
def test_trajectory_with_the_ring_matches_reference(kind, prediction):
    """Ring slots (step - j) mod R read and step mod R written across every row (R = 1 for 2M:
    the slot read is the one written), from a ring of NaN: a wrong slot or an unmasked read shows."""
    got = _trajectory(kind, K.fused_step, None, prediction=prediction)
    oracle = _trajectory(kind, reference.fused_step, torch.float64, prediction=prediction)
    torch32 = _trajectory(kind, reference.fused_step, torch.float32, prediction=prediction)
    for name, a, e, t in zip(("x", "ring", "saved"), got, oracle, torch32):
        if e is None:
            continue
        bound = 2 * max(float((t.double() - e).abs().max()), torch.finfo(torch.float32).eps * float(e.abs().max()))
        assert_close(a, e, atol=bound, what=f"{kind} {prediction} trajectory {name} (2x PyTorch float32 error)")


# --------------------------------------------------------------------------------------------
# what is not read, and the finite flags
# --------------------------------------------------------------------------------------------


def _row(**cols):
    t = torch.zeros((1, layout.NUM_COLUMNS), dtype=torch.float32)
    t[0, layout.SQRT_ALPHA] = 0.8
    t[0, layout.SQRT_ONE_MINUS_ALPHA] = 0.6
    for name, v in cols.items():
        t[0, layout.COLUMNS.index(name)] = v
    return t.to(DEVICE)


def test_unused_operands_are_not_read():
    """NaN in a ring slot or saved state whose coefficients are 0 never reaches any output,
    including a slot that only the saved-state update reads (c_h1 = 0, d_h1 != 0)."""
    args = _args("synthetic", (2, 3, 5))
    args["table"] = _row(c_x=0.5, c_x0=0.3, c_eps=0.2, c_h2=0.7, d_x=1.0, d_h1=0.5)
    R = args["history"].shape[0]
    args["history"][:] = float("nan")
    args["history"][(0 - 2) % R] = 1.0  # the one slot x_next reads
    args["history"][(0 - 1) % R] = float("nan")  # read by the saved update only
    args["saved"][:] = float("nan")  # c_saved = d_saved = 0
    args["flags"] = torch.zeros((1, 2), dtype=torch.int32, device=DEVICE)
    args["step"] = 0
    got = _run(args)
    assert torch.isfinite(got[0]).all(), "a NaN of an unused operand leaked into x_next"
    assert torch.isnan(got[3]).all(), "d_h1 != 0 reads its slot (NaN there) into the saved state"
    assert got[4].tolist() == [[0, 0]]
    assert_step_close(got, args, what="unused operands")


def test_noise_only_where_sigma_is_nonzero():
    """sigma = 0 takes no noise branch: explicit noise full of NaN does not reach x_next (0 * NaN
    would), and the seed is irrelevant; with sigma != 0 both matter."""
    for sigma in (0.0, 0.5):
        outs = []
        for s in (1, 2):
            args = _args("ddim", (2, 3, 5), seed=s)
            args["table"] = _row(c_x0=0.9, c_eps=0.4, sigma=sigma)
            args["step"], args["flags"] = 0, None
            outs.append(_run(args)[0])
            args["noise"] = torch.full_like(args["x"], float("nan"))
            assert bool(torch.isfinite(_run(args)[0]).all()) == (sigma == 0), f"sigma {sigma}: NaN noise"
        assert torch.equal(outs[0], outs[1]) == (sigma == 0), f"sigma {sigma}: the seed"
        assert_step_close(_run(args), args, what=f"sigma {sigma} with NaN noise")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf and overflow
@pytest.mark.parametrize(
    "poison, expected",
    [
        ("none", [0, 0]),
        ("model_nan", [1, 1]),
        ("model_inf", [1, 1]),
        ("state_overflow", [0, 1]),  # a finite x of 3e38: x0 = x / sqrt(alpha) overflows
        ("last_element", [1, 1]),  # the masked tail of the last program
    ],
)
def test_finite_flags(poison, expected):
    """flags[step] names a non-finite model output / x_next; the other rows stay untouched."""
    args = _args("ddim_eta1", (3, 5, 33), step=4)
    if poison == "model_nan":
        args["model_out"][1, 2, 7] = float("nan")
    elif poison == "model_inf":
        args["model_out"][0, 0, 0] = float("-inf")
    elif poison == "state_overflow":
        args["x"][2, 4, 32] = 3e38
    elif poison == "last_element":
        args["model_out"][2, 4, 32] = float("nan")
    args["flags"][:] = 0
    args["flags"][0] = 7  # another step's flags: not the kernel's to write
    got = _run(args)
    assert got[4][4].tolist() == expected
    assert got[4][0].tolist() == [7, 7] and not got[4][1:4].any() and not got[4][5:].any()
    ref = reference_result(args, torch.float32)  # float32: in float64, 3e38 / 0.07 is finite
    assert ref[4][4].tolist() == expected  # the reference agrees on what is non-finite


# --------------------------------------------------------------------------------------------
# the noise: reference.gaussian's Philox stream with a 48-bit sample index
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, shape, stream, offset",
    [
        (0, (1, 1), layout.STREAM_X_T, 0),
        (1234, (3, 5, 33), layout.STREAM_STEP, 5),
        (2**40 + 17, (2, 3, 16, 16), layout.STREAM_X_T, 0),  # the key's high word in use
        (2**63 - 1, (4, 7), layout.STREAM_X_T, 2**32 - 2),  # samples 2^32 - 2 .. 2^32 + 1
        (99, (3, 6), layout.STREAM_STEP, 2**40 - 1),  # bit 40 of the sample index
        (7, (2, 5), layout.STREAM_X_T, layout.MAX_SAMPLES - 2),  # the last two sample indices
    ],
)
def test_gaussian_matches_reference(seed, shape, stream, offset):
    z = K.gaussian(seed, shape, stream=stream, sample_offset=offset, device=DEVICE)
    z_ref = reference.gaussian(seed, shape, stream=stream, sample_offset=offset)
    assert_close(z, z_ref, atol=1e-6, what=f"z(seed={seed}, stream={stream}, offset={offset})")


def test_sample_index_has_48_bits():
    """Issue 17 defect 4: sample 2^32 (and 2^40) is not sample 0, on the x_T kernel and in the step."""
    z = {n: K.gaussian(3, (1, 64), stream=layout.STREAM_X_T, sample_offset=n, device=DEVICE) for n in (0, 2**32, 2**40)}
    assert not torch.equal(z[0], z[2**32]) and not torch.equal(z[0], z[2**40]) and not torch.equal(z[2**32], z[2**40])
    for n in (2**32, 2**40 + 3):
        args = _args("ddim", (2, 64), seed=3, offset=n)
        args["table"] = _row(sigma=1.0)  # x_next = z
        args["step"], args["flags"] = 0, None
        expected = reference.gaussian(3, (2, 64), step=0, stream=layout.STREAM_STEP, sample_offset=n)
        assert_close(_run(args)[0], expected, atol=1e-6, what=f"in-kernel z at sample offset {n}")


def test_in_kernel_noise_matches_reference():
    """Pure noise through the step at a later row: x_next = z of (seed, sample, step, STREAM_STEP)."""
    args = _args("ddim", (3, 5, 33), seed=55, offset=9)
    args["table"] = _row(sigma=1.0).repeat(6, 1)
    args["step"], args["flags"] = 5, None
    expected = reference.gaussian(55, (3, 5, 33), step=5, stream=layout.STREAM_STEP, sample_offset=9)
    assert_close(_run(args)[0], expected, atol=1e-6, what="in-kernel z")


def test_sample_is_independent_of_batch():
    """Sample i is the same drawn in a batch of 7, alone (offset i), or in a batch of 2 at offset 5."""
    full = _args("ddim_eta1", (7, 3, 5, 11), seed=77)
    batch = _run(full)[0]
    for lo, hi in [(i, i + 1) for i in range(7)] + [(5, 7)]:
        part = {k: (v[lo:hi] if k in ("x", "model_out", "out", "x0_out") else v) for k, v in full.items()}
        part["seed"] = step_seed(77, lo, device=DEVICE)
        got = _run(part)[0]
        assert torch.equal(got, batch[lo:hi]), f"samples {lo}..{hi - 1} differ from the batch's"
    z7 = K.gaussian(77, (7, 3, 5, 11), stream=layout.STREAM_X_T, sample_offset=0, device=DEVICE)
    z1 = K.gaussian(77, (1, 3, 5, 11), stream=layout.STREAM_X_T, sample_offset=4, device=DEVICE)
    assert torch.equal(z1[0], z7[4])


def test_seed_is_read_from_device_memory():
    """Overwriting the seed tensor in place changes the draw (what a replayed CUDA graph relies on)."""
    args = _args("ddim_eta1", (2, 3, 16), seed=1)
    first = _run(args)[0]
    args["seed"].copy_(torch.tensor([2, 0]))
    second = _run(args)[0]
    assert not torch.equal(first, second)
    assert_step_close(_run(args), args, what="seed 2 written in place")
    z = K.gaussian(step_seed(9, 3, device=DEVICE), (2, 8), stream=layout.STREAM_X_T, sample_offset=1, device=DEVICE)
    assert_close(z, reference.gaussian(9, (2, 8), stream=layout.STREAM_X_T, sample_offset=4), atol=1e-6, what="tensor seed")
    out = torch.full((2, 8), float("nan"), device=DEVICE)
    assert K.gaussian(9, (2, 8), stream=layout.STREAM_X_T, sample_offset=4, device=DEVICE, out=out) is out
    assert torch.equal(out, z)


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
    z = K.gaussian(seed, (1, 64), stream=layout.STREAM_X_T, sample_offset=0, device=DEVICE)
    assert_close(out[None], z, atol=1e-6, what="randn4x vs kernel")


# --------------------------------------------------------------------------------------------
# the torch.library op with backend="triton"
# --------------------------------------------------------------------------------------------


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts the op's calls into the Triton launcher (the op reaches it through ops._triton_module())."""
    calls = []
    launch = K.fused_step
    monkeypatch.setattr(K, "fused_step", lambda *a: calls.append(a[3]) or launch(*a))
    return calls


@pytest.mark.parametrize("kind", ["ddim_eta1", "dpmpp_3m", "synthetic"])
def test_op_with_triton_backend(kind, triton_launches):
    args = _args(kind, prediction="v", noise=kind == "synthetic")
    got = run_op(lambda *a: torch.ops.ddim_fast.step(*a, "triton"), args)
    assert triton_launches == [args["step"]], "backend='triton' did not run the Triton launcher"
    assert_step_close(got, args, what=f"op(backend='triton') {kind}")


def test_op_triton_backend_passes_opcheck(triton_launches):
    from _utils import OP_ARGS

    args = _args("synthetic", (2, 3, 5), prediction="v", clip=1.0)
    torch.library.opcheck(torch.ops.ddim_fast.step.default, tuple(args[k] for k in OP_ARGS) + ("triton",))
    assert triton_launches, "opcheck never reached the Triton launcher"


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own import
def test_op_under_torch_compile_fullgraph(triton_launches):
    """The opaque custom op as one graph node with backend="triton" (~5 s to compile, cold cache, 2 cores)."""
    from _utils import OP_ARGS

    args = _args("dpmpp_3m", (2, 3, 16))

    def one_step(x, m, table, seed, history, flags):
        out = torch.empty_like(x)
        x0 = torch.empty_like(x)
        a = {**args, "x": x, "model_out": m, "table": table, "seed": seed, "history": history, "out": out, "x0_out": x0}
        a["flags"] = flags
        torch.ops.ddim_fast.step(*(a[k] for k in OP_ARGS), "triton")
        return out, x0

    torch._dynamo.reset()
    a = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
    out, x0 = torch.compile(one_step, fullgraph=True)(a["x"], a["model_out"], a["table"], a["seed"], a["history"], a["flags"])
    assert triton_launches, "the compiled graph did not call the Triton launcher"
    assert_step_close((out, x0, a["history"], None, a["flags"]), args, what="compiled op(backend='triton')")


def test_sampler_triton_equals_torch_backend(triton_launches):
    """A whole FusedSampler trajectory (eta = 0.7: Philox noise at every step) and an encode, Triton vs reference."""
    from ddim_fast import FusedSampler

    def model(x, t):  # deterministic, depends on x and t
        return torch.tanh(x) * (0.5 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / 2000)

    x_T = K.gaussian(11, (2, 3, 8, 8), stream=layout.STREAM_X_T, sample_offset=0, device=DEVICE)  # on the kernel's device
    results = {}
    for backend in ("torch", "triton"):
        sampler = FusedSampler(model, steps=8, eta=0.7, prediction="v", clip_x0=1.0, precision="fp32", backend=backend)
        sample = sampler.sample(x_T, seed=11)
        results[backend] = (sample, sampler.encode(sample, eta=0))
    assert len(triton_launches) == 2 * 8, "backend='triton' did not run the Triton kernel at every step"
    # The numbers are the step tests' business; here 8 steps of |x| ~ 1, each within a few float32
    # ulps of the reference, stay well inside 1e-5 (measured: 1.8e-7 sample, 4.8e-7 encode).
    for i, what in enumerate(("sample", "encode")):
        assert_close(results["triton"][i], results["torch"][i], atol=1e-5, rtol=1e-5, what=f"{what}, triton vs torch")


# --------------------------------------------------------------------------------------------
# compiled mode, without a GPU: the kernel lowers to PTX for sm_90
# --------------------------------------------------------------------------------------------

_AOT = textwrap.dedent(
    """
    import re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ddim_fast.kernels import ddim_step as K
    assert not K.is_interpreted()
    SIG = dict(x_ptr="*fp32", m_ptr="*fp16", table_ptr="*fp32", seed_ptr="*i64", hist_ptr="*fp32", saved_ptr="*fp32",
               noise_ptr="*fp32", out_ptr="*fp32", x0_ptr="*fp32", flags_ptr="*i32", step="i32", R="i32", N="i32",
               D="i32", batch_start="i32", clip="fp32", flags_stride="i32")
    ALIGNED = ["x_ptr", "m_ptr", "hist_ptr", "saved_ptr", "noise_ptr", "out_ptr", "x0_ptr", "D", "N"]
    def compile(**const):
        c = dict(PREDICTION=0, HISTORY_KIND=0, NUM_HIST=0, HAS_CLIP=False, HAS_SAVED=False, HAS_NOISE=False,
                 HAS_X0_OUT=False, HAS_FLAGS=False, BLOCK=K.MAX_GROUPS)
        c.update(const)
        names = list(SIG) + list(c)
        sig = {**SIG, **{k: "constexpr" for k in c}}
        src = ASTSource(fn=K._step_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in c.items()},
                        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in ALIGNED})  # as D % 16 == 0 sees it
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=True))
        ptx = ck.asm["ptx"]
        n = lambda p: len(re.findall(p, ptx))
        return [ck.metadata.shared, n(r"bar\\.sync"),
                n(r"ld\\.global(\\.\\w+)*\\.v4\\.b32"), n(r"ld\\.global(\\.\\w+)*\\.v2\\.b32"),
                n(r"st\\.global(\\.\\w+)*\\.v4\\.b32"), n(r"mul\\.hi\\.u32"), n(r"div\\.rn\\.f32"), n(r"div\\.(full|approx)"),
                n(r"sqrt\\.approx")]
    print(*compile(HAS_FLAGS=True, HAS_X0_OUT=True))  # DDIM at any eta: Philox behind the sigma branch
    print(*compile(NUM_HIST=3, HAS_SAVED=True, HISTORY_KIND=1, HAS_NOISE=True, HAS_FLAGS=True, PREDICTION=2))
    """
)


def test_kernel_compiles_for_sm90():
    """Compiled mode cannot run here, but it can be compiled: no shared memory and no barrier (the
    flags reduce within a thread), 128-bit fp32 loads/stores (8 elements per thread at BLOCK =
    256 groups and 4 warps), one Philox (2 x 10 mulhi) per group, correctly rounded divisions and sqrt;
    the every-operand variant (3 history terms, saved state, explicit noise) compiles too."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas for the CUDA target")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddim, every = ([int(v) for v in line.split()] for line in proc.stdout.split("\n")[-3:-1])
    for what, (shared, bar, v4_fp32, v2_fp16x4, v4_store, mulhi, div_rn, div_approx, sqrt_approx) in (("ddim", ddim), ("every", every)):
        assert shared == 0 and bar == 0, f"{what}: the tile went through shared memory ({shared} B, {bar} barriers)"
        assert v2_fp16x4 == 2, f"{what}: the fp16 model output is not read as 2 x 64-bit per thread"
        assert div_rn == 2 * 4 and div_approx == 0, f"{what}: {div_rn} div.rn, {div_approx} approximate divisions"
        assert sqrt_approx == 0, f"{what}: an approximate sqrt in the Box-Muller transform"
    assert ddim[2] == 2 and ddim[4] == 2 * 2, f"x: 2 v4 loads, out and x0_out: 2 v4 stores each: {ddim}"
    assert 0 < ddim[5] <= 2 * 10 * 2, f"{ddim[5]} mulhi for 2 groups per thread: Philox is not shared by 4 outputs"
    assert every[2] == 2 * (1 + 3 + 1 + 1), f"x, 3 ring slots, saved, noise: {every}"
    assert every[4] == 2 * 3 and every[5] == 0, f"out, saved, ring stores; no Philox with explicit noise: {every}"
