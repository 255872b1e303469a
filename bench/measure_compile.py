"""Measurements behind ``ddim_fast/compile.py``'s choices (results: docs/results/compile.md).

    python bench/measure_compile.py first-call --cache DIR [--precision fp32|autocast|bf16w] [--dynamic]
    python bench/measure_compile.py per-call [--rounds 7] [--batch 8]

``first-call`` times one process's first compiled call (compile + run) of the bench UNet
(diffusers UNet2DModel, ~5.4M parameters, 8x3x32x32): run it twice with the same ``--cache``
for a cold and a warm inductor cache. ``per-call`` times eager and compiled calls, fp32, bf16
autocast and bf16 weights, interleaved in rounds, plus a dynamic-batch compile and the cost of
a second batch size under each shape policy. Each prints one JSON object.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


from _timing import small_unet  # noqa: E402  (the benches' UNet)


def _caller(model, precision):
    """model(x, t) -> fp32 tensor under one precision policy."""
    import contextlib

    import torch

    if precision == "bf16w":
        model = model.to(torch.bfloat16)  # callers pass a copy

        def call(x, t):
            return model(x.to(torch.bfloat16), t).sample.float()

        return call
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "autocast" else contextlib.nullcontext

    def call(x, t):
        with ctx():
            return model(x, t).sample.float()

    return call


def first_call(args):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(args.cache)
    t_start = time.perf_counter()
    import torch

    from ddim_fast.compile import maybe_compile

    t_import = time.perf_counter() - t_start
    model = small_unet()
    if args.precision == "bf16w":
        model = model.to(torch.bfloat16)
    compiled = maybe_compile(model, True, "cpu", dynamic=args.dynamic)
    x = torch.randn(args.batch, 3, 32, 32)
    t = torch.full((args.batch,), 500)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "autocast" else torch.inference_mode()
    with torch.inference_mode(), ctx:
        xin = x.to(torch.bfloat16) if args.precision == "bf16w" else x
        t0 = time.perf_counter()
        compiled(xin, t)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(xin, t)
        second = time.perf_counter() - t0
    print(json.dumps({"mode": "first-call", "cache": args.cache, "precision": args.precision, "dynamic": args.dynamic,
                      "batch": args.batch, "import_s": t_import, "first_call_s": first, "second_call_s": second,
                      "compiled": compiled is not model, "threads": torch.get_num_threads(), "load": os.getloadavg()}))


def per_call(args):
    import copy

    import torch

    from _timing import interleaved_seconds
    from ddim_fast.compile import maybe_compile

    torch.set_grad_enabled(False)
    B = args.batch
    base = small_unet()
    x = torch.randn(B, 3, 32, 32)
    t = torch.full((B,), 500)
    out = {"mode": "per-call", "batch": B, "threads": torch.get_num_threads(), "skip_dynamic": args.skip_dynamic, "load_start": os.getloadavg()}
    fns, compile_s = {}, {}
    for precision in ("fp32", "autocast", "bf16w"):
        fns[f"eager_{precision}"] = _caller(copy.deepcopy(base), precision)
    for precision in ("fp32", "autocast", "bf16w"):
        model = copy.deepcopy(base)
        if precision == "bf16w":
            model = model.to(torch.bfloat16)
        compiled = maybe_compile(model, True, "cpu")
        call = _caller(compiled, "fp32" if precision == "bf16w" else precision)
        if precision == "bf16w":
            call = (lambda c: lambda x, t: c(x.to(torch.bfloat16), t).sample.float())(compiled)
        with torch.inference_mode():
            t0 = time.perf_counter()
            call(x, t)
            compile_s[precision] = time.perf_counter() - t0
        fns[f"compiled_{precision}"] = call
    if not args.skip_dynamic:
        # dynamic batch: one compile for every batch size, at what per-call price?
        dyn = maybe_compile(copy.deepcopy(base), True, "cpu", dynamic=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            dyn(x, t)
            compile_s["fp32_dynamic"] = time.perf_counter() - t0
        fns["compiled_fp32_dynamic"] = lambda x, t: dyn(x, t).sample
        # a second batch size: a static compile recompiles, a dynamic one does not
        x2, t2 = torch.randn(B // 2, 3, 32, 32), torch.full((B // 2,), 500)
        with torch.inference_mode():
            static = fns["compiled_fp32"]
            t0 = time.perf_counter()
            static(x2, t2)
            compile_s["fp32_static_second_batch"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            dyn(x2, t2)
            compile_s["fp32_dynamic_second_batch"] = time.perf_counter() - t0
    out["first_call_s"] = compile_s
    with torch.inference_mode():
        ref = fns["eager_fp32"](x, t)
        rms = lambda a: (a.float() - ref).pow(2).mean().sqrt().item()  # noqa: E731
        out["rms_vs_eager_fp32"] = {k: rms(f(x, t)) for k, f in fns.items()}
        times = interleaved_seconds({k: (lambda f: lambda: f(x, t))(f) for k, f in fns.items()}, rounds=args.rounds, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    out["median_ms"] = {k: 1e3 * v for k, v in med.items()}
    out["speedup_vs_eager_fp32"] = {
        k: statistics.median(a / b for a, b in zip(times["eager_fp32"], v)) for k, v in times.items()
    }
    out["load_end"] = os.getloadavg()
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("first-call")
    f.add_argument("--cache", required=True)
    f.add_argument("--precision", default="fp32", choices=("fp32", "autocast", "bf16w"))
    f.add_argument("--dynamic", action="store_true")
    f.add_argument("--batch", type=int, default=8)
    c = sub.add_parser("per-call")
    c.add_argument("--rounds", type=int, default=7)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--skip-dynamic", action="store_true", help="no dynamic-batch compile (it took 372 s here)")
    args = p.parse_args()
    first_call(args) if args.cmd == "first-call" else per_call(args)


if __name__ == "__main__":
    main()
