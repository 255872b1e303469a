"""The one fused step as one ``torch.library`` op, its one validation, and the choice of backend.

``torch.ops.ddim_fast.step`` runs one row of any solver's coefficient table (the contract of
``ddim_fast.layout``). It is an opaque custom op with one fake: ``torch.compile(fullgraph=True)``
treats it as one node and CUDA-graph capture records the kernel it launches (a ``triton_op``
would be traced into its Triton kernel, which fails on CPU tensors). It writes into
caller-owned buffers, so a trajectory allocates nothing per step.

Backends, each registered for the device it runs on and tested against the float64 reference:

- ``"triton"``: ``ddim_fast.kernels.ddim_step`` for CUDA tensors (and CPU tensors when
  ``TRITON_INTERPRET=1``, for tests);
- ``"cpp"``: the C++/OpenMP kernel of ``csrc/`` for CPU tensors, compiled ahead of time or on
  first use (``ddim_fast._ext``);
- ``"torch"``: ``ddim_fast.reference.fused_step``, always available.

``resolve_backend`` follows the device; a compiled backend that cannot be loaded is one warning
and the reference. Arguments are checked in one place, ``check_step_args``: by the op on every
call, and by the trajectory once per plan before it calls the function ``step_impl`` resolved
(the backend without the custom-op dispatch, which costs ~55-75 us a call on a CPU, three times
a whole C++ step).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from ddim_fast import layout, reference

__all__ = [
    "BACKENDS",
    "step",
    "run_step",
    "step_impl",
    "check_step_args",
    "gaussian",
    "resolve_backend",
    "triton_available",
    "cpp_available",
]

BACKENDS = ("auto", "torch", "triton", "cpp")
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_SAMPLE = 2**31 - 8  # element offsets inside one sample are int32 in the kernels

_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"ddim_fast: {message}", RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_module():
    """The Triton launcher module, or None with one warning (imported lazily: triton costs ~1 s)."""
    try:
        from ddim_fast.kernels import ddim_step as mod  # noqa: WPS433
    except Exception as e:  # ImportError, or triton failing on an unsupported platform
        _warn_once(f"the Triton backend is unavailable ({type(e).__name__}: {e})")
        return None
    return mod


def triton_available(device) -> bool:
    """True when the Triton kernel can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        return False
    return _triton_module() is not None


@functools.lru_cache(maxsize=None)
def _cpp_load():
    """(``torch.ops.ddim_fast_C`` built for this contract version, None) or (None, why not)."""
    try:
        from ddim_fast import _ext

        _ext.load()
        ns = torch.ops.ddim_fast_C
        version = int(ns.contract_version())
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    if version != layout.CONTRACT_VERSION:
        return None, (
            f"the extension was built for contract version {version}, not {layout.CONTRACT_VERSION}: rebuild it "
            "with `pip install --no-build-isolation -e .`"
        )
    return ns, None


def _cpp_ops():
    """``torch.ops.ddim_fast_C`` built for this contract version, or None (``resolve_backend``
    says why, once)."""
    return _cpp_load()[0]



def cpp_available() -> bool:
    return _cpp_ops() is not None


