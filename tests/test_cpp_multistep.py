"""The C++ multistep step (csrc/ddim_step.cpp, ``torch.ops.ddim_fast_C.multistep_step``) against
the PyTorch reference ``ddim_fast.solvers.multistep_step`` (issue 8).

The kernel runs the reference's float32 operations in the reference's order (no coefficient
fold, the division by sqrt(a_t) kept, no FMA contraction), so it is held to the reference's
bits (torch.equal), after an assert_close that reports the size of any difference. Every row of
the 2M and 3M tables (first-order warm-up, lowered second-to-last, first-order last row), the
three predictions, clip on/off, fp32/bf16/fp16 model outputs, in-place use, x0_out or not,
odd sizes and any thread count.

The extension is built (or found) once per session; set DDIM_FAST_BUILD_EXT=0 to skip this file.
"""

import os
import warnings

import pytest
import torch

from _utils import TinyConvModel as _Tiny, assert_close, good_multistep_args as _good_args
from _utils import multistep_table32 as _table
from ddim_fast import FusedSampler, NoiseSchedule, _ext, ops, solvers
from ddim_fast.reference import PREDICTIONS

MULTISTEP = ["dpmpp_2m", "dpmpp_3m"]
# odd sizes (not multiples of 16, tails of the vector loops), one element, more than one 1024-element tile
SHAPES = [(3, 5, 33), (1, 1), (7, 1), (2, 3, 16, 16), (2, 1029)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def C():
    """torch.ops.ddim_fast_C (ahead-of-time module, or compiled here on first use)."""
    if os.environ.get("DDIM_FAST_BUILD_EXT", "1") == "0":
        pytest.skip("DDIM_FAST_BUILD_EXT=0: the C++ extension is disabled")
    _ext.load()  # a build failure is a test failure here, not a skip
    C = torch.ops.ddim_fast_C
    try:
        C.multistep_step
    except (AttributeError, RuntimeError):
        pytest.fail("the loaded C++ extension has no multistep_step op: rebuild it (pip install --no-build-isolation -e .)")
    return C


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)




def _inputs(shape, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g).to(dtype)
    history = torch.randn((H, *shape), generator=g)
    return x, m, history


def _run(impl, x, m, coef, step, prediction, clip, history, x0=True, inplace=False):
    """(x_next, x0_out or None, ring after the step) written by impl into fresh NaN-filled buffers;
    with ``inplace`` x_next is written over (a copy of) x, as the sampler's state buffer."""
    hist = history.clone()
    if inplace:
        xs = x.clone()
        out = xs
    else:
        xs = x
        out = torch.full(x.shape, float("nan"))
    x0_out = torch.full(x.shape, float("nan")) if x0 else None
    impl(xs, m, coef, step, prediction, clip, hist, out, x0_out)
    return out, x0_out, hist


def _assert_same(got, ref, what):
    """To float32 rounding (assert_close names the worst element), then bitwise."""
    for name, a, e in zip(("x_next", "x0_out", "history"), got, ref):
        if a is None and e is None:
            continue
        assert_close(a, e, atol=1e-6, rtol=4 * EPS32, what=f"{what} {name}")
        assert torch.equal(_bits(a), _bits(e)), f"{what} {name}: not the reference's bits"


def _bits(t):
    """float32 as int32: NaN equals itself, -0 differs from +0."""
    return t.contiguous().view(torch.int32)


# --------------------------------------------------------------------------------------------
# the step against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_every_step(C, shape, solver, prediction, clip, dtype):
    coef = _table(solver)
    H = solvers.HISTORY_SLOTS[solver]
    x, m, history = _inputs(shape, H, dtype)
    pred = PREDICTIONS[prediction]
    for step in range(coef.shape[0]):  # warm-up (order 1, 2), full order, lowered second-to-last, first-order last
        for x0, inplace in ((True, False), (False, True)):
            what = f"step {step} ({'in place' if inplace else 'out'}, x0_out {'given' if x0 else 'None'})"
            got = _run(C.multistep_step, x, m, coef, step, pred, clip, history, x0=x0, inplace=inplace)
            ref = _run(solvers.multistep_step, x, m, coef, step, pred, clip, history, x0=x0, inplace=inplace)
            _assert_same(got, ref, what)
            w = solvers.history_slots(step, H)[0]
            if x0:
                assert torch.equal(got[2][w], got[1]), f"{what}: x0_k is not in ring slot step % H"
            untouched = [s for s in range(H) if s != w]
            assert torch.equal(got[2][untouched], history[untouched]), f"{what}: a read slot of the ring was written"


