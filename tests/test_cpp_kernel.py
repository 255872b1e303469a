"""The C++ CPU kernel (csrc/, ``torch.ops.ddim_fast_C``) against the float64 reference.

Every row kind of ``tests/_utils.STEP_KINDS`` (DDIM at several eta, encoding, DPM-Solver++
2M/3M with their ring, a random table that uses every column) is held to one rule: the error
against ``reference.fused_step(..., compute_dtype=float64)`` at most 2x PyTorch's own float32
error (``assert_step_close``). The kernel folds each row in float64 and multiplies by
reciprocals, so its bits are not the reference's. The noise is held to 1e-6 of
``reference.gaussian`` (both round float32 log/sin/cos, to within an ulp), and to the bit
across thread counts and between the kernel's generators (portable, AVX-512, AVX2: each one the
CPU has). Each test calls ``torch.ops.ddim_fast_C`` directly, or checks that
``backend="cpp"`` resolved to it, so a fallback can never turn it into reference-vs-reference.

The extension is built (or found) once per session; set DDIM_FAST_BUILD_EXT=0 to skip this file.
"""

import os
import warnings

import pytest
import torch

from _utils import OP_ARGS, STEP_KINDS, assert_close, assert_step_close, copy_step_args, make_step_args
from _utils import reference_result, run_op, solver_table, step_outputs, step_seed
from ddim_fast import _ext, layout, ops, reference

SHAPES = [(3, 5, 33), (1, 1), (1,), (7, 1), (2, 1500), (2, 3, 16, 16)]  # 2 x 1500: a sample across tiles
PREDICTIONS = ["epsilon", "v", "x0"]
MODEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module")
def C():
    """torch.ops.ddim_fast_C (ahead-of-time module, or compiled here on first use)."""
    if os.environ.get("DDIM_FAST_BUILD_EXT", "1") == "0":
        pytest.skip("DDIM_FAST_BUILD_EXT=0: the C++ extension is disabled")
    _ext.load()  # a build failure is a test failure here, not a skip
    assert ops.resolve_backend("cpp", "cpu") == "cpp"
    return torch.ops.ddim_fast_C


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _same(a, b):
    """Bitwise equality of two step results (NaN equals NaN)."""
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        elif u.dtype == torch.float32:
            assert torch.equal(u.view(torch.int32), v.view(torch.int32))
        else:
            assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------
# one step against the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_every_row_kind(C, kind, prediction, clip):
    args = make_step_args(kind, (3, 5, 33), prediction=prediction, clip=clip)
    assert_step_close(run_op(C.step, args), args, f"{kind} {prediction} clip={clip}")


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "dpmpp_3m", "synthetic", "synthetic_ring"])
def test_model_output_dtypes(C, kind, dtype):
    """fp16/bf16/fp64 model outputs are read as they are (issue 17 defect 8: fp64 used to raise)."""
    args = make_step_args(kind, (3, 5, 33), prediction="v", dtype=dtype, clip=1.5)
    assert_step_close(run_op(C.step, args), args, f"{kind} model_out {dtype}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "dpmpp_3m", "synthetic", "synthetic_ring"])
def test_odd_shapes(C, kind, shape):
    args = make_step_args(kind, shape, prediction="epsilon", seed=2**40 + 5, offset=3)
    assert_step_close(run_op(C.step, args), args, f"{kind} {shape}")


@pytest.mark.parametrize("step", range(4))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_column_with_eps_history(C, step, prediction):
    """The random table: c_saved, the d_* update of the saved state, three eps-history terms, sigma."""
    args = make_step_args("synthetic", (2, 3, 50), prediction=prediction, step=step)
    assert args["history_kind"] == layout.HISTORY_KINDS["eps"] and args["saved"] is not None
    got = run_op(C.step, args)
    assert_step_close(got, args, f"synthetic row {step}")
    assert not torch.equal(got[3], args["saved"]), "the saved state was not updated"
    ring = make_step_args("synthetic_ring", (2, 3, 50), prediction=prediction, step=step, clip=1.0)
    assert ring["saved"] is None and ring["history"].shape[0] == 3
    assert_step_close(run_op(C.step, ring), ring, f"synthetic_ring row {step} (the slot written is read)")


@pytest.mark.parametrize("kind", ["ddim_eta0.5", "synthetic"])
def test_explicit_noise(C, kind):
    args = make_step_args(kind, (3, 5, 33), noise=True)
    got = run_op(C.step, args)
    assert_step_close(got, args, f"{kind} with explicit noise")
    philox = run_op(C.step, {**args, "noise": None})
    assert not torch.equal(got[0], philox[0]), "the explicit noise was not used"


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "dpmpp_2m", "synthetic", "synthetic_ring"])
def test_out_may_be_x(C, kind):
    args = make_step_args(kind, (3, 5, 1100), prediction="v", clip=2.0)
    inplace = copy_step_args(args)
    inplace["out"] = inplace["x"]
    got = run_op(C.step, inplace)
    assert_step_close(got, args, f"{kind} in place")


