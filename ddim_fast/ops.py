"""The fused DDIM step as one ``torch.library`` op, and the choice of backend.

``torch.ops.ddim_fast.step`` is an opaque custom op (``torch.library.custom_op`` with a fake
implementation): ``torch.compile(fullgraph=True)`` treats it as one node and CUDA-graph capture
records the kernel it launches. (A ``triton_op`` would be traced into its Triton kernel by
``torch.compile``, which fails on CPU tensors.) The op writes into caller-owned buffers
(``out``, ``x0_out``) so that a trajectory loop allocates nothing per step.

Backends, all implementing the contract of ``ddim_fast.reference.fused_step``:

- ``"triton"``: ``ddim_fast.kernels.ddim_step`` on CUDA tensors (or CPU tensors when
  ``TRITON_INTERPRET=1``, for tests);
- ``"cpp"``: the C++/OpenMP kernel of ``csrc/`` on CPU tensors, compiled ahead of time or on
  first use (``ddim_fast._ext``);
- ``"torch"``: the plain-PyTorch reference, always available.

``"auto"`` picks Triton on CUDA and C++ on CPU; a compiled backend that cannot be loaded
becomes one warning and the reference path, never an ImportError at ``import ddim_fast``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from ddim_fast import reference

__all__ = ["step", "fused_step", "gaussian", "resolve_backend", "BACKENDS", "triton_available", "cpp_available"]

BACKENDS = ("auto", "torch", "triton", "cpp")


@functools.lru_cache(maxsize=None)
def _triton_module():
    """The Triton launcher module, or None (imported lazily: importing triton costs ~1 s)."""
    try:
        from ddim_fast.kernels import ddim_step as mod  # noqa: WPS433
    except Exception as e:  # ImportError, or triton failing on an unsupported platform
        _warn_once(f"the Triton backend is unavailable ({type(e).__name__}: {e})")
        return None
    return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernel can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        return False
    return _triton_module() is not None


@functools.lru_cache(maxsize=None)
def _cpp_op():
    """The compiled C++ op (``torch.ops.ddim_fast_C.step``), or None with one warning."""
    try:
        from ddim_fast import _ext
    except ImportError:
        return None
    try:
        return _ext.load()
    except Exception as e:
        _warn_once(f"the C++ backend is unavailable ({type(e).__name__}: {e}); using the PyTorch reference")
        return None


def cpp_available() -> bool:
    return _cpp_op() is not None


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"ddim_fast: {message}", RuntimeWarning, stacklevel=3)


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
        if device.type == "cpu" and cpp_available():
            return "cpp"
        return "torch"
    if backend == "triton":
        if triton_available(device):
            return "triton"
        why = "set TRITON_INTERPRET=1 to run it on CPU tensors" if device.type != "cuda" else "triton is not importable"
        _warn_once(f'backend="triton" is unavailable on {device.type} tensors ({why}); using the PyTorch reference')
        return "torch"
    # backend == "cpp"
    if device.type == "cpu" and cpp_available():
        return "cpp"
    _warn_once(f'backend="cpp" is unavailable on {device.type} tensors; using the PyTorch reference')
    return "torch"


def _run_torch(*args) -> None:
    reference.fused_step(*args)


def _run_triton(*args) -> None:
    _triton_module().fused_step(*args)


def _run_cpp(*args) -> None:
    _cpp_op()(*args)


_IMPLS = {"torch": _run_torch, "triton": _run_triton, "cpp": _run_cpp}


def gaussian(seed: int, shape, *, stream: int, sample_offset: int, device, backend: str) -> torch.Tensor:
    """Normals under the noise contract (``reference.gaussian``), drawn by ``backend`` when it can.

    The Triton and C++ kernels draw them in one pass (C++: ~0.1 ms for 64x3x32x32 where the
    int64 reference takes ~34 ms); the numbers agree to float32 transcendental rounding.
    """
    if backend == "triton":
        return _triton_module().triton_gaussian(seed, shape, step=0, stream=stream, sample_offset=sample_offset, device=device)
    if backend == "cpp":
        seed_t = torch.tensor([int(seed), int(sample_offset)], dtype=torch.int64)
        return torch.ops.ddim_fast_C.gaussian(seed_t, list(shape), 0, stream).to(device)
    return reference.gaussian(seed, shape, step=0, stream=stream, sample_offset=sample_offset, device=device)


def fused_step(*args) -> None:
    """``step`` for the sampler's loop: the op itself under torch.compile, else its backend directly.

    Going through the custom op's Python dispatch costs ~55-75 us per call on this CPU, three
    times a whole C++ step of a 64x3x32x32 batch (~20 us); eager loops and CUDA-graph capture
    need no dispatcher, so they call the implementation the op would call.
    """
    if torch.compiler.is_compiling():
        step(*args)
    else:
        _IMPLS[args[-1]](*args[:-1])


@torch.library.custom_op("ddim_fast::step", mutates_args=("out", "x0_out"))
def step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    step: int,
    seed: torch.Tensor,
    prediction: int,
    clip: float,
    stochastic: bool,
    noise: Optional[torch.Tensor],
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor],
    backend: str,
) -> None:
    """One fused step x_t -> x_prev (Eq. 12) with the concrete ``backend`` (see resolve_backend).

    x: (B, ...) float tensor; model_out: same shape, fp32/fp16/bf16; coef: (S, 5) float32 table
    on x's device; step: the table row; seed: int64 (2,) tensor (seed, sample_offset) on x's
    device; prediction: 0/1/2 = epsilon/v/x0; clip: > 0 clamps x0; stochastic: add sigma * z;
    noise: optional explicit z; out: float32 result; x0_out: optional float32 x0-prediction.
    """
    _IMPLS[backend](x, model_out, coef, step, seed, prediction, clip, stochastic, noise, out, x0_out)


@step.register_fake
def _step_fake(x, model_out, coef, step, seed, prediction, clip, stochastic, noise, out, x0_out, backend) -> None:
    return None


# --------------------------------------------------------------------------------------------
# The fused multistep step (DPM-Solver++(2M)/(3M); ddim_fast.solvers, issue 8)
# --------------------------------------------------------------------------------------------

__all__ += ["multistep_step", "fused_multistep_step"]


@functools.lru_cache(maxsize=None)
def _triton_multistep_module():
    """The Triton multistep launcher, or None with one warning (imported lazily, as _triton_module)."""
    try:
        from ddim_fast.kernels import multistep as mod  # noqa: WPS433
    except Exception as e:
        _warn_once(f"the Triton multistep kernel is unavailable ({type(e).__name__}: {e}); using the PyTorch reference")
        return None
    return mod


def _run_multistep_torch(*args) -> None:
    from ddim_fast import solvers

    solvers.multistep_step(*args)


def _run_multistep_triton(*args) -> None:
    mod = _triton_multistep_module()
    if mod is None:
        _run_multistep_torch(*args)
    else:
        mod.multistep_step(*args)


def _cpp_multistep_op():
    """``torch.ops.ddim_fast_C.multistep_step``, or None (no extension, or a build older than the
    op: one warning, and the PyTorch reference)."""
    if _cpp_op() is None:
        return None
    try:
        return torch.ops.ddim_fast_C.multistep_step  # an attribute lookup once resolved
    except (AttributeError, RuntimeError):
        _warn_once(
            "the C++ extension has no multistep_step op (built before it; rebuild with "
            "`pip install --no-build-isolation -e .`); using the PyTorch reference multistep step"
        )
        return None


def _run_multistep_cpp(*args) -> None:
    op = _cpp_multistep_op()
    if op is None:
        _run_multistep_torch(*args)
    else:
        op(*args)


_MULTISTEP_IMPLS = {"torch": _run_multistep_torch, "triton": _run_multistep_triton, "cpp": _run_multistep_cpp}


@torch.library.custom_op("ddim_fast::multistep_step", mutates_args=("history", "out", "x0_out"))
def multistep_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    step: int,
    prediction: int,
    clip: float,
    history: torch.Tensor,
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor],
    backend: str,
) -> None:
    """One fused multistep step x_t -> x_next (ddim_fast.solvers) with the concrete ``backend``.

    x: (B, ...) float tensor; model_out: same shape, fp32/fp16/bf16; coef: (S, 6) float32 table
    (solvers.MULTISTEP_COLUMNS) on x's device; step: the table row; prediction: 0/1/2 =
    epsilon/v/x0; clip: > 0 clamps x0; history: (H, *x.shape) float32 ring of x0-predictions
    (slot step % H is written, the H - 1 slots before it are read where their coefficient is
    non-zero); out: float32 x_next; x0_out: optional float32 x0-prediction.
    """
    _MULTISTEP_IMPLS[backend](x, model_out, coef, step, prediction, clip, history, out, x0_out)


@multistep_step.register_fake
def _multistep_step_fake(x, model_out, coef, step, prediction, clip, history, out, x0_out, backend) -> None:
    return None


def fused_multistep_step(*args) -> None:
    """``multistep_step`` for the sampler's loop: the op under torch.compile, else its backend
    directly (no custom-op dispatch per step, as ``fused_step``)."""
    if torch.compiler.is_compiling():
        multistep_step(*args)
    else:
        _MULTISTEP_IMPLS[args[-1]](*args[:-1])