@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 16])
def test_every_row_of_short_and_long_tables(C, solver, S):
    """Tables where the order is lowered at both ends differently (S < 15 lowers the second-to-last
    row; S = 16 runs full order in between), as a trajectory with the ring carried over."""
    coef = _table(solver, S, NoiseSchedule.cosine(1000))
    H = solvers.HISTORY_SLOTS[solver]
    x, _, _ = _inputs((3, 5, 33), H)
    x_c, x_r = x.clone(), x.clone()
    h_c = torch.full((H, 3, 5, 33), float("nan"))  # a fresh ring: nothing may read an unwritten slot
    h_r = h_c.clone()
    g = torch.Generator().manual_seed(S)
    for step in range(S):
        m = torch.randn(3, 5, 33, generator=g)
        C.multistep_step(x_c, m, coef, step, 0, 0.0, h_c, x_c, None)
        solvers.multistep_step(x_r, m, coef, step, 0, 0.0, h_r, x_r, None)
        assert torch.isfinite(x_c).all(), f"step {step}: the ring leaked NaN"
        _assert_same((x_c, None, h_c), (x_r, None, h_r), f"S={S} step {step}")


def test_ring_is_not_read_where_its_coefficient_is_zero(C):
    """A ring full of NaN (fresh torch.empty) must not leak into x_next on the first and last rows."""
    coef = _table("dpmpp_3m")
    x, m, _ = _inputs((2, 3, 5, 33), 3)
    history = torch.full((3, 2, 3, 5, 33), float("nan"))
    for step in (0, coef.shape[0] - 1):
        out, x0, hist = _run(C.multistep_step, x, m, coef, step, 0, 0.0, history)
        assert torch.isfinite(out).all() and torch.isfinite(hist[step % 3]).all()
    out, _, _ = _run(C.multistep_step, x, m, coef, 1, 0, 0.0, history)  # reads x0_0: NaN there
    assert torch.isnan(out).all()


def test_negative_zero_is_the_references(C):
    """x_next = -0 + (+0 for a masked-off ring term) is +0 in the reference; the kernel adds it too."""
    coef = torch.tensor([[1.0, 0.0, -1.0, -1.0, 0.0, 0.0]])  # x_next = -x - x0 = -0 - 0 = -0 for x = +0, then + 0
    x = torch.zeros(1, 20)
    m = torch.zeros(1, 20)
    for H in (1, 2, 3):
        got = _run(C.multistep_step, x, m, coef, 0, 0, 0.0, torch.zeros(H, 1, 20))
        ref = _run(solvers.multistep_step, x, m, coef, 0, 0, 0.0, torch.zeros(H, 1, 20))
        sign = torch.signbit(got[0])
        assert torch.equal(sign, torch.signbit(ref[0])), f"H={H}: sign of zero differs"
        assert bool(sign.all()) == (H == 1)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_x(C, x_dtype):
    coef = _table("dpmpp_2m")
    x, m, history = _inputs((2, 3, 16, 16), 2, torch.float16)
    x = x.to(x_dtype)
    for step in (0, 4, 9):
        _assert_same(
            _run(C.multistep_step, x, m, coef, step, 1, 0.0, history),
            _run(solvers.multistep_step, x, m, coef, step, 1, 0.0, history),
            f"{x_dtype} x, step {step}",
        )


def test_noncontiguous_inputs_outputs_and_table(C):
    coef = _table("dpmpp_3m")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 33, 3, generator=g).permute(0, 2, 1)  # (5, 3, 33), not contiguous
    m = torch.randn(5, 3, 66, generator=g)[..., ::2].to(torch.bfloat16)  # strided
    history = torch.randn(3, 5, 3, 33, generator=g)
    out = torch.zeros(5, 3, 33, 2)[..., 0]  # the kernel writes a temporary, then copies into it
    x0_out = torch.zeros(3, 33, 5).permute(2, 0, 1)
    wide = torch.zeros(coef.shape[0], 12)  # the same table with strides (12, 2)
    wide[:, ::2] = coef
    hist = history.clone()
    C.multistep_step(x, m, wide[:, ::2], 4, 1, 1.5, hist, out, x0_out)
    ref = _run(solvers.multistep_step, x.contiguous(), m.contiguous(), coef, 4, 1, 1.5, history)
    _assert_same((out, x0_out, hist), ref, "non-contiguous")


