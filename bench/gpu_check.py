"""The GPU acceptance run: every CUDA-dependent check and the GPU speed figures, in one command.

    python bench/gpu_check.py --out DIR            # at most ~5 minutes on one GPU

Runs from a source checkout (no ``pip install``; the C++ extension is not used) and writes
``DIR/report.md`` and ``DIR/report.json`` (rewritten after every check, so a run killed half
way still leaves what it measured). Each check is recorded as pass / fail (with its error) /
skip; one failure never stops the others. Sections, each time-boxed (a check that would start
after its section's or the whole run's budget is recorded as skipped):

- kernel:    the Triton step compiled for the GPU (not interpreted) against the float64
             reference for every row kind (DDIM eta 0 / 0.5 / 1 / sigma-hat, encode, DPM-Solver++
             2M / 3M, a synthetic row using every column), predictions, clip, fp16/bf16 model
             outputs, odd shapes; the finite flags; the op inside CUDA-graph capture and under
             torch.compile(fullgraph=True); Philox noise on the GPU against the CPU reference;
- sampler:   FusedSampler with the whole trajectory captured against eager (fp32, eta 1 with a
             new seed per replay, DPM-Solver++(2M), fp16 autocast), fp16 autocast against fp32
             (within 2x a plain loop's own fp16 error), and the captured graph with compile;
- precision: one model call under fp32, fp16/bf16 autocast and fp16/bf16 weights;
- speed:     steps/s at batch 1, 8 and 64 of diffusers' DDIM loop (only when diffusers is
             importable), a plain PyTorch DDIM loop, the bare model loop, ours eager, ours with
             the captured graph, and ours with graph + compile;
- bandwidth: the Triton step against one ``torch.add(x, e, alpha=, out=)`` on 64x3x256x256.

The model is this package's own UNet (~5.0M parameters, 3x32x32), with a random non-zero
output layer so trajectories depend on it. Without a CUDA device the script prints
"no CUDA device: nothing checked" and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = "no CUDA device: nothing checked"
BUDGET_S = 290.0  # the limit is 5 minutes in total, start-up and report included
RESERVE_S = 8.0  # kept back for the last report write
SECTIONS = {"environment": 15, "kernel": 55, "sampler": 60, "precision": 15, "speed": 110, "bandwidth": 20}
STEPS = 20
SPEED_BATCHES = (8, 64, 1)  # 8: the CPU bench's batch, first, so that a time box cuts 1 and 64 first
PRECISION_BATCH = 64
DEVICE = "cuda"  # the checks' device; a developer's dry run of the sections on a CPU sets it to "cpu"
UNET_CONFIG = dict(in_channels=3, resolution=32, ch=48, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.0, num_groups=16)  # fmt: skip


# --------------------------------------------------------------------------------------------
# the report: records, time boxes, writers (everything here runs without CUDA, for the tests)
# --------------------------------------------------------------------------------------------


class CheckTimeout(BaseException):
    """Raised by the alarm inside a check that ran past its time box (a BaseException, so that
    an ``except Exception`` fallback inside the code under test cannot swallow it)."""


class Report:
    """Results of one run: ``check`` runs one callable and records pass / fail / skip."""

    def __init__(self, out_dir, budget_s: float = BUDGET_S, clock=time.monotonic, meta=None):
        self.out_dir = out_dir
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + budget_s
        self.meta = dict(meta or {})
        self.results = []
        self._section, self._section_deadline = None, self.deadline

    @contextlib.contextmanager
    def section(self, name: str, budget_s: float):
        self._section = name
        self._section_deadline = min(self.clock() + budget_s, self.deadline - RESERVE_S)
        try:
            yield
        finally:
            self._section, self._section_deadline = None, self.deadline

    def time_left(self) -> float:
        return min(self._section_deadline, self.deadline - RESERVE_S) - self.clock()

    def check(self, name: str, fn, *, min_s: float = 1.0):
        """Run ``fn()`` (returns a dict of metrics or None) unless less than ``min_s`` is left."""
        left = self.time_left()
        record = {"section": self._section, "name": name, "status": "skip", "seconds": 0.0, "error": None, "metrics": {}}
        if left < min_s:
            record["error"] = f"time box: {max(left, 0):.0f} s left in this section, the check needs ~{min_s:.0f} s"
            self.results.append(record)
            self.write()
            return record
        t0 = self.clock()
        with _alarm(left):
            try:
                record["metrics"] = _jsonable(fn() or {})
                record["status"] = "pass"
            except CheckTimeout:
                record["status"], record["error"] = "fail", f"timed out after {left:.0f} s (the section's time box)"
            except Exception as exc:  # noqa: BLE001 - a failing check is a result, not the end of the run
                record["status"] = "fail"
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = "".join(traceback.format_exc().splitlines(True)[-12:])
        record["seconds"] = round(self.clock() - t0, 3)
        self.results.append(record)
        self.write()
        return record

    def write(self):
        if self.out_dir is not None:
            self.meta["elapsed_s"] = round(self.clock() - self.start, 1)
            write_report(self.out_dir, self.meta, self.results)


@contextlib.contextmanager
def _alarm(seconds: float):
    """CheckTimeout in the main thread after ``seconds`` (no-op where SIGALRM does not exist)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise CheckTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def render_markdown(meta, results) -> str:
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    lines = ["# GPU check", "", f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
             f"in {meta.get('elapsed_s', '?')} s.", ""]  # fmt: skip
    for key in sorted(meta):
        if key != "elapsed_s":
            lines.append(f"- {key}: {_fmt(meta[key])}")
    section = object()
    for r in results:
        if r["section"] != section:
            section = r["section"]
            lines += ["", f"## {section}", "", "| check | status | s | details |", "|---|---|---|---|"]
        details = r["error"] if r["error"] else "; ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items())
        details = str(details).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {r['status'].upper() if r['status'] == 'fail' else r['status']} | {r['seconds']:.1f} | {details} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir, meta, results):
    """Writes report.json and report.md into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    data = {"meta": _jsonable(meta), "counts": counts, "results": _jsonable(results)}
    paths = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    for path, text in zip(paths, (json.dumps(data, indent=1) + "\n", render_markdown(meta, results))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return paths


# --------------------------------------------------------------------------------------------
# imports from a source checkout
# --------------------------------------------------------------------------------------------


def source_checkout_imports() -> None:
    """Make ``ddim_fast`` (and its ``ddim_fast.kernels``, which lives in the top-level kernels/
    folder) importable from the repository, plus bench/ and tests/ for their helpers."""
    for p in (os.path.join(REPO, "tests"), os.path.join(REPO, "bench"), REPO):
        if p not in sys.path:
            sys.path.insert(0, p)
    import ddim_fast

    if importlib.util.find_spec("ddim_fast.kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "ddim_fast.kernels", os.path.join(REPO, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(REPO, "kernels")],
        )  # fmt: skip
        module = importlib.util.module_from_spec(spec)
        sys.modules["ddim_fast.kernels"] = module
        spec.loader.exec_module(module)
        ddim_fast.kernels = module


# --------------------------------------------------------------------------------------------
# the checks (CUDA only from here on)
# --------------------------------------------------------------------------------------------


def _unet(device, seed=0):
    import torch

    from ddim_fast.nn import UNet

    torch.manual_seed(seed)
    model = UNet(**UNET_CONFIG)
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)  # zero-initialised for training: make it matter
    return model.eval().to(device)


def _cuda_seconds(fn, *, repeat=20, warmup=3):
    """Median seconds of ``fn()`` timed with CUDA events (wall time where DEVICE is not CUDA)."""
    import torch

    if DEVICE != "cuda":
        from _timing import median_seconds

        return median_seconds(fn, repeat=repeat, warmup=warmup)

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _sync():
    from _timing import sync

    sync(DEVICE)


def _rel_max(a, b) -> float:
    scale = b.abs().max().item() or 1.0
    return (a.double() - b.double()).abs().max().item() / scale


@contextlib.contextmanager
def _no_capture_fallback():
    """Turns the sampler's 'CUDA graph capture failed' (or compile-failed) warning into a failure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    bad = [str(w.message) for w in caught if "capture failed" in str(w.message) or "compile of the model failed" in str(w.message)]
    if bad:
        raise AssertionError(bad[0])