def test_empty_batch_is_a_no_op(C):
    args = make_step_args("synthetic", (0, 3))
    got = run_op(C.step, args)
    assert got[0].shape == (0, 3) and int(got[4].sum()) == 0


# --------------------------------------------------------------------------------------------
# the ring and the flags
# --------------------------------------------------------------------------------------------


def test_nan_in_the_ring_does_not_leak_where_its_coefficient_is_zero(C):
    """An all-NaN ring (a fresh torch.empty) on the first row of 3M, and a zeroed synthetic
    coefficient, read nothing; a non-zero coefficient on a NaN slot does read it."""
    args = make_step_args("dpmpp_3m", (2, 3, 33), step=0)
    args["history"].fill_(float("nan"))
    out, _, history, _, flags = run_op(C.step, args)
    assert torch.isfinite(out).all() and torch.isfinite(history[0]).all() and int(flags.sum()) == 0
    args = make_step_args("synthetic", (2, 3, 33), step=1)
    args["table"][1, layout.C_H + 1] = 0.0  # c_h2: slot (1 - 2) mod 3 = 2
    args["table"][1, layout.D_H + 1] = 0.0
    args["history"][2] = float("nan")
    got = run_op(C.step, args)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[3]).all()
    assert_step_close(got, args, "synthetic, c_h2 = 0 on a NaN slot")
    args["table"][1, layout.C_H + 1] = 0.5
    assert torch.isnan(run_op(C.step, args)[0]).all()


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "dpmpp_2m", "synthetic", "synthetic_ring"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_flags_for_a_non_finite_model_output(C, kind, bad):
    args = make_step_args(kind, (2, 3, 1500), dtype=torch.bfloat16)
    step = args["step"]
    args["model_out"][1, 2, 1400] = bad
    flags = run_op(C.step, args)[4]
    assert flags[step].tolist() == [1, 1], f"{kind}: flags {flags[step].tolist()}"
    assert int(flags.sum()) == 2, "a flag of another step was written"


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_3m"])
def test_flags_for_an_overflowing_state(C, kind):
    """A finite model output and x = +-3e38: x_next = (c_x + c_x0 / sqrt(alpha_t)) x + ... overflows
    float32 (the factor is 1.43 for DDIM, 1.86 for 3M at the middle row). The float32 reference
    flags it too; the float64 one cannot (its x_next is finite)."""
    args = make_step_args(kind, (2, 3, 1500), prediction="epsilon")
    args["x"][0, 0, 5] = 3e38
    args["x"][1, 2, 1400] = -3e38
    out, _, _, _, flags = run_op(C.step, args)
    assert torch.isinf(out[0, 0, 5]) and torch.isinf(out[1, 2, 1400])
    assert flags[args["step"]].tolist() == [0, 1] and int(flags.sum()) == 1
    assert flags.tolist() == reference_result(args, torch.float32)[4].tolist()


