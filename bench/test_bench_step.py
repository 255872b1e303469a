"""The fused step alone (``ddim_fast::step``), on a 64x3x32x32 float32 batch on the CPU (issue 13's targets).

Run: ``OMP_NUM_THREADS=1 pytest bench/test_bench_step.py --benchmark-only -q`` (the ratios are
printed in the terminal summary and stored in ``extra_info``; ``--benchmark-json out.json``
keeps them). ``pytest bench/ --benchmark-disable`` runs each callable once (CI).

One group per row lines the providers up in pytest-benchmark's table:

- ``cpp-op``: ``torch.ops.ddim_fast_C.step``, the C++ kernel as ``backend="cpp"`` runs it, x_t and
  x_next in two buffers, no finite flags;
- ``cpp-op-flags``: the same writing the finite flags (issue 13: no extra pass, ratio ~1);
- ``cpp-op+sum``: the op without flags plus the separate check it replaces, a ``torch.sum`` of the
  model output (one more read of 768 KiB) whose finiteness the loop tested;
- ``cpp-op-inplace``: x_next written over x_t (the sampler's state buffer);
- ``cpp-op-portable-noise`` (eta = 1, CPUs with AVX-512 or AVX2): the op with the portable
  generator instead of the vector one the CPU uses (``ddim_fast_C::noise_impl``): the figure
  that keeps each vector path (issue 13: >= 1.3x end to end);
- ``run_step``: ``ops.run_step``, the sampler's direct call (Python, no custom-op dispatch);
- ``ops.step``: through the ``ddim_fast::step`` custom op (dispatch and validation included);
- ``reference``: ``reference.fused_step`` in float32;
- ``diffusers``: ``DDIMScheduler.step`` as a user calls it (eta = 1: ``generator=``, so the
  scheduler draws its noise with ``torch.randn``); left out where diffusers is not installed;
- ``torch.add`` (eta = 0 and 2M): one ``torch.add(x, e, alpha=a, out=o)``, two tensors read and one
  written, the memory-bound limit of the DDIM row; ``torch.randn`` (eta = 1): the noise alone.

pytest-benchmark times each test on its own, minutes apart on a machine shared with other jobs,
so the ratios are measured inside the ``cpp-op`` test: the providers take turns, a few calls
each, round after round, and their medians (and minimums) are compared. Nothing here asserts on
time.
"""

import statistics
import time

import pytest
import torch
from _timing import interleaved_seconds

from ddim_fast import _ext, layout, ops, reference, solvers
from ddim_fast.schedule import NoiseSchedule

SHAPE = (64, 3, 32, 32)
STEPS, K = 50, 10  # a 50-step trajectory; its 11th row


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
            if num in t and den in t:
                info[f"{key}_{stat}"] = t[num] / t[den]
    info["GB_per_s"] = bytes_per_element * torch.Size(SHAPE).numel() / statistics.median(times["cpp-op"]) / 1e9
    ratio_text = ", ".join(f"{k} {v:.2f}" for k, v in info.items() if k.startswith(("speedup", "time_")))
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
def C():
    try:
        _ext.load()
    except Exception as e:  # the bench reports what it can measure
        pytest.skip(f"the C++ extension is unavailable: {e}")
    assert ops.resolve_backend("cpp", "cpu") == "cpp"
    return torch.ops.ddim_fast_C


def _diffusers_step(eta, eps, x):
    """DDIMScheduler.step at the same row, or None without diffusers."""
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading",
                              steps_offset=0, set_alpha_to_one=True, clip_sample=False)  # fmt: skip
    scheduler.set_timesteps(STEPS)
    t = int(scheduler.timesteps[K])
    if eta == 0:
        return lambda: scheduler.step(eps, t, x, eta=0.0)
    gen = torch.Generator().manual_seed(1)
    return lambda: scheduler.step(eps, t, x, eta=eta, generator=gen)


