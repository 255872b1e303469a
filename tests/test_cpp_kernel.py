"""The C++ CPU kernel (csrc/ddim_step.cpp, ``torch.ops.ddim_fast_C``) against the PyTorch reference.

The kernel folds each coefficient row, in float64, into x_prev = A x + B m (+ sigma z) (and
x0 = (a0 x + b0 m) r0 where x0 is needed), so its results are not bitwise the reference's: every step is held to the FlashAttention rule (error
against the float64 oracle at most 2x PyTorch's own error in the same dtype). The noise is held
to 1e-6 of ``reference.gaussian`` (both round float32 log/sin/cos; torch's are off by an ulp in
~5% of cases), and its own AVX-512 and portable code paths, and any thread count, to the bit.

The extension is built (or found) once per session; set DDIM_FAST_BUILD_EXT=0 to skip this file.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from _utils import assert_close, good_step_args as _good_args, run_step as _run, step_inputs as _inputs
from _utils import step_seed as _seed, step_table32 as _table
from ddim_fast import _ext, ops, reference
from ddim_fast.schedule import NoiseSchedule, inverse_step_table, select_timesteps

SHAPES = [(3, 5, 33), (1, 1), (1,), (7, 1), (2, 3, 16, 16)]
PREDICTIONS = ["epsilon", "v", "x0"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def C():
    """torch.ops.ddim_fast_C (ahead-of-time module, or compiled here on first use)."""
    if os.environ.get("DDIM_FAST_BUILD_EXT", "1") == "0":
        pytest.skip("DDIM_FAST_BUILD_EXT=0: the C++ extension is disabled")
    _ext.load()  # a build failure is a test failure here, not a skip
    return torch.ops.ddim_fast_C










def _worst(actual, expected):
    """(max abs error, message naming the worst element)."""
    err = (actual.double() - expected.double()).abs()
    i = int(torch.argmax(err))
    idx = tuple(int(v) for v in np.unravel_index(i, tuple(err.shape)))
    a, e = actual.reshape(-1)[i].item(), expected.reshape(-1)[i].item()
    return err.max().item(), f"worst at {idx}: {a:.8g} vs {e:.8g}"


def _assert_within_pytorch_error(kernel, inputs, what):
    """Error vs the float64 oracle at most 2x PyTorch's own (reference.fused_step in the model
    output's dtype), plus two float32 ulps of the output's scale for the float32 result itself."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["sigma0", "sigma"])
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_step_matches_reference(C, shape, prediction, clip, stochastic, dtype):
    coef = _table(eta=1.0)
    x, m = _inputs(shape, dtype)
    seed = _seed(987654321987, offset=2)
    for step in (0, 4, coef.shape[0] - 1):  # noisiest row (sqrt(a_t) = 0.07), a middle one, the last (a_prev = 1)
        got = _run(C.step, x, m, coef, step, seed, prediction, clip, stochastic)
        ref = _run(reference.fused_step, x, m, coef, step, seed, prediction, clip, stochastic)
        what = f"step {step}"
        # The kernel sums terms as large as the unclipped x0 (|x| / sqrt(a_t) on the noisiest row).
        x0_free = _run(reference.fused_step, x, m, coef, step, seed, prediction, 0.0, False)[1]
        atol = 8 * EPS32 * max(x0_free.abs().max().item(), x.abs().max().item(), m.float().abs().max().item())
        assert_close(got[0], ref[0], atol=atol + 1e-6, what=f"{what} x_prev")  # + 1e-6 sigma for z
        assert_close(got[1], ref[1], atol=atol, what=f"{what} x0")
        inputs = dict(x=x, m=m, coef=coef, step=step, seed=seed, prediction=prediction, clip=clip, stochastic=stochastic)
        _assert_within_pytorch_error(got, inputs, what)