@pytest.mark.parametrize("kind", ["ddim", "dpmpp_2m", "synthetic"])
def test_flags_are_not_set_for_finite_values_and_never_cleared(C, kind):
    args = make_step_args(kind, (2, 3, 33))
    assert int(run_op(C.step, args)[4].sum()) == 0
    args["flags"][:, layout.FLAG_MODEL] = 1  # a NaN seen at some earlier step stays seen
    assert run_op(C.step, args)[4][:, layout.FLAG_MODEL].tolist() == [1] * args["table"].shape[0]


# --------------------------------------------------------------------------------------------
# whole trajectories
# --------------------------------------------------------------------------------------------


def _trajectory(step_fn, kind, x, model, st, ts, seed, compute=None):
    """Runs every row of ``st`` on x (in place, as the sampler does) with ``step_fn``; returns
    the final state and the x0-prediction of every step. compute: reference dtype (None = kernel)."""
    S = st.steps
    table = st.table.to(torch.float32)
    dtype = compute or torch.float32
    x = x.to(dtype).clone()
    ring = torch.full((st.history_slots, *x.shape), float("nan"), dtype=dtype) if st.history_slots else None
    saved = torch.zeros_like(x) if st.uses_saved else None
    flags = torch.zeros((S, 2), dtype=torch.int32)
    x0s = []
    for k in range(S):
        m = model(x.to(torch.float32), torch.full((x.shape[0],), int(ts[k]), dtype=torch.int64))
        x0 = torch.empty_like(x)
        args = (x, m, table, k, step_seed(seed), 0, 0.0, st.history_kind, ring, saved, None, x, x0, flags)
        if compute is None:
            step_fn(*args)
        else:
            step_fn(*args, compute_dtype=compute)
        x0s.append(x0)
    assert int(flags.sum()) == 0, f"{kind}: flags {flags.tolist()}"
    return x, torch.stack(x0s)


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta0.5", "ddim_eta1", "ddpm_large", "encode", "dpmpp_2m", "dpmpp_3m"])
def test_whole_trajectory_against_the_reference(C, kind):
    """S = 10 rows on the closed-form model of a Gaussian mixture: the C++ trajectory's error
    against the float64 reference trajectory is at most 2x that of the float32 reference."""
    from ddim_fast import solvers
    from ddim_fast.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear(1000)
    st = solver_table(kind, 10)
    encode = kind == "encode"
    spacing = "logsnr" if kind.startswith("dpmpp") else "uniform"
    tau = solvers.timesteps(schedule, 10, spacing)
    ts = tau if encode else tau[::-1]
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 48, generator=g, dtype=torch.float64)
    model = reference.GaussianMixtureEps(schedule.alphas_cumprod, means, 0.3)
    x = model.sample_data(4, generator=g).float() if encode else torch.randn(4, 48, generator=g)
    got = _trajectory(C.step, kind, x, model, st, ts, 11)
    oracle = _trajectory(reference.fused_step, kind, x, model, st, ts, 11, torch.float64)
    own = _trajectory(reference.fused_step, kind, x, model, st, ts, 11, torch.float32)
    for name, a, e, t in zip(("x_final", "x0 predictions"), got, oracle, own):
        torch_err = (t.double() - e).abs().max().item()
        floor = torch.finfo(torch.float32).eps * e.abs().max().item()
        assert_close(a, e, atol=2 * max(torch_err, floor), what=f"{kind} trajectory {name}")


# --------------------------------------------------------------------------------------------
# threads, the op wrapper, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim_eta1", "dpmpp_3m", "synthetic", "synthetic_ring"])
def test_one_and_two_threads_give_the_same_bits(C, restore_threads, kind):
    args = make_step_args(kind, (16, 3, 32, 32), dtype=torch.bfloat16, prediction="x0", clip=1.0)
    results = []
    for threads in (1, 2, 3):  # 3: oversubscribed on 2 cores
        torch.set_num_threads(threads)
        results.append(run_op(C.step, args) + (C.gaussian(step_seed(99, 4), [33, 1000], 3, 1),))
    for got in results[1:]:
        _same(got, results[0])


