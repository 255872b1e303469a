"""The fused step alone, on a 64x3x32x32 float32 batch on the CPU (issue 4's targets).

Run: ``pytest bench/test_bench_step.py --benchmark-only`` (``-s`` is not needed: the ratios are
printed in the terminal summary and stored in ``extra_info``; ``--benchmark-json out.json``
keeps them).

One group per eta lines the providers up in pytest-benchmark's table:

- ``cpp-op``: ``torch.ops.ddim_fast_C.step``, the C++ kernel as ``backend="cpp"`` runs it,
  x_t and x_prev in two buffers (the sampler's ping-pong);
- ``cpp-op-inplace``: the same with x_prev written over x_t (one buffer less to stream);
- ``ops.step``: the same through the ``ddim_fast::step`` custom op (its Python dispatch included);
- ``diffusers``: ``DDIMScheduler.step`` as a user calls it (eta = 1: ``generator=``, so the
  scheduler draws its noise with ``torch.randn``);
- ``torch.add``: one ``torch.add(x, e, alpha=a, out=o)`` (eta = 0: the memory-bound limit,
  two tensors read and one written, as the fused step does);
- ``torch.randn``: drawing the same shape alone (eta = 1: the fused step draws its noise too).

The multistep step (``test_multistep_step``: DPM-Solver++(2M) at a second-order row) lines up
the C++ op (``torch.ops.ddim_fast_C.multistep_step``), the sampler's direct path, the PyTorch
reference ``solvers.multistep_step`` and ``torch.add``, with the same interleaved ratios.

pytest-benchmark times each test on its own, minutes apart on a machine shared with other
jobs, so the ratios are measured inside the ``cpp-op`` test: the providers take turns, a few
calls each, round after round, and their medians (and minimums) are compared. Nothing here
asserts on time.
"""

import statistics
import time

import pytest
import torch
from _timing import interleaved_seconds

from ddim_fast import _ext, ops, reference, solvers
from ddim_fast.schedule import NoiseSchedule, select_timesteps, step_table

SHAPE = (64, 3, 32, 32)
STEPS, K = 50, 10  # a 50-step trajectory; its 11th step (t = 780 -> 760)
BYTES_PER_ELEMENT = 12  # x and model_out read, x_prev written, float32 (noise is drawn in-kernel)


def _interleaved_times(fns: dict) -> dict:
    """Per-call seconds of each fn: 60 rounds of 5 back-to-back calls per fn, the fns taking turns."""
    return interleaved_seconds(fns, rounds=60, block=5, warmup=2)


def _record(info: dict, times: dict, ratios: dict, bytes_per_element: int) -> str:
    """Medians and minimums of ``times`` and each ratio name -> (numerator, denominator) into
    ``info``; returns the one-line summary. Minimums too: on this shared machine a parallel region
    sometimes waits a whole scheduler tick for its second thread, which only ever adds time."""
    for stat, f in (("median", statistics.median), ("min", min)):
        t = {name: f(ts) for name, ts in times.items()}
        info[f"{stat}_us"] = {name: round(v * 1e6, 2) for name, v in t.items()}
        for key, (num, den) in ratios.items():
            info[f"{key}_{stat}"] = t[num] / t[den]
    info["GB_per_s"] = bytes_per_element * torch.Size(SHAPE).numel() / statistics.median(times["cpp-op"]) / 1e9
    ratio_text = ", ".join(f"{k} {v:.2f}" for k, v in info.items() if k.startswith(("speedup", "time_vs")))
    return f"{ratio_text}; {info['GB_per_s']:.0f} GB/s"