def test_odd_sizes_every_tail(C):
    """Every length 1..70 (tails of the vector loops, groups of 4 cut by the sample end) and a
    batch larger than one 1024-element tile per sample."""
    coef = _table()
    for D in list(range(1, 71)) + [1023, 1025, 3 * 32 * 32]:
        x, m = _inputs((3, D), seed=D)
        got = _run(C.step, x, m, coef, 2, _seed(5, 1), "v", 0.0, True)
        ref = _run(reference.fused_step, x, m, coef, 2, _seed(5, 1), "v", 0.0, True)
        assert_close(got[0], ref[0], atol=4e-6, what=f"D={D} x_prev")
        assert_close(got[1], ref[1], atol=8 * EPS32 * ref[1].abs().max().item(), what=f"D={D} x0")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_inverse_step_matches_reference(C, prediction):
    """Encoding: the same op with schedule.inverse_step_table (x0 models are undefined on its
    first row, where sqrt(1 - alpha_cur) = 0, in the reference too)."""
    tau = select_timesteps(1000, 10, "uniform")
    coef = inverse_step_table(NoiseSchedule.linear(1000), tau).to(torch.float32)
    x, m = _inputs((3, 5, 33))
    for step in range(coef.shape[0]):
        got = _run(C.step, x, m, coef, step, _seed(), prediction, 0.0, False)
        ref = _run(reference.fused_step, x, m, coef, step, _seed(), prediction, 0.0, False)
        inputs = dict(x=x, m=m, coef=coef, step=step, seed=_seed(), prediction=prediction, clip=0.0, stochastic=False)
        _assert_within_pytorch_error(got, inputs, f"inverse step {step}")
        assert_close(got[0], ref[0], atol=1e-6, rtol=4 * EPS32, what=f"inverse step {step} x_next")


@pytest.mark.parametrize("noise_dtype", DTYPES, ids=str)
def test_explicit_noise(C, noise_dtype):
    coef = _table()
    x, m = _inputs((3, 5, 33))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(noise_dtype)
    got = _run(C.step, x, m, coef, 2, _seed(), "epsilon", 0.0, True, noise=noise)
    ref = _run(reference.fused_step, x, m, coef, 2, _seed(), "epsilon", 0.0, True, noise=noise)
    assert_close(got[0], ref[0], atol=1e-6, rtol=4 * EPS32, what=f"x_prev with explicit {noise_dtype} noise")
    # noise is ignored when the step is deterministic
    det = _run(C.step, x, m, coef, 2, _seed(), "epsilon", 0.0, False, noise=noise)
    assert torch.equal(det[0], _run(C.step, x, m, coef, 2, _seed(), "epsilon", 0.0, False)[0])


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_x(C, x_dtype):
    coef = _table()
    x, m = _inputs((2, 3, 16, 16), torch.float16)
    x = x.to(x_dtype)
    got = _run(C.step, x, m, coef, 3, _seed(), "v", 0.0, True)
    ref = _run(reference.fused_step, x, m, coef, 3, _seed(), "v", 0.0, True)
    assert_close(got[0], ref[0], atol=4e-6, rtol=4 * EPS32, what=f"{x_dtype} x")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_outputs(C, out_dtype):
    """out / x0_out in fp16/bf16: the float32 result rounded to nearest even (as Tensor.copy_)."""
    coef = _table()
    x, m = _inputs((3, 5, 33), torch.bfloat16)
    got = _run(C.step, x, m, coef, 4, _seed(), "epsilon", 1.0, True, dtype=out_dtype)
    ref32 = _run(C.step, x, m, coef, 4, _seed(), "epsilon", 1.0, True)
    for name, g, r in zip(("x_prev", "x0"), got, ref32):
        assert torch.equal(g, r.to(out_dtype)), f"{name}: not the rounded float32 result: {_worst(g, r.to(out_dtype))[1]}"