def environment_checks(report):
    import torch

    def env():
        from ddim_fast import ops
        from ddim_fast.kernels import ddim_step as K
        import triton

        backend = ops.resolve_backend("auto", "cuda")
        assert not K.is_interpreted(), "TRITON_INTERPRET=1 is set: the kernels would run interpreted"
        assert backend == "triton", f'backend="auto" on CUDA resolved to {backend!r}, not "triton"'
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                "diffusers": importlib.util.find_spec("diffusers") is not None, "auto_backend": backend}  # fmt: skip

    rec = report.check("environment", env)
    report.meta.update({k: v for k, v in rec["metrics"].items()})


def kernel_checks(report):
    import torch

    from _utils import assert_step_close, make_step_args, run_op
    from ddim_fast import layout, ops, reference

    def triton_op(*args):
        ops.step(*args, "triton")  # the op with a concrete backend: no fallback is possible

    cases = [(kind, dict()) for kind in ("ddim", "ddim_eta0.5", "ddim_eta1", "ddpm_large", "encode", "dpmpp_2m", "dpmpp_3m", "synthetic")]
    cases += [("ddim", dict(prediction="v")), ("ddim", dict(prediction="x0")), ("ddim", dict(clip=1.0)),
              ("dpmpp_2m", dict(prediction="v", clip=1.0)), ("ddim_eta1", dict(noise=True)),
              ("ddim", dict(dtype=torch.float16)), ("ddim", dict(dtype=torch.bfloat16)),
              ("dpmpp_3m", dict(dtype=torch.float16, prediction="x0")), ("ddim_eta1", dict(shape=(3, 5, 33), offset=7)),
              ("ddim_eta1", dict(shape=(4, 3, 64, 65))), ("dpmpp_3m", dict(shape=(3, 5, 33)))]  # fmt: skip
    for kind, opts in cases:
        opts = {"shape": (2, 3, 17, 19), **opts}
        label = kind + "".join(f" {k}={str(v).replace('torch.', '')}" for k, v in opts.items())

        def one(kind=kind, opts=opts):
            args = make_step_args(kind, device="cuda", **opts)
            actual = run_op(triton_op, args)
            assert_step_close(actual, args, what=kind)

        report.check(f"triton vs float64 reference: {label}", one)

    def flags():
        args = make_step_args("ddim", shape=(4, 3, 8, 8), device="cuda")
        args["model_out"][2, 1, 3, 3] = float("nan")
        _, _, _, _, fl = run_op(triton_op, args)
        assert fl[args["step"], layout.FLAG_MODEL].item() == 1, f"model flag not set: {fl.tolist()}"
        assert fl[args["step"], layout.FLAG_STATE].item() == 1, f"state flag not set: {fl.tolist()}"

    report.check("finite flags: NaN in the model output", flags)

    def captured_op():
        args = make_step_args("ddim_eta1", shape=(8, 3, 32, 32), device="cuda")
        names = ("x", "model_out", "table", "step", "seed", "prediction", "clip", "history_kind", "history", "saved",
                 "noise", "out", "x0_out", "flags")  # fmt: skip
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            triton_op(*(args[k] for k in names))
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            triton_op(*(args[k] for k in names))
        args["seed"].copy_(torch.tensor([99, 3]))  # read from device memory: a replay draws new noise
        graph.replay()
        torch.cuda.synchronize()
        fresh = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
        expected = run_op(triton_op, fresh)
        assert torch.equal(args["out"], expected[0]), "a replay with a new seed differs from an eager call with it"

    report.check("op inside CUDA graph capture, new seed on replay", captured_op)

    def compiled_op():
        args = make_step_args("dpmpp_2m", shape=(2, 3, 16, 16), device="cuda")

        def f(x, m, table, seed, history, out, x0_out, flags):
            torch.ops.ddim_fast.step(x, m, table, args["step"], seed, 0, 0.0, args["history_kind"], history, None, None,
                                     out, x0_out, flags, "triton")  # fmt: skip
            return out * 1.0

        fresh = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args.items()}
        got = torch.compile(f, fullgraph=True)(args["x"], args["model_out"], args["table"], args["seed"], args["history"],
                                               args["out"], args["x0_out"], args["flags"])  # fmt: skip
        want = run_op(triton_op, fresh)[0]
        assert torch.equal(got, want), f"compiled op differs: rel max {_rel_max(got, want):.3g}"

    report.check("op under torch.compile(fullgraph=True)", compiled_op, min_s=10)

    def noise():
        shape = (8, 3, 33, 31)
        gpu = ops.gaussian(1234, shape, stream=layout.STREAM_STEP, sample_offset=5, device="cuda", backend="triton")
        cpu = reference.gaussian(1234, shape, step=0, stream=layout.STREAM_STEP, sample_offset=5, device="cpu")
        err = (gpu.cpu().double() - cpu.double()).abs().max().item()
        part = ops.gaussian(1234, (3, *shape[1:]), stream=layout.STREAM_STEP, sample_offset=7, device="cuda", backend="triton")
        assert torch.equal(part, gpu[2:5]), "samples 7..9 drawn alone differ from the same samples in a batch"
        assert err <= 1e-5, f"GPU noise differs from the CPU reference by {err:.3g}"
        return {"max_abs_diff_vs_cpu_reference": err}

    report.check("Philox noise: GPU vs CPU reference, batch-independent", noise)