@pytest.fixture(scope="module", autouse=True)
def _settled_thread_pool(request):
    """Run parallel regions until they stop stalling before timing anything.

    On these 2 shared cores, the first calls of a fresh process each wait ~8 ms for the
    OpenMP worker thread to get a core (a new thread starts behind the busy processes in the
    scheduler's queue), for torch.add and this kernel alike; left in, that start-up transient
    lands on whichever test runs first.
    """
    if request.config.getoption("benchmark_disable", False):
        return
    x = torch.randn(SHAPE)
    deadline, fast_in_a_row = time.perf_counter() + 10.0, 0
    while fast_in_a_row < 200 and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.add(x, x, alpha=0.5, out=x)
        fast_in_a_row = fast_in_a_row + 1 if time.perf_counter() - t0 < 1e-3 else 0


@pytest.fixture(scope="module")
def cpp_op():
    try:
        return _ext.load()
    except Exception as e:  # the bench reports what it can measure
        pytest.skip(f"the C++ extension is unavailable: {e}")


def _providers(eta: float, op) -> dict:
    """name -> zero-argument callable, all on the same data."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    out = torch.empty(SHAPE)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading",
                              steps_offset=0, set_alpha_to_one=True, clip_sample=False)  # fmt: skip
    scheduler.set_timesteps(STEPS)
    t = int(scheduler.timesteps[K])
    coef = step_table(NoiseSchedule.linear(1000), select_timesteps(1000, STEPS, "uniform"), eta).to(torch.float32)
    seed = torch.tensor([0, 0], dtype=torch.int64)
    stochastic = eta > 0
    pred = reference.PREDICTIONS["epsilon"]
    gen = torch.Generator().manual_seed(1)
    x_work = x.clone()  # the in-place variant's x_t (it drifts call after call; the time does not)
    fns = {
        "cpp-op": lambda: op(x, eps, coef, K, seed, pred, 0.0, stochastic, None, out, None),
        "cpp-op-inplace": lambda: op(x_work, eps, coef, K, seed, pred, 0.0, stochastic, None, x_work, None),
        "ops.step": lambda: ops.step(x, eps, coef, K, seed, pred, 0.0, stochastic, None, out, None, "cpp"),
        # what FusedSampler's eager loop calls (no custom-op dispatch), in place as the loop runs it
        "sampler-path": lambda: ops.fused_step(x_work, eps, coef, K, seed, pred, 0.0, stochastic, None, x_work, None, "cpp"),
        "reference": lambda: reference.fused_step(x, eps, coef, K, seed, pred, 0.0, stochastic, None, out, None),
        "diffusers": (
            (lambda: scheduler.step(eps, t, x, eta=eta, generator=gen)) if stochastic else (lambda: scheduler.step(eps, t, x, eta=0.0))
        ),
    }
    if stochastic:
        fns["torch.randn"] = lambda: torch.randn(SHAPE)
    else:
        fns["torch.add"] = lambda: torch.add(x, eps, alpha=0.37, out=out)
    return fns


_COMMON = ("cpp-op", "cpp-op-inplace", "sampler-path", "ops.step", "reference", "diffusers")
CASES = [(0.0, p) for p in (*_COMMON, "torch.add")]
CASES += [(1.0, p) for p in (*_COMMON, "torch.randn")]


@pytest.mark.parametrize("eta, provider", CASES, ids=[f"eta{eta:g}-{p}" for eta, p in CASES])
def test_step(benchmark, cpp_op, report_ratio, eta, provider):
    fns = _providers(eta, cpp_op)
    benchmark.group = f"fused step 64x3x32x32 fp32, eta={eta:g} ({torch.get_num_threads()} threads)"
    benchmark.pedantic(fns[provider], rounds=200, iterations=1, warmup_rounds=20)
    if benchmark.disabled or provider != "cpp-op":
        return
    ratios = {
        "speedup_vs_diffusers": ("diffusers", "cpp-op"),
        "speedup_vs_diffusers_inplace": ("diffusers", "cpp-op-inplace"),
        "speedup_vs_diffusers_through_ops_step": ("diffusers", "ops.step"),
    }
    if eta == 0:
        ratios["time_vs_torch_add"] = ("cpp-op", "torch.add")  # target <= 1.5
    else:
        ratios["time_vs_torch_randn"] = ("cpp-op", "torch.randn")  # target < 1
    info = benchmark.extra_info
    report_ratio(f"eta={eta:g}: " + _record(info, _interleaved_times(fns), ratios, BYTES_PER_ELEMENT))
    report_ratio(f"eta={eta:g}: median us {info['median_us']}; min us {info['min_us']}")


# --------------------------------------------------------------------------------------------
# The fused multistep step (DPM-Solver++(2M), issue 8): the C++ op against the PyTorch reference
# --------------------------------------------------------------------------------------------

MS_BYTES_PER_ELEMENT = 20  # x, model_out, x0_{k-1} read; x_next, x0_k (ring) written; float32


def _multistep_providers(op) -> dict:
    """name -> zero-argument callable on the same data: DPM-Solver++(2M), row K of a 50-step
    log-SNR table (a second-order row: c_1 != 0, so the ring is read)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    out = torch.empty(SHAPE)
    schedule = NoiseSchedule.linear(1000)
    coef = solvers.multistep_table(schedule, solvers.logsnr_timesteps(schedule, STEPS), "dpmpp_2m").to(torch.float32)
    assert solvers.step_orders(STEPS, 2)[K] == 2 and coef[K, 4] != 0
    history = torch.randn((solvers.HISTORY_SLOTS["dpmpp_2m"], *SHAPE), generator=g)
    pred = reference.PREDICTIONS["epsilon"]
    x_work = x.clone()  # the in-place variant's x_t (it drifts call after call; the time does not)
    return {
        "cpp-op": lambda: op(x, eps, coef, K, pred, 0.0, history, out, None),
        "cpp-op-inplace": lambda: op(x_work, eps, coef, K, pred, 0.0, history, x_work, None),
        # what FusedSampler's eager loop calls (no custom-op dispatch)
        "sampler-path": lambda: ops.fused_multistep_step(x_work, eps, coef, K, pred, 0.0, history, x_work, None, "cpp"),
        "reference": lambda: solvers.multistep_step(x, eps, coef, K, pred, 0.0, history, out, None),
        "torch.add": lambda: torch.add(x, eps, alpha=0.37, out=out),
    }