def test_table_is_read_at_each_call(C):
    """The row comes from coef's memory at each call (graph-friendly): an update in place is seen."""
    coef = _table("dpmpp_2m")
    x, m, history = _inputs((2, 40), 2)
    first = _run(C.multistep_step, x, m, coef, 3, 0, 0.0, history)[0]
    coef[3, 2] *= 0.5
    second = _run(C.multistep_step, x, m, coef, 3, 0, 0.0, history)[0]
    assert not torch.equal(first, second)
    assert torch.equal(second, _run(solvers.multistep_step, x, m, coef, 3, 0, 0.0, history)[0])


def test_empty_batch_is_a_no_op(C):
    x = torch.empty(0, 3, 4)
    C.multistep_step(x, x, _table("dpmpp_2m"), 0, 0, 0.0, torch.empty(2, 0, 3, 4), torch.empty(0, 3, 4), None)


@pytest.mark.parametrize("solver", MULTISTEP)
def test_thread_count_does_not_change_a_bit(C, restore_threads, solver):
    """1 and 2 threads (and 3, oversubscribed) on a 64x3x32x32 batch: bit-identical results."""
    coef = _table(solver)
    H = solvers.HISTORY_SLOTS[solver]
    x, m, history = _inputs((64, 3, 32, 32), H, torch.bfloat16)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append([_run(C.multistep_step, x, m, coef, step, 2, 1.0, history) for step in (0, 1, 2, 9)])
    for threads, res in zip((2, 3), results[1:]):
        for step, got, first in zip((0, 1, 2, 9), res, results[0]):
            for name, a, b in zip(("x_next", "x0_out", "history"), got, first):
                assert torch.equal(a, b), f"{threads} threads vs 1, step {step} {name}"
    ref = [_run(solvers.multistep_step, x, m, coef, step, 2, 1.0, history) for step in (0, 1, 2, 9)]
    for step, got, r in zip((0, 1, 2, 9), results[0], ref):
        _assert_same(got, r, f"64x3x32x32 step {step}")


# --------------------------------------------------------------------------------------------
# argument checks, aliasing, schema
# --------------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.tensor(1.0)), "x must have a batch dimension"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.float64)), "x must be float32, bfloat16 or float16"),
        (dict(model_out=torch.zeros(2, 3, 5)), "model_out must have the shape of x"),
        (dict(model_out=torch.zeros(2, 3, 4, dtype=torch.int32)), "model_out must be float32"),
        (dict(out=torch.zeros(2, 12)), "out must have the shape of x"),
        (dict(out=torch.zeros(2, 3, 4, dtype=torch.float16)), "out must be float32, got Half"),
        (dict(x0_out=torch.zeros(2, 3, 5)), "x0_out must have the shape of x"),
        (dict(x0_out=torch.zeros(2, 3, 4, dtype=torch.bfloat16)), "x0_out must be float32"),
        (dict(history=torch.zeros(4, 2, 3, 4)), r"history must have shape \(H, \*x.shape\) with H in 1..3"),
        (dict(history=torch.zeros(2, 2, 3, 5)), r"history must have shape \(H, \*x.shape\)"),
        (dict(history=torch.zeros(2, 3, 4)), r"history must have shape \(H, \*x.shape\)"),
        (dict(history=torch.zeros(2, 2, 3, 4, dtype=torch.float16)), "history must be float32"),
        (dict(history=torch.zeros(2, 3, 4, 2).permute(3, 0, 1, 2)), "history must be contiguous"),
        (dict(coef=torch.zeros(10, 5)), r"coef must have shape \(S, 6\)"),
        (dict(coef=torch.zeros(10, 6, dtype=torch.float64)), "coef must be float32"),
        (dict(step=10), "step 10 out of range for coef with 10 rows"),
        (dict(step=-1), "step -1 out of range"),
        (dict(prediction=3), r"prediction must be 0 \(epsilon\), 1 \(v\) or 2 \(x0\), got 3"),
    ],
)
def test_invalid_arguments_raise_clearly(C, change, message):
    args = {**_good_args(), **change}
    with pytest.raises(RuntimeError, match="ddim_fast_C::multistep_step: " + message):
        C.multistep_step(*args.values())


def test_overlapping_buffers_are_refused(C):
    args = _good_args()
    history = args["history"]
    with pytest.raises(RuntimeError, match="unsupported operation"):  # out in the ring
        C.multistep_step(*{**args, "out": history[1]}.values())
    with pytest.raises(RuntimeError, match="unsupported operation"):  # x0_out in the ring
        C.multistep_step(*{**args, "x0_out": history[0]}.values())
    with pytest.raises(RuntimeError, match="unsupported operation"):  # out and x0_out the same
        C.multistep_step(*{**args, "x0_out": args["out"]}.values())
    buf = torch.randn(25)  # out one element behind x: the kernel would read what it wrote
    with pytest.raises(RuntimeError, match="single memory location"):
        C.multistep_step(*{**args, "x": buf[1:].view(2, 3, 4), "out": buf[:-1].view(2, 3, 4)}.values())