def _sampler(model, **kw):
    from ddim_fast import FusedSampler, NoiseSchedule

    return FusedSampler(model, NoiseSchedule.linear(1000), steps=STEPS, **kw)


def _compiled_sampler(model, **kw):
    """FusedSampler(..., compile=True), or the maybe_compile wrapper where the option is not there yet."""
    try:
        return _sampler(model, compile=True, **kw), "FusedSampler(compile=True)"
    except TypeError as exc:
        if "compile" not in str(exc):
            raise
        from ddim_fast.compile import maybe_compile

        return _sampler(maybe_compile(model, True, DEVICE), **kw), "maybe_compile(model) (no compile= option yet)"


def _plain_loop(model, sampler, x_T, autocast_dtype=None):
    """A plain PyTorch DDIM eta = 0 loop over the sampler's timesteps: the precision baseline."""
    import torch

    from ddim_fast import solvers
    from ddim_fast.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear(1000)
    st = solvers.build("ddim", schedule, solvers.timesteps(schedule, STEPS, "uniform"), 0.0)
    table = st.table.to(torch.float64).to(x_T.device)
    from ddim_fast import layout

    x = x_T.clone()
    with torch.inference_mode():
        for k, t in enumerate(sampler.timesteps.tolist()):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.int64)
            with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                eps = model(x, tt).float()
            row = table[k].float()
            x0 = (x - row[layout.SQRT_ONE_MINUS_ALPHA] * eps) / row[layout.SQRT_ALPHA]
            x = row[layout.C_X0] * x0 + row[layout.C_EPS] * eps
    return x