def resolve_backend(backend: str, device) -> str:
    """The concrete backend ("torch", "triton" or "cpp") that runs on ``device`` for a request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type == "cuda":
            if triton_available(device):
                return "triton"
            _warn_once("no Triton kernel for CUDA tensors; using the PyTorch reference step")
            return "torch"
        if device.type != "cpu":
            return "torch"
        if cpp_available():
            return "cpp"
        _warn_once(f"the C++ backend is unavailable ({_cpp_load()[1]}); using the PyTorch reference")
        return "torch"
    if backend == "triton":
        if triton_available(device):
            return "triton"
        why = "set TRITON_INTERPRET=1 to run it on CPU tensors" if device.type != "cuda" else "triton is not importable"
        _warn_once(f'backend="triton" is unavailable on {device.type} tensors ({why}); using the PyTorch reference')
        return "torch"
    if device.type == "cpu" and cpp_available():
        return "cpp"
    why = _cpp_load()[1] if device.type == "cpu" else "the C++ kernel runs on CPU tensors"
    _warn_once(f'backend="cpp" is unavailable on {device.type} tensors ({why}); using the PyTorch reference')
    return "torch"


# --------------------------------------------------------------------------------------------
# the one validation
# --------------------------------------------------------------------------------------------


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if torch.is_tensor(t) else type(t).__name__


def check_step_args(x, model_out, table, step, seed, prediction, clip, history_kind, history, saved, noise, out, x0_out, flags) -> None:
    """Every argument of the op, checked once for all backends (a clear ValueError naming it)."""
    if not torch.is_tensor(x) or x.ndim < 1 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous float32 tensor with a leading batch dimension, got {_describe(x)}")
    device, shape = x.device, tuple(x.shape)
    if x.numel() and x.numel() // shape[0] > _MAX_SAMPLE:
        raise ValueError(f"x: at most {_MAX_SAMPLE} elements per sample, got {x.numel() // shape[0]}")

    def like_x(name, t, dtypes=(torch.float32,), lead=()):
        want = (*lead, *shape)
        if not torch.is_tensor(t) or tuple(t.shape) != want or t.device != device or t.dtype not in dtypes or not t.is_contiguous():
            names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name}: expected a contiguous {names} tensor of shape {want} on {device}, got {_describe(t)}")

    like_x("model_out", model_out, MODEL_DTYPES)
    like_x("out", out)
    for name, t in (("x0_out", x0_out), ("saved", saved), ("noise", noise)):
        if t is not None:
            like_x(name, t)
    if history is not None:
        if not torch.is_tensor(history) or history.ndim != x.ndim + 1 or not 1 <= history.shape[0]:
            raise ValueError(f"history: expected an (R, *{shape}) float32 ring, got {_describe(history)}")
        like_x("history", history, lead=(history.shape[0],))
    if not torch.is_tensor(table) or table.ndim != 2 or table.shape[1] != layout.NUM_COLUMNS or table.dtype != torch.float32:
        raise ValueError(f"table: expected the (S, {layout.NUM_COLUMNS}) float32 coefficient table, got {_describe(table)}")
    if table.device != device or not table.is_contiguous():
        raise ValueError(f"table: expected a contiguous table on {device} (x's device), got {_describe(table)}")
    S = table.shape[0]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < S:
        raise ValueError(f"step: expected an integer row of the table in [0, {S}), got {step!r}")
    if not torch.is_tensor(seed) or seed.dtype != torch.int64 or seed.shape != (2,) or seed.device != device:
        raise ValueError(f"seed: expected an int64 tensor (seed, sample_offset) of shape (2,) on {device}, got {_describe(seed)}")
    if prediction not in layout.PREDICTIONS.values() or isinstance(prediction, bool):
        raise ValueError(f"prediction: expected 0 (epsilon), 1 (v) or 2 (x0), got {prediction!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0 or clip == float("inf"):
        raise ValueError(f"clip: expected a finite float >= 0 (0 = no clipping), got {clip!r}")
    if history_kind not in layout.HISTORY_KINDS.values() or isinstance(history_kind, bool):
        raise ValueError(f"history_kind: expected 0 (x0) or 1 (eps), got {history_kind!r}")
    if flags is not None and (
        not torch.is_tensor(flags) or flags.dtype != torch.int32 or tuple(flags.shape) != (S, 2) or flags.device != device
        or not flags.is_contiguous()
    ):
        raise ValueError(f"flags: expected a contiguous int32 tensor of shape ({S}, 2) on {device}, got {_describe(flags)}")


# --------------------------------------------------------------------------------------------
# backends and the op
# --------------------------------------------------------------------------------------------


_IMPLS = {
    "torch": lambda: reference.fused_step,
    "triton": lambda: _triton_module().fused_step,
    "cpp": lambda: _cpp_ops().step,
}


def step_impl(backend: str):
    """The function that runs the op's 14 arguments on the concrete ``backend``, for a loop whose
    arguments ``check_step_args`` accepted: the backend's own function (no custom-op dispatch,
    no Python layer between: ~3 us a call less than ``run_step`` on a CPU), or, under
    torch.compile, the custom op itself. A loop resolves it once and calls it every step."""
    if torch.compiler.is_compiling():
        return functools.partial(step, backend=backend)
    return _IMPLS[backend]()


def run_step(*args) -> None:
    """The op for arguments ``check_step_args`` already accepted (the last one is the concrete
    backend): ``step_impl(backend)(*args)``."""
    step_impl(args[-1])(*args[:-1])


@torch.library.custom_op("ddim_fast::step", mutates_args=("history", "saved", "out", "x0_out", "flags"))
def step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    table: torch.Tensor,
    step: int,
    seed: torch.Tensor,
    prediction: int,
    clip: float,
    history_kind: int,
    history: Optional[torch.Tensor],
    saved: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor],
    flags: Optional[torch.Tensor],
    backend: str,
) -> None:
    """One row of a solver's table (``ddim_fast.layout``) with the concrete ``backend``.

    x: (B, ...) float32 state; model_out: the model output at x, fp32/fp16/bf16/fp64; table:
    (S, NUM_COLUMNS) float32 on x's device; step: its row (also the noise's step counter);
    seed: int64 (seed, sample_offset) on the device; prediction: 0/1/2 = epsilon/v/x0; clip > 0
    clamps x0; history_kind: 0/1 = the ring keeps x0/eps; history: (R, ...) float32 ring or None;
    saved: float32 predictor-corrector state (updated) or None; noise: explicit float32 z or
    None; out: float32 x_next (may alias x); x0_out: float32 x0-prediction or None; flags:
    (S, 2) int32 finite flags or None. Backends: ``resolve_backend``.
    """
    check_step_args(x, model_out, table, step, seed, prediction, clip, history_kind, history, saved, noise, out, x0_out, flags)
    if backend not in _IMPLS:
        raise ValueError(f"backend: expected a concrete backend {tuple(_IMPLS)}, got {backend!r}")
    _IMPLS[backend]()(x, model_out, table, step, seed, prediction, clip, history_kind, history, saved, noise, out, x0_out, flags)


@step.register_fake
def _step_fake(x, model_out, table, step, seed, prediction, clip, history_kind, history, saved, noise, out, x0_out, flags, backend) -> None:
    return None


def gaussian(seed: int, shape, *, stream: int, sample_offset: int, device, backend: str) -> torch.Tensor:
    """Normals under the noise contract (``reference.gaussian``), drawn by ``backend`` when it can.

    The kernels draw them in one pass (C++: ~0.1 ms for 64x3x32x32 where the int64 reference
    takes ~34 ms); the numbers agree to float32 transcendental rounding.
    """
    reference._split_seed(seed)  # the noise contract's seed check, for every backend
    if len(shape) < 1 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape: expected a sequence of non-negative integers (B, ...), got {tuple(shape)!r}")
    reference.check_sample_range(int(sample_offset), int(shape[0]), "batch_offset")
    if backend == "triton":
        return _triton_module().gaussian(seed, shape, stream=stream, sample_offset=sample_offset, device=device)
    if backend == "cpp":
        seed_t = torch.tensor([int(seed), int(sample_offset)], dtype=torch.int64)
        return _cpp_ops().gaussian(seed_t, [int(s) for s in shape], 0, stream).to(device)
    return reference.gaussian(seed, shape, step=0, stream=stream, sample_offset=sample_offset, device=device)
