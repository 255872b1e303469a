"""The user's model under ``torch.compile`` (inductor), compiled once and reused across calls.

``maybe_compile(model, mode, device, expected_calls=...)`` returns the model itself or a
``CompiledModel`` wrapper. The wrapper calls ``torch.compile(model)`` with inductor's own CUDA
graphs switched off (no ``mode="reduce-overhead"``, ``triton.cudagraphs=False``): on CUDA the
sampler captures the whole trajectory, compiled model included, in one graph of its own
(``ddim_fast.graphs``), and a second graph layer inside it would capture nothing useful and
own a memory pool of its own. The first call compiles (inductor compiles lazily, so that is
where most failures show); any failure there or at wrap time is one warning and the eager
model from then on.

Inductor's cache on disk: every compiled graph is stored under ``TORCHINDUCTOR_CACHE_DIR``
(default ``/tmp/torchinductor_$USER``; the FX graph cache and the AOTAutograd cache are on by
default since torch 2.5), keyed on the graph, the input shapes and dtypes, the torch version
and the inductor config. A second process with the same model and shapes then skips inductor's
code generation and C++/Triton builds, and only re-traces with dynamo. Point the variable at a
persistent directory (the default under /tmp may not survive a reboot or be shared between
containers) to start a long sharded run fast. docs/results/compile.md has cold and warm times.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Union

import torch

__all__ = ["MODES", "CompiledModel", "maybe_compile", "compile_pays_off", "break_even_calls", "measured_kind",
           "cpu_flags"]

MODES = (False, True, "auto")

# The rule of "auto": compile when the caller expects at least cold_s / saved_ms * 1e3 model
# calls, from figures measured per kind of device: (first compiled call with a cold inductor
# cache in s, ms saved per model call at the default precision), bench UNet = diffusers
# UNet2DModel 5.4M, 8x3x32x32, S = 20 (bench/test_bench_sampler.py, docs/results/compile.md).
# - "cpu" (no AMX; measured on a 2-core EPYC with avx512_bf16, shared with 7 other jobs, 1
#   thread): the compiled defaults took 121 s to their first trajectory (cold, load 3-7) and then
#   saved 8.7-8.9 ms of 99-104 ms a call in the two quieter runs: 13,750 calls to break even,
#   e.g. a sharded run of 50k samples at B = 64, S = 50 (39k calls) but no single sampler call of
#   S <= 1000 steps.
# - "cpu-amx" (bf16 matrix units, where inductor's code runs 1.6x eager bf16; a 2-core Sapphire
#   Rapids, 2 threads, idle): first compiled call 33-50 s cold, then 10.5-14.7 ms saved of
#   39-49 ms a call: from the worst of each, 4,762 calls (10k samples at B = 64, S = 50 pay).
# Nothing has been measured on a GPU yet (bench/gpu_check.py measures both figures): "auto"
# leaves CUDA models eager.
MEASURED = {"cpu": (121.0, 8.8), "cpu-amx": (50.0, 10.5)}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (read once; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def _cpu_has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


def measured_kind(device) -> str:
    """The row of ``MEASURED`` that speaks for ``device``: its type, and CPUs with AMX apart."""
    kind = torch.device(device).type
    return "cpu-amx" if kind == "cpu" and _cpu_has_amx() else kind


def break_even_calls(device) -> Optional[int]:
    """Model calls after which compiling has paid for itself on ``device``; None: never measured to."""
    cold_s, saved_ms = MEASURED.get(measured_kind(device), (None, None))
    if cold_s is None or saved_ms <= 0:
        return None
    return math.ceil(cold_s / saved_ms * 1e3)


def compile_pays_off(device, expected_calls: Optional[int]) -> bool:
    """The rule of ``mode="auto"``: at least ``break_even_calls(device)`` expected model calls
    (one sampler call of S steps on n batches makes S * n); False when that number is unknown."""
    if expected_calls is not None and (isinstance(expected_calls, bool) or not isinstance(expected_calls, int) or expected_calls < 0):
        raise ValueError(f"expected_calls: expected None or an int >= 0, got {expected_calls!r}")
    needed = break_even_calls(device)
    return expected_calls is not None and needed is not None and expected_calls >= needed


# SHAPES: dynamic=False, one static graph per input shape. On the bench UNet at 8x3x32x32 (2
# threads, load 2-7, bench/measure_compile.py per-call) dynamic=True took 372 s to compile
# against 79 s static, and its code ran 1.24x eager fp32 where the static graph ran 1.72x; a
# second batch size then cost a static recompile of 160 s (4 s for the dynamic graph). A
# trajectory calls the model at one shape (a sharded run adds at most a smaller last batch), so
# the static graph's 1.4x faster calls win. torch's default (dynamic=None) would switch to the
# slow dynamic graph at the second shape; dynamic=False keeps every shape static.


class CompiledModel:
    """``torch.compile(model)`` made once; the eager model after the first failure (one warning).

    Attribute reads other than the call go to the wrapped model, so code that inspects
    ``model.dtype``, ``model.config`` or ``model.parameters()`` sees the user's model.
    """

    def __init__(self, model: Callable, device, *, dynamic: Optional[bool] = False, backend: str = "inductor"):
        self.model = model
        self.device = torch.device(device)
        self.compiled: Optional[Callable] = None
        self.failed: Optional[str] = None
        self.calls = 0
        try:
            self.compiled = torch.compile(
                model,
                backend=backend,
                # Our own CUDA graph captures the whole trajectory: inductor must not add its own.
                options={"triton.cudagraphs": False} if backend == "inductor" else None,
                dynamic=dynamic,
            )
        except Exception as exc:  # an unsupported platform, a missing compiler, an old torch
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.compiled = None  # so this wrapper warns once: every later call is eager
        warnings.warn(f"ddim_fast: torch.compile of the model failed ({self.failed}); running it eagerly from now on",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.compiled is None:
            return self.model(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:
            # Inductor compiles lazily, so a failure surfaces at a call. If the eager model
            # fails too, the inputs are at fault: raise the eager error and keep compiling.
            out = self.model(*args, **kwargs)
            self._fail(exc)
            return out

    def __getattr__(self, name):
        if name in ("model", "device", "compiled", "failed", "calls"):
            raise AttributeError(name)  # not yet set (during __init__): never recurse
        return getattr(self.model, name)

    def __repr__(self) -> str:
        state = "eager after a failure" if self.failed else "compiled"
        return f"CompiledModel({type(self.model).__name__}, {state}, device={self.device})"


def maybe_compile(
    model: Callable,
    mode: Union[bool, str],
    device,
    *,
    expected_calls: Optional[int] = None,
    dynamic: Optional[bool] = False,
) -> Callable:
    """``model`` itself, or a ``CompiledModel`` of it, by ``mode`` (False | True | "auto").

    ``device``: where the model runs (the "auto" rule and the warning name it);
    ``expected_calls``: how many model calls the caller expects (S steps times the batches it
    knows of; None when unknown: "auto" then does not compile); ``dynamic``: inductor's shape
    policy, by default one static compile per batch shape (see SHAPES above).
    """
    if isinstance(mode, bool):
        want = mode
    elif mode == "auto":
        want = compile_pays_off(device, expected_calls)
    else:
        raise ValueError(f"compile: expected False, True or 'auto', got {mode!r}")
    if not callable(model):
        raise ValueError(f"model: expected a callable model(x, t, **model_kwargs), got {type(model).__name__}")
    if not want:
        return model
    if isinstance(model, CompiledModel):
        return model
    return CompiledModel(model, device, dynamic=dynamic)