def test_out_may_alias_x_or_model_out(C):
    coef = _table("dpmpp_3m")
    x, m, history = _inputs((3, 5, 33), 3)
    ref = _run(solvers.multistep_step, x, m, coef, 4, 0, 0.0, history)
    m_inplace, hist = m.clone(), history.clone()
    out = torch.empty_like(x)
    C.multistep_step(x, m_inplace, coef, 4, 0, 0.0, hist, out, m_inplace)  # x0_out is model_out
    _assert_same((out, m_inplace, hist), ref, "x0_out is model_out")
    m_inplace, hist = m.clone(), history.clone()
    C.multistep_step(x, m_inplace, coef, 4, 0, 0.0, hist, m_inplace, None)  # out is model_out
    _assert_same((m_inplace, None, hist), (ref[0], None, ref[2]), "out is model_out")


def test_schema_and_fake_kernel(C):
    """The op's schema (mutated history / out / x0_out) and its Meta kernel pass torch.library.opcheck."""
    x, m, history = _inputs((2, 3, 4), 3)
    args = (x, m, _table("dpmpp_3m"), 3, 0, 1.0, history, torch.empty(2, 3, 4), torch.empty(2, 3, 4))
    torch.library.opcheck(C.multistep_step.default, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# wired into ddim_fast.ops and the sampler
# --------------------------------------------------------------------------------------------


def test_cpp_backend_runs_the_cpp_op(C):
    """backend="cpp" reaches the C++ op (its error message, where the reference would accept
    float64), both through the custom op and the sampler's direct path."""
    coef = _table("dpmpp_2m")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    args = (x, x, coef, 1, 0, 0.0, torch.zeros(2, 2, 3, 4), torch.empty(2, 3, 4), None)
    for call in (ops.fused_multistep_step, ops.multistep_step):
        with pytest.raises(RuntimeError, match="ddim_fast_C::multistep_step: x must be float32"):
            call(*args, "cpp")
    x, m, history = _inputs((2, 3, 5, 33), 2)
    got = _run(lambda *a: ops.multistep_step(*a, "cpp"), x, m, coef, 3, 1, 0.0, history)
    _assert_same(got, _run(solvers.multistep_step, x, m, coef, 3, 1, 0.0, history), "ops.multistep_step cpp")


@pytest.mark.parametrize("prediction, clip", [("epsilon", None), ("v", 1.0)])
@pytest.mark.parametrize("solver", MULTISTEP)
def test_sampler_trajectory_cpp_equals_torch(C, solver, prediction, clip):
    """A whole FusedSampler trajectory (x_t and the x0-predictions of every step), backend="cpp"
    against backend="torch": to float32 rounding, and in fact bitwise."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    kw = dict(steps=12, solver=solver, skip="logsnr", precision="fp32", cuda_graph=False, prediction=prediction, clip_x0=clip)
    x_T = torch.randn(3, 3, 9, 11)
    assert ops.resolve_backend("cpp", "cpu") == "cpp"
    traj = {}
    for backend in ("cpp", "torch"):
        traj[backend] = FusedSampler(model, backend=backend, **kw).sample(x_T, return_trajectory=True)
    for name in ("xs", "x0_preds"):
        a, e = getattr(traj["cpp"], name), getattr(traj["torch"], name)
        assert_close(a, e, atol=1e-6, rtol=4 * EPS32, what=f"{solver} trajectory {name}")
        assert torch.equal(a, e), f"{solver} trajectory {name}: not bitwise the torch backend's"


def test_unavailable_extension_falls_back_to_the_reference_with_one_warning(no_extension):
    coef = _table("dpmpp_2m")
    x, m, history = _inputs((2, 3, 5), 2)
    ref = _run(solvers.multistep_step, x, m, coef, 2, 0, 0.0, history)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ backend is unavailable") as record:
        got = _run(lambda *a: ops.fused_multistep_step(*a, "cpp"), x, m, coef, 2, 0, 0.0, history)
        again = _run(lambda *a: ops.fused_multistep_step(*a, "cpp"), x, m, coef, 2, 0, 0.0, history)
    assert len([w for w in record if "C++" in str(w.message)]) == 1, [str(w.message) for w in record]
    _assert_same(got, ref, "fallback")
    _assert_same(again, ref, "fallback, second call")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        ops.fused_multistep_step(x, m, coef, 2, 0, 0.0, history.clone(), torch.empty(2, 3, 5), None, "cpp")