def test_noncontiguous_inputs_and_outputs(C):
    coef = _table()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 33, 3, generator=g).permute(0, 2, 1)  # (5, 3, 33), not contiguous
    m = torch.randn(5, 3, 66, generator=g)[..., ::2]  # strided
    noise = torch.randn(3, 33, 5, generator=g).permute(2, 0, 1)
    out = torch.zeros(5, 3, 33, 2)[..., 0]  # the kernel writes a temporary, then copies into it
    x0_out = torch.zeros(3, 33, 5).permute(2, 0, 1)
    for z in (None, noise):
        C.step(x, m, coef, 1, _seed(), 1, 1.5, True, z, out, x0_out)
        ref = _run(reference.fused_step, x.contiguous(), m.contiguous(), coef, 1, _seed(), "v", 1.5, True, noise=z)
        assert_close(out, ref[0], atol=4e-6, rtol=4 * EPS32, what="non-contiguous x_prev")
        assert_close(x0_out, ref[1], atol=8 * EPS32 * ref[1].abs().max().item(), what="non-contiguous x0")
    wide = torch.zeros(coef.shape[0], 10)  # a table with strides (10, 2)
    wide[:, ::2] = coef
    out2 = torch.empty(5, 3, 33)
    C.step(x, m, wide[:, ::2], 1, _seed(), 1, 1.5, False, None, out2, None)
    ref = _run(reference.fused_step, x, m, coef, 1, _seed(), "v", 1.5, False)
    assert_close(out2, ref[0], atol=4e-6, rtol=4 * EPS32, what="strided table")


def test_out_may_alias_x_or_model_out(C):
    coef = _table()
    x, m = _inputs((3, 5, 33))
    ref = _run(C.step, x, m, coef, 4, _seed(), "epsilon", 0.0, True)
    x_inplace = x.clone()
    C.step(x_inplace, m, coef, 4, _seed(), 0, 0.0, True, None, x_inplace, None)
    assert torch.equal(x_inplace, ref[0]), "in-place x_prev (out is x)"
    m_inplace, x0 = m.clone(), torch.empty_like(x)
    C.step(x, m_inplace, coef, 4, _seed(), 0, 0.0, True, None, x0, m_inplace)
    assert torch.equal(m_inplace, ref[1]), "in-place x0 (x0_out is model_out)"
    buf = torch.randn(x.numel() + 1)  # out one element behind x: the kernel would read what it wrote
    with pytest.raises(RuntimeError, match="single memory location"):
        C.step(buf[1:].view(x.shape), m, coef, 4, _seed(), 0, 0.0, True, None, buf[:-1].view(x.shape), None)


def test_empty_batch_is_a_no_op(C):
    x = torch.empty(0, 3, 4)
    C.step(x, x, _table(), 0, _seed(), 0, 0.0, True, None, torch.empty(0, 3, 4), None)




@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_out=torch.zeros(2, 3, 5)), "model_out must have the shape of x"),
        (dict(out=torch.zeros(2, 3, 4, dtype=torch.float64)), "out must be float32, bfloat16 or float16"),
        (dict(x0_out=torch.zeros(2, 12)), "x0_out must have the shape of x"),
        (dict(noise=torch.zeros(3, 3, 4)), "noise must have the shape of x"),
        (dict(model_out=torch.zeros(2, 3, 4, dtype=torch.int32)), "model_out must be float32"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.float64)), "x must be float32"),
        (dict(coef=torch.zeros(10, 4)), r"coef must have shape \(S, 5\)"),
        (dict(coef=torch.zeros(10, 5, dtype=torch.float64)), "coef must be float32"),
        (dict(step=10), "step 10 out of range for coef with 10 rows"),
        (dict(step=-1), "step -1 out of range"),
        (dict(prediction=3), r"prediction must be 0 \(epsilon\), 1 \(v\) or 2 \(x0\), got 3"),
        (dict(seed=torch.tensor([1, 2], dtype=torch.int32)), "seed must be an int64 tensor"),
        (dict(seed=torch.tensor([1], dtype=torch.int64)), "seed must be an int64 tensor"),
        (dict(seed=torch.tensor([-1, 0])), r"seed must be in \[0, 2\*\*63\)"),
        (dict(x=torch.tensor(1.0)), "x must have a batch dimension"),
    ],
)
def test_invalid_arguments_raise_clearly(C, change, message):
    args = {**_good_args(), **change}
    with pytest.raises(RuntimeError, match=message):
        C.step(*args.values())