def test_cpp_backend_of_the_op_runs_the_cpp_kernel(C, monkeypatch):
    calls = []
    monkeypatch.setitem(ops._IMPLS, "cpp", lambda: lambda *a: (calls.append(1), ops._cpp_ops().step(*a)))
    args = make_step_args("dpmpp_2m", (2, 3, 33), dtype=torch.float64)
    got = run_op(lambda *a: ops.step(*a, "cpp"), args)
    assert calls == [1]
    _same(got, run_op(C.step, args))
    assert_step_close(got, args, "ops.step backend='cpp'")
    direct = run_op(lambda *a: ops.run_step(*a, "cpp"), args)
    assert calls == [1, 1]
    _same(direct, got)


def test_opcheck(C):
    args = make_step_args("synthetic", (2, 3, 5), noise=False)
    torch.library.opcheck(torch.ops.ddim_fast.step.default, tuple(args[k] for k in OP_ARGS) + ("cpp",))
    torch.library.opcheck(C.step.default, tuple(args[k] for k in OP_ARGS), test_utils=("test_schema", "test_faketensor"))


def test_under_torch_compile_fullgraph(C):
    args = make_step_args("dpmpp_3m", (2, 3, 33), prediction="v")

    def f(x, m, table, seed, history, out, x0_out, flags):
        torch.ops.ddim_fast.step(x, m, table, args["step"], seed, 1, 0.0, 0, history, None, None, out, x0_out, flags, "cpp")
        return out

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # (inductor: a C++ build per test, ~30 s here)

    def run(fn):
        a = copy_step_args(args)
        fn(a["x"], a["model_out"], a["table"], a["seed"], a["history"], a["out"], a["x0_out"], a["flags"])
        return step_outputs(a)

    _same(run(compiled), run(f))
    _same(run(f), run_op(C.step, args))


def test_unavailable_extension_gives_one_warning_and_the_reference(no_extension):
    args = make_step_args("dpmpp_2m", (2, 3, 33))
    with pytest.warns(RuntimeWarning) as record:
        backend = ops.resolve_backend("auto", "cpu")
        assert ops.resolve_backend("auto", "cpu") == "torch"
    assert backend == "torch"
    assert [str(w.message) for w in record if "ddim_fast" in str(w.message)] == [str(record[0].message)]
    assert "C++ backend is unavailable" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        got = run_op(lambda *a: ops.step(*a, backend), args)
    _same(got, reference_result(args, torch.float32))
    with pytest.warns(RuntimeWarning, match='backend="cpp" is unavailable'):
        assert ops.resolve_backend("cpp", "cpu") == "torch"  # asked by name: says so once more


def test_cpp_asked_by_name_without_the_extension_is_one_warning_with_the_reason(no_extension):
    with pytest.warns(RuntimeWarning) as record:
        assert ops.resolve_backend("cpp", "cpu") == "torch"
    messages = [str(w.message) for w in record if "ddim_fast" in str(w.message)]
    assert len(messages) == 1, messages
    assert 'backend="cpp" is unavailable on cpu tensors' in messages[0] and "no compiler (simulated)" in messages[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 3, 33, dtype=torch.float16)), "x must be a contiguous float32"),
        (dict(model_out=torch.zeros(2, 3, 32)), "model_out must be"),
        (dict(out=torch.zeros(2, 33, 3).transpose(1, 2)), "out must be"),
        (dict(table=torch.zeros(10, layout.NUM_COLUMNS - 1)), "table must be"),
        (dict(step=10), "step must be a row"),
        (dict(history=torch.zeros(2, 2, 3, 32)), "history must be"),
        (dict(flags=torch.zeros(10, 2, dtype=torch.int64)), "flags must be"),
        (dict(seed=torch.zeros(3, dtype=torch.int64)), "seed must be"),
        (dict(prediction=3), "prediction must be"),
    ],
)
def test_memory_is_protected_in_cpp(C, change, message):
    """The kernel's own checks (ops.check_step_args is the validation): a RuntimeError naming the argument."""
    args = {**make_step_args("dpmpp_2m", (2, 3, 33)), **change}
    args["table"][:, layout.SIGMA] = 1.0  # the seed is read
    with pytest.raises(RuntimeError, match=f"ddim_fast_C::step: {message}"):
        C.step(*(args[k] for k in OP_ARGS))