def _providers(row: str, C) -> dict:
    """name -> zero-argument callable, all on the same data: row "eta0", "eta1" (DDIM) or "dpmpp_2m"."""
    schedule = NoiseSchedule.linear(1000)
    if row == "dpmpp_2m":
        st = solvers.build("dpmpp_2m", schedule, solvers.logsnr_timesteps(schedule, STEPS))
    else:
        st = solvers.build("ddim", schedule, solvers.timesteps(schedule, STEPS, "uniform"), 1.0 if row == "eta1" else 0.0)
    table = st.table.to(torch.float32).contiguous()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    out = torch.empty(SHAPE)
    history = torch.randn((st.history_slots, *SHAPE), generator=g) if st.history_slots else None
    if history is not None:
        assert table[K, layout.C_H] != 0  # a second-order row: the ring is read
    seed = torch.tensor([0, 0], dtype=torch.int64)
    flags = torch.zeros((st.steps, 2), dtype=torch.int32)
    pred = layout.PREDICTIONS["epsilon"]
    kind = st.history_kind
    x_work = x.clone()  # the in-place variant's x_t (it drifts call after call; the time does not)

    def args(x_in, out_, flags_):
        return (x_in, eps, table, K, seed, pred, 0.0, kind, history, None, None, out_, None, flags_)

    fns = {
        "cpp-op": lambda: C.step(*args(x, out, None)),
        "cpp-op-flags": lambda: C.step(*args(x, out, flags)),
        "cpp-op+sum": lambda: (C.step(*args(x, out, None)), torch.sum(eps)),
        "cpp-op-inplace": lambda: C.step(*args(x_work, x_work, flags)),
        "run_step": lambda: ops.run_step(*args(x, out, flags), "cpp"),
        "ops.step": lambda: ops.step(*args(x, out, flags), "cpp"),
        "reference": lambda: reference.fused_step(*args(x, out, flags)),
    }
    fast = C.noise_impl(-1)
    if row == "eta1" and fast != 0:

        def portable():
            C.noise_impl(0)
            C.step(*args(x, out, flags))
            C.noise_impl(fast)

        fns["cpp-op-portable-noise"] = portable
    if row != "dpmpp_2m":
        diffusers = _diffusers_step(1.0 if row == "eta1" else 0.0, eps, x)
        if diffusers is not None:
            fns["diffusers"] = diffusers
    if row == "eta1":
        fns["torch.randn"] = lambda: torch.randn(SHAPE)
    else:
        fns["torch.add"] = lambda: torch.add(x, eps, alpha=0.37, out=out)
    return fns


PROVIDERS = {
    "eta0": ("cpp-op", "cpp-op-flags", "cpp-op+sum", "cpp-op-inplace", "run_step", "ops.step", "reference", "diffusers", "torch.add"),
    "eta1": ("cpp-op", "cpp-op-flags", "cpp-op+sum", "cpp-op-inplace", "cpp-op-portable-noise", "run_step", "ops.step", "reference",
             "diffusers", "torch.randn"),
    "dpmpp_2m": ("cpp-op", "cpp-op-flags", "cpp-op+sum", "run_step", "reference", "torch.add"),
}
# bytes moved per element by the op: x and model_out read and x_next written (float32); 2M also
# reads one ring slot and writes another.
BYTES_PER_ELEMENT = {"eta0": 12, "eta1": 12, "dpmpp_2m": 20}
RATIOS = {
    "time_vs_torch_add": ("cpp-op", "torch.add"),  # eta 0: target <= 1.1
    "time_vs_torch_randn": ("cpp-op", "torch.randn"),  # eta 1: below 1, the noise is drawn in-kernel
    "time_flags_vs_no_flags": ("cpp-op-flags", "cpp-op"),  # ~1.0: the finite check costs no pass
    "time_flags_vs_op_plus_sum": ("cpp-op-flags", "cpp-op+sum"),  # < 1: the old separate check
    "speedup_vs_diffusers": ("diffusers", "cpp-op-flags"),
    "speedup_vs_diffusers_through_ops_step": ("diffusers", "ops.step"),
    "speedup_vs_reference": ("reference", "cpp-op-flags"),
    "speedup_vector_noise": ("cpp-op-portable-noise", "cpp-op-flags"),  # >= 1.3 keeps the vector generator in use
}
CASES = [(row, p) for row, names in PROVIDERS.items() for p in names]


@pytest.mark.parametrize("row, provider", CASES, ids=[f"{row}-{p}" for row, p in CASES])
def test_step(benchmark, C, report_ratio, row, provider):
    fns = _providers(row, C)
    if provider not in fns:
        pytest.skip(f"{provider} is not available here (not installed, or no vector noise generator)")
    benchmark.group = f"fused step 64x3x32x32 fp32, {row} ({torch.get_num_threads()} threads)"
    benchmark.pedantic(fns[provider], rounds=200, iterations=1, warmup_rounds=20)
    if benchmark.disabled or provider != "cpp-op":
        return
    info = benchmark.extra_info
    info["noise_generator"] = {0: "portable", 1: "AVX-512", 2: "AVX2"}[C.noise_impl(-1)]
    report_ratio(f"{row} ({info['noise_generator']} noise): " + _record(info, _interleaved_times(fns), RATIOS, BYTES_PER_ELEMENT[row]))
    report_ratio(f"{row}: median us {info['median_us']}; min us {info['min_us']}")