def test_schema_and_fake_kernel(C):
    """The op's schema (mutated out / x0_out) and its Meta kernel pass torch.library.opcheck."""
    x, m = _inputs((2, 3, 4))
    args = (x, m, _table(), 1, _seed(), 0, 0.0, True, None, torch.empty(2, 3, 4), torch.empty(2, 3, 4))
    torch.library.opcheck(C.step.default, args, test_utils=("test_schema", "test_faketensor"))


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
        (20210101, (64, 3, 32, 32), 3, 1, 0),
    ],
)
def test_noise_matches_reference(C, seed, shape, step, stream, offset):
    z = C.gaussian(_seed(seed, offset), list(shape), step, stream)
    z_ref = reference.gaussian(seed, shape, step=step, stream=stream, sample_offset=offset)
    assert_close(z, z_ref, atol=1e-6, what=f"z(seed={seed}, step={step}, stream={stream}, offset={offset})")


def test_noise_within_1e6_on_4m_draws(C):
    """2^22 draws: the worst of them is still within 1e-6 of the reference (7.2e-7 measured)."""
    z = C.gaussian(_seed(77, 0), [1024, 4096], 11, 1)
    assert_close(z, reference.gaussian(77, (1024, 4096), step=11), atol=1e-6, what="z over 2^22 draws")


@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 1000), (5, 1), (64, 3, 32, 32)], ids=str)
def test_avx512_and_portable_generators_agree_bitwise(C, shape):
    """The hand-vectorized generator (AVX-512 CPUs) and the plain C++ one give the same bits
    (the same IEEE operations, FMAs included, in the same order)."""
    fast = C.gaussian(_seed(2**40 + 3, 9), list(shape), 5, 1)
    portable = C.gaussian(_seed(2**40 + 3, 9), list(shape), 5, 1, portable=True)
    assert torch.equal(fast, portable), f"AVX-512 vs portable noise: {_worst(fast, portable)[1]}"


def test_in_kernel_noise_matches_reference(C):
    """Pure noise through the step: a row (1, 0, 1, 0, sigma = 1) makes x_prev = x0 + z = x + z."""
    coef = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    x = torch.zeros(3, 5, 33)
    got, _ = _run(C.step, x, x, coef, 0, _seed(55, 9), "epsilon", 0.0, True, x0=False)
    z_ref = reference.gaussian(55, x.shape, step=0, stream=reference.STREAM_STEP, sample_offset=9)
    assert_close(got, z_ref, atol=1e-6, what="in-kernel z")
    assert torch.equal(got, C.gaussian(_seed(55, 9), [3, 5, 33], 0, 1)), "the step's z is not the gaussian op's"


def test_sample_is_independent_of_batch(C):
    """Sample i is the same drawn in a batch of 7, alone (offset i), or in a batch of 2 at offset 5."""
    coef = _table()
    x7, m7 = _inputs((7, 3, 5, 11))
    batch, _ = _run(C.step, x7, m7, coef, 3, _seed(77, 0), "epsilon", 0.0, True, x0=False)
    for i in range(7):
        alone, _ = _run(C.step, x7[i : i + 1], m7[i : i + 1], coef, 3, _seed(77, i), "epsilon", 0.0, True, x0=False)
        assert torch.equal(alone[0], batch[i]), f"sample {i} alone differs: {_worst(alone[0], batch[i])[1]}"
    at5, _ = _run(C.step, x7[5:], m7[5:], coef, 3, _seed(77, 5), "epsilon", 0.0, True, x0=False)
    assert torch.equal(at5, batch[5:]), f"samples 5, 6 at offset 5 differ: {_worst(at5, batch[5:])[1]}"