@pytest.fixture(scope="module")
def cpp_multistep_op(cpp_op):
    try:
        return torch.ops.ddim_fast_C.multistep_step
    except (AttributeError, RuntimeError) as e:
        pytest.skip(f"the C++ extension has no multistep_step op (a stale build?): {e}")


MS_CASES = ("cpp-op", "cpp-op-inplace", "sampler-path", "reference", "torch.add")


@pytest.mark.parametrize("provider", MS_CASES, ids=[f"dpmpp_2m-{p}" for p in MS_CASES])
def test_multistep_step(benchmark, cpp_multistep_op, report_ratio, provider):
    fns = _multistep_providers(cpp_multistep_op)
    benchmark.group = f"multistep step (dpmpp_2m, second order) 64x3x32x32 fp32 ({torch.get_num_threads()} threads)"
    benchmark.pedantic(fns[provider], rounds=200, iterations=1, warmup_rounds=20)
    if benchmark.disabled or provider != "cpp-op":
        return
    ratios = {
        "speedup_vs_reference": ("reference", "cpp-op"),
        "speedup_vs_reference_inplace": ("reference", "cpp-op-inplace"),
        "speedup_vs_reference_sampler_path": ("reference", "sampler-path"),
        "time_vs_torch_add": ("cpp-op", "torch.add"),
    }
    info = benchmark.extra_info
    report_ratio("multistep dpmpp_2m: " + _record(info, _interleaved_times(fns), ratios, MS_BYTES_PER_ELEMENT))
    report_ratio(f"multistep dpmpp_2m: median us {info['median_us']}; min us {info['min_us']}")