# --------------------------------------------------------------------------------------------
# the noise (48-bit sample index: issue 17 defect 4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, shape, step, stream, offset",
    [
        (0, (1, 1), 0, 0, 0),
        (1234, (3, 5, 33), 7, 1, 5),
        (2**40 + 17, (2, 3, 16, 16), 999, 1, 0),  # the key's high word in use
        (2**63 - 1, (4, 7), 2**32 - 1, 0, 2**32 - 2),  # the largest seed and step; samples 2**32 - 2 .. 2**32 + 1
        (5, (3, 4099), 2, 1, 2**40 - 1),  # samples across 2**40
        (9, (2, 3), 1, 1, 2**48 - 2),  # the last two sample indices
    ],
)
def test_noise_matches_the_reference(C, seed, shape, step, stream, offset):
    z = C.gaussian(step_seed(seed, offset), list(shape), step, stream)
    z_ref = reference.gaussian(seed, shape, step=step, stream=stream, sample_offset=offset)
    assert_close(z, z_ref, atol=1e-6, what=f"z(seed={seed}, step={step}, stream={stream}, offset={offset})")


GENERATORS = {0: "portable", 1: "AVX-512", 2: "AVX2"}  # ddim_fast_C::noise_impl's choices


def _use_generator(C, choice):
    best = C.noise_impl(-1)
    try:
        if C.noise_impl(choice) != choice:
            pytest.skip(f"no {GENERATORS[choice]} on this CPU")
        yield choice
    finally:
        C.noise_impl(best)


@pytest.fixture(params=sorted(GENERATORS), ids=list(GENERATORS.values()))
def generator(request, C):
    """Each of the kernel's noise generators in turn, where the CPU has it (else skipped)."""
    yield from _use_generator(C, request.param)


@pytest.fixture(params=[1, 2], ids=[GENERATORS[1], GENERATORS[2]])
def vector_generator(request, C):
    """Each vector generator the CPU has."""
    yield from _use_generator(C, request.param)


def test_noise_impl_defaults_to_the_fastest_generator(C):
    best = C.noise_impl(-1)
    try:
        assert C.noise_impl(-2) == best
        has = [g for g in GENERATORS if C.noise_impl(g) == g]
        assert has[0] == 0 and best == (1 if 1 in has else 2 if 2 in has else 0)
        with pytest.raises(RuntimeError, match="choice must be"):
            C.noise_impl(3)
    finally:
        C.noise_impl(best)


@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 1000), (5, 1), (4, 3, 32, 32), (3, 3075)], ids=str)
def test_each_generator_gives_the_portable_bits(C, vector_generator, shape):
    """Every vector generator and the portable one: the same IEEE operations, FMAs included, in
    the same order, hence the same bits."""
    args = make_step_args("ddim_eta1", shape, offset=2**32 - 1)
    fast = C.gaussian(step_seed(2**40 + 3, 2**32 - 2), list(shape), 5, 1), run_op(C.step, args)
    assert C.noise_impl(0) == 0
    portable = C.gaussian(step_seed(2**40 + 3, 2**32 - 2), list(shape), 5, 1), run_op(C.step, args)
    assert torch.equal(fast[0], portable[0])
    _same(fast[1], portable[1])