def test_seed_is_read_at_each_call(C):
    coef = _table()
    x, m = _inputs((2, 3, 16))
    seed = _seed(1, 0)
    first, _ = _run(C.step, x, m, coef, 0, seed, "epsilon", 0.0, True, x0=False)
    seed.copy_(torch.tensor([2, 0]))
    second, _ = _run(C.step, x, m, coef, 0, seed, "epsilon", 0.0, True, x0=False)
    assert not torch.equal(first, second)
    assert torch.equal(second, _run(C.step, x, m, coef, 0, _seed(2, 0), "epsilon", 0.0, True, x0=False)[0])


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("noise", ["philox", "explicit", "none"])
def test_thread_count_does_not_change_a_bit(C, restore_threads, noise):
    """1 and 2 threads (and 3, oversubscribed): bit-identical steps and noise, whatever the split."""
    coef = _table()
    x, m = _inputs((64, 3, 32, 32), torch.bfloat16)
    z = torch.randn(x.shape) if noise == "explicit" else None
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = _run(C.step, x, m, coef, 3, _seed(99, 4), "x0", 1.0, noise != "none", noise=z)
        results.append((threads, out, C.gaussian(_seed(99, 4), [33, 1000], 3, 1)))
    for threads, out, g in results[1:]:
        for name, a, b in zip(("x_prev", "x0", "gaussian"), (*out, g), (*results[0][1], results[0][2])):
            assert torch.equal(a, b), f"{threads} threads vs 1, {name}: {_worst(a, b)[1]}"


def test_noise_matches_triton_interpreter(C, tmp_path):
    """The same numbers as the Triton kernel (kernels/ddim_step.py) under TRITON_INTERPRET=1,
    drawn in a subprocess so that this process's Triton stays uninterpreted."""
    # find_spec, not import: importing the kernels here, uninterpreted, would stop
    # tests/test_triton_kernel.py from interpreting them later in this process.
    if importlib.util.find_spec("ddim_fast.kernels.ddim_step") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("no Triton kernel (ddim_fast.kernels.ddim_step) to compare with")
    cases = [(1234, (3, 5, 33), 7, 1, 5), (2**40 + 17, (2, 3, 16, 16), 999, 0, 0), (5, (2, 3000), 0, 1, 2**32 - 1)]
    path = tmp_path / "triton_z.pt"
    script = textwrap.dedent(
        f"""
        import os, torch
        os.environ["TRITON_INTERPRET"] = "1"
        from ddim_fast.kernels import ddim_step as K
        out = [K.triton_gaussian(s, shape, step=k, stream=st, sample_offset=o, device="cpu") for s, shape, k, st, o in {cases!r}]
        torch.save(out, {str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (seed, shape, step, stream, offset), z_triton in zip(cases, torch.load(path)):
        z = C.gaussian(_seed(seed, offset), list(shape), step, stream)
        assert_close(z, z_triton, atol=1e-6, what=f"C++ vs Triton z(seed={seed}, step={step}, stream={stream})")


# --------------------------------------------------------------------------------------------
# loading and the fallback
# --------------------------------------------------------------------------------------------


def test_sources_are_found():
    assert all(os.path.isfile(p) for p in _ext.source_files())


def test_backend_auto_picks_cpp_on_cpu(C):
    assert ops.resolve_backend("auto", "cpu") == "cpp"
    assert ops.resolve_backend("cpp", "cpu") == "cpp"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DDIM_FAST_BUILD_EXT", "0")
    with pytest.raises(RuntimeError, match="DDIM_FAST_BUILD_EXT=0"):
        _ext.load()


def test_unavailable_extension_falls_back_with_one_warning(no_extension):
    with pytest.warns(RuntimeWarning, match="C\\+\\+ backend is unavailable") as record:
        assert ops.resolve_backend("auto", "cpu") == "torch"
        assert ops.resolve_backend("auto", "cpu") == "torch"
    assert len([w for w in record if "C++ backend" in str(w.message)]) == 1, [str(w.message) for w in record]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert ops.resolve_backend("auto", "cpu") == "torch"