def sampler_checks(report):
    import torch

    model = _unet(DEVICE)
    x_T = torch.randn(8, 3, 32, 32, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    state = {}

    def graph_vs_eager(label, tol, **kw):
        def run():
            eager = _sampler(model, cuda_graph=False, **kw)
            graph = _sampler(model, cuda_graph=True, **kw)
            want = eager.sample(x_T, seed=0)
            with _no_capture_fallback():
                first = graph.sample(x_T, seed=0)  # warm-up run, then capture
                again = graph.sample(x_T, seed=0)  # replay
            out = {"rel_max_first": _rel_max(first, want), "rel_max_replay": _rel_max(again, want)}
            assert out["rel_max_replay"] <= tol, f"replay differs from eager by {out['rel_max_replay']:.3g} (tol {tol:g})"
            if kw.get("eta", 0) > 0:
                with _no_capture_fallback():
                    new_seed = graph.sample(x_T, seed=1)
                want1 = eager.sample(x_T, seed=1)
                out["rel_max_seed1"] = _rel_max(new_seed, want1)
                assert out["rel_max_seed1"] <= tol, f"replay with seed 1 differs from eager by {out['rel_max_seed1']:.3g}"
                assert _rel_max(new_seed, want) > 1e-3, "seed 1 replayed seed 0's noise: the seed froze in the graph"
            state[label] = want
            return out

        report.check(f"captured trajectory vs eager: {label}", run, min_s=5)

    # float32 rounding of a 20-step trajectory whose cuDNN algorithms may differ between runs
    graph_vs_eager("fp32 eta 0", 1e-4, precision="fp32")
    graph_vs_eager("fp32 eta 1, seed change", 1e-4, precision="fp32", eta=1.0)
    graph_vs_eager("fp32 dpmpp_2m", 1e-4, precision="fp32", solver="dpmpp_2m")
    graph_vs_eager("fp16 autocast eta 0", 1e-2, precision="fp16")

    def fp16_vs_fp32():
        ours16 = _sampler(model, precision="fp16").sample(x_T)
        ours32 = state.get("fp32 eta 0")
        if ours32 is None:
            ours32 = _sampler(model, precision="fp32", cuda_graph=False).sample(x_T)
        ref = _sampler(model, precision="fp32", cuda_graph=False)
        plain32 = _plain_loop(model, ref, x_T)
        plain16 = _plain_loop(model, ref, x_T, torch.float16)
        rms = lambda a, b: (a.double() - b.double()).pow(2).mean().sqrt().item()  # noqa: E731
        out = {"rms_ours_fp16_vs_fp32": rms(ours16, ours32), "rms_plain_fp16_vs_fp32": rms(plain16, plain32),
               "rms_ours_fp32_vs_plain_fp32": rms(ours32, plain32), "rms_images": ours32.pow(2).mean().sqrt().item()}  # fmt: skip
        assert out["rms_ours_fp16_vs_fp32"] <= 2 * out["rms_plain_fp16_vs_fp32"], out
        return out

    report.check("fp16 autocast within 2x a plain loop's fp16 error", fp16_vs_fp32, min_s=5)

    def graph_and_compile():
        t0 = time.perf_counter()
        sampler, how = _compiled_sampler(model, precision="fp32", cuda_graph=True)
        with _no_capture_fallback():
            first = sampler.sample(x_T, seed=0)
            _sync()
            first_s = time.perf_counter() - t0
            again = sampler.sample(x_T, seed=0)
        want = state.get("fp32 eta 0")
        if want is None:
            want = _sampler(model, precision="fp32", cuda_graph=False).sample(x_T, seed=0)
        out = {"how": how, "first_call_s": first_s, "rel_max_first": _rel_max(first, want), "rel_max_replay": _rel_max(again, want)}
        # inductor reorders float32 reductions (GroupNorm, attention): compare at a looser 1e-3
        assert out["rel_max_replay"] <= 1e-3, out
        return out

    report.check("captured trajectory with the compiled model vs eager fp32", graph_and_compile, min_s=30)


def precision_checks(report):
    import torch

    B = PRECISION_BATCH
    x = torch.randn(B, 3, 32, 32, device=DEVICE)
    t = torch.full((B,), 500, device=DEVICE)
    fp32 = _unet(DEVICE)

    def variant(name):
        def run():
            with torch.inference_mode():
                if name.endswith("weights"):
                    dtype = torch.float16 if name.startswith("fp16") else torch.bfloat16
                    model = _unet(DEVICE).to(dtype)
                    fn = lambda: model(x.to(dtype), t).float()  # noqa: E731
                elif name.endswith("autocast"):
                    dtype = torch.float16 if name.startswith("fp16") else torch.bfloat16

                    def fn():
                        with torch.autocast(DEVICE, dtype=dtype):
                            return fp32(x, t).float()
                else:
                    fn = lambda: fp32(x, t)  # noqa: E731
                ref = fp32(x, t)
                rms = (fn() - ref).pow(2).mean().sqrt().item()
                sec = _cuda_seconds(fn)
            return {"batch": B, "ms_per_call": 1e3 * sec, "rms_vs_fp32": rms}

        report.check(f"model call {name}", run, min_s=2)

    for name in ("fp32", "fp16 autocast", "fp16 weights", "bf16 autocast", "bf16 weights"):
        variant(name)


def speed_checks(report):
    import torch

    from _timing import interleaved_seconds

    model = _unet(DEVICE)
    have_diffusers = importlib.util.find_spec("diffusers") is not None

    for B in SPEED_BATCHES:
        def run(B=B):
            x_T = torch.randn(B, 3, 32, 32, device=DEVICE)
            eager = _sampler(model, cuda_graph=False)
            graph = _sampler(model, cuda_graph=True)
            ts = [torch.full((B,), int(t), device=DEVICE) for t in graph.timesteps.tolist()]

            def model_loop():
                with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.float16):
                    for t in ts:
                        model(x_T, t)

            def plain_loop():
                _plain_loop(model, graph, x_T, torch.float16)

            fns = {"ours_eager": lambda: eager.sample(x_T), "ours_graph": lambda: graph.sample(x_T),
                   "model_only": model_loop, "plain_torch_loop": plain_loop}  # fmt: skip
            if have_diffusers:
                from diffusers import DDIMScheduler

                sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="leading",
                                      steps_offset=0, set_alpha_to_one=True, clip_sample=False)  # fmt: skip
                sched.set_timesteps(STEPS)

                def diffusers_loop():
                    x = x_T.clone()
                    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.float16):
                        for t in sched.timesteps:
                            x = sched.step(model(x, t.to(DEVICE).expand(B)).float(), t, x, eta=0.0).prev_sample
                    return x

                fns["diffusers_loop"] = diffusers_loop
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = interleaved_seconds(fns, rounds=5, warmup=2, device=DEVICE)
            med = {k: statistics.median(v) for k, v in times.items()}
            out = {f"steps_per_s_{k}": STEPS / v for k, v in med.items()}
            out["overhead_ms_per_step_graph"] = 1e3 * (med["ours_graph"] - med["model_only"]) / STEPS
            out["overhead_ms_per_step_eager"] = 1e3 * (med["ours_eager"] - med["model_only"]) / STEPS
            out["ours_precision"] = "precision='auto' (fp16 autocast on CUDA); baselines under the same autocast"
            return out

        report.check(f"steps/s B={B} (fp16 autocast, S={STEPS})", run, min_s=8)

    for B in SPEED_BATCHES:
        def run_compiled(B=B):
            x_T = torch.randn(B, 3, 32, 32, device=DEVICE)
            t0 = time.perf_counter()
            sampler, how = _compiled_sampler(model, cuda_graph=True)
            with _no_capture_fallback():
                sampler.sample(x_T)
                _sync()
                first_s = time.perf_counter() - t0
                graph = _sampler(model, cuda_graph=True)
                times = interleaved_seconds({"graph": lambda: graph.sample(x_T), "graph_compile": lambda: sampler.sample(x_T)},
                                            rounds=5, warmup=2, device=DEVICE)  # fmt: skip
            med = {k: statistics.median(v) for k, v in times.items()}
            return {"how": how, "first_call_s": first_s, "steps_per_s_graph": STEPS / med["graph"],
                    "steps_per_s_graph_compile": STEPS / med["graph_compile"],
                    "speedup_compile": statistics.median(a / b for a, b in zip(times["graph"], times["graph_compile"]))}  # fmt: skip

        report.check(f"steps/s B={B}: graph + compile vs graph", run_compiled, min_s=30)