# Every tail: D = 1 .. 70 elements per sample covers each remainder mod 4 (a cut Philox group)
# and mod 64 (a cut 16-group of the vector paths); 1536 and 3072 put whole 16-groups straight
# into the output (philox.h fill_noise), 1538 / 3075 go through its scratch copy, and 2 x 1536 /
# 3 x 3075 start samples inside a 1,024-element tile.
NOISE_SIZES = [(2, d) for d in range(1, 71)] + [(2, 1536), (3, 1538), (1, 3072), (3, 3075), (4, 3, 32, 32)]


@pytest.mark.parametrize("shape", NOISE_SIZES, ids=str)
def test_each_generator_matches_the_reference_at_every_tail(C, generator, shape):
    z = C.gaussian(step_seed(2**40 + 9, 2**32 - 1), list(shape), 6, 1)
    z_ref = reference.gaussian(2**40 + 9, shape, step=6, stream=1, sample_offset=2**32 - 1)
    assert_close(z, z_ref, atol=1e-6, what=f"z {shape} ({GENERATORS[generator]} generator)")
    args = make_step_args("ddim_eta1", shape, offset=7)
    assert_step_close(run_op(C.step, args), args, f"ddim_eta1 {shape} ({GENERATORS[generator]} generator)")


def test_sample_two_to_the_32_is_not_sample_0(C):
    z0 = C.gaussian(step_seed(3, 0), [1, 64], 0, 1)
    z32 = C.gaussian(step_seed(3, 2**32), [1, 64], 0, 1)
    assert not torch.isclose(z0, z32).any()
    assert_close(z32, reference.gaussian(3, (1, 64), step=0, stream=1, sample_offset=2**32), atol=1e-6)


def test_noise_within_1e6_on_a_million_draws(C):
    z = C.gaussian(step_seed(77, 0), [256, 4096], 11, 1)
    assert_close(z, reference.gaussian(77, (256, 4096), step=11), atol=1e-6, what="z over 2^20 draws")
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3


def test_in_kernel_noise_is_the_gaussian_op(C):
    """A row with only sigma = 1 (and c_x0 = 1 on a zero x0) gives x_next = z."""
    table = torch.zeros(3, layout.NUM_COLUMNS)
    table[:, layout.SQRT_ALPHA] = 1.0
    table[:, layout.SIGMA] = 1.0
    x = torch.zeros(3, 5, 33)
    out = torch.empty_like(x)
    C.step(x, x, table, 2, step_seed(55, 2**32 - 1), 0, 0.0, 0, None, None, None, out, None, None)
    assert torch.equal(out, C.gaussian(step_seed(55, 2**32 - 1), [3, 5, 33], 2, layout.STREAM_STEP))


def test_a_sample_does_not_depend_on_its_batch(C):
    args = make_step_args("ddim_eta1", (7, 3, 5, 11), offset=2**32 - 3)
    batch = run_op(C.step, args)[0]
    for i in (0, 3, 6):
        part = {k: (v[i : i + 1] if k in ("x", "model_out", "out", "x0_out") else v) for k, v in args.items()}
        part["seed"] = step_seed(1234, 2**32 - 3 + i)
        assert torch.equal(run_op(C.step, part)[0][0], batch[i]), f"sample {i} alone differs"


def test_the_seed_is_read_at_each_call(C):
    args = make_step_args("ddim_eta1", (2, 3, 16))
    first = run_op(C.step, args)[0]
    args["seed"].copy_(torch.tensor([2, 0]))
    assert not torch.equal(first, run_op(C.step, args)[0])


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def test_contract_version_and_availability(C):
    assert C.contract_version() == layout.CONTRACT_VERSION
    assert ops.cpp_available() and ops.resolve_backend("auto", "cpu") == "cpp"


def test_sources_are_found():
    assert all(os.path.isfile(p) for p in _ext.source_files())


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DDIM_FAST_BUILD_EXT", "0")
    with pytest.raises(RuntimeError, match="DDIM_FAST_BUILD_EXT=0"):
        _ext.load()