def bandwidth_checks(report):
    import torch

    from _utils import make_step_args
    from ddim_fast import ops

    shape = (64, 3, 256, 256)
    names = ("x", "model_out", "table", "step", "seed", "prediction", "clip", "history_kind", "history", "saved", "noise",
             "out", "x0_out", "flags")  # fmt: skip

    def run():
        x = torch.randn(shape, device=DEVICE)
        e = torch.randn(shape, device=DEVICE)
        out = torch.empty_like(x)
        nbytes = 3 * x.numel() * 4  # read x and the model output, write x_next
        res = {"torch_add_GBps": nbytes / _cuda_seconds(lambda: torch.add(x, e, alpha=-0.5, out=out), repeat=50) / 1e9}
        for kind in ("ddim", "ddim_eta1"):
            args = make_step_args(kind, shape=shape, x0_out=False, flags=True, device=DEVICE)
            call = [args[k] for k in names] + ["triton"]
            sec = _cuda_seconds(lambda: ops.run_step(*call), repeat=50)
            res[f"triton_{kind}_GBps"] = nbytes / sec / 1e9
            res[f"triton_{kind}_vs_torch_add"] = res["torch_add_GBps"] / res[f"triton_{kind}_GBps"]
        return res

    report.check("Triton step vs torch.add on 64x3x256x256 fp32 (time ratio > 1: slower)", run, min_s=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU acceptance run of ddim_fast (see the module docstring).")
    parser.add_argument("--out", required=True, help="folder for report.md and report.json")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default %(default)s)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, this run checks the compiled kernels")
        return 2
    source_checkout_imports()
    meta = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "python": platform.python_version(), "steps": STEPS, "unet": UNET_CONFIG,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (/tmp/torchinductor_$USER)")}  # fmt: skip
    report = Report(args.out, budget_s=args.budget, meta=meta)
    torch.backends.cudnn.benchmark = False
    for name, fn in (("environment", environment_checks), ("kernel", kernel_checks), ("sampler", sampler_checks),
                     ("precision", precision_checks), ("speed", speed_checks), ("bandwidth", bandwidth_checks)):  # fmt: skip
        with report.section(name, SECTIONS[name]):
            try:
                fn(report)
            except Exception as exc:  # noqa: BLE001 - set-up of a section failed: record it, go on
                report.results.append({"section": name, "name": "section set-up", "status": "fail", "seconds": 0.0,
                                       "error": f"{type(exc).__name__}: {exc}", "metrics": {}})  # fmt: skip
    report.write()
    counts = {s: sum(r["status"] == s for r in report.results) for s in ("pass", "fail", "skip")}
    print(f"gpu_check: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; "
          f"{os.path.join(args.out, 'report.md')}")  # fmt: skip
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
