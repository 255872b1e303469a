"""The fused DDIM step as one Triton kernel, and the Philox Gaussian it draws in-kernel.

What is fused (one pass over memory per step; DESIGN.md "The fused step", DDIM paper Eq. 12).
Each program reads, for BLOCK groups of 4 consecutive elements of one sample:

    x_t        (B, *shape)  fp32 / fp16 / bf16 / fp64, read in its own dtype
    model_out  (B, *shape)  fp32 / fp16 / bf16 / fp64, read in its own dtype
    coef[step] (5 floats)   sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), c_dir, sigma: loaded
                            through a pointer and the step index, never a Python float or a
                            constexpr, so a captured CUDA graph sees the table's current values
    seed       (2 int64)    (seed, sample_offset), read on device: a replayed graph draws
                            fresh noise when the seed tensor is overwritten
    noise      (B, *shape)  only when an explicit z is given

and writes ``out`` = x_prev (float32) and, when asked, ``x0_out`` = the clamped x0 prediction
(float32). In between: epsilon / v / x0 predictions are converted to (x0, eps), x0 is clamped
to [-clip, clip] when clip > 0, and x_prev = sqrt(a_prev) x0 + c_dir eps + sigma z. The
inverse (encoding) step is the same kernel with another table (schedule.inverse_step_table).

Noise (the contract of ``ddim_fast.reference.gaussian``): z at (seed, global sample
n = sample_offset + b, step k, element j) is output j % 4 of Philox4x32-10 with counter
(j // 4, n, k, stream) and key (seed_lo, seed_hi) (``tl.philox``), turned into normals by
``tl.uint_to_uniform_float`` and the Box-Muller formula of ``tl.pair_uniform_to_normal``
(with a correctly rounded sqrt, see ``_box_muller``). A program's tile is
(BLOCK, 4): row g holds the four elements 4g..4g+3, so one Philox call feeds the whole row and
the four outputs are placed by a column select; no noise tensor is ever materialized. The grid
is (blocks of a sample, batch), so j and n come from program ids without a division.

Precision: all arithmetic is float32 whatever the input dtype (low-precision inputs are loaded
and cast first); the coefficient table is float32. The launcher asks for
``enable_fp_fusion=False`` and the divisions are ``tl.div_rn``, so the step is the reference's
float32 operations, one IEEE rounding each, in the same order: under the interpreter the
deterministic part equals ``reference.fused_step`` bitwise (measured), and compiled it should
too (the sm_90 PTX has no fma and only div.rn; not run, no GPU here). The noise's log/cos/sin
compile to libdevice's logf/cosf/sinf (within 2 ulp) and its sqrt is ``sqrt_rn``, so compiled z
should stay within the contract's 1e-6 of the reference; under the interpreter it is <= 1.2e-7.

Interpreter (``TRITON_INTERPRET=1``, set before this module is imported; how the tests run the
kernel on CPU tensors): there is no bf16 arithmetic (bf16 is only loaded and cast to fp32,
which works), libdevice functions are unavailable (so only ``tl.math`` is used), and programs
run one after another in numpy, so keep test tensors small (a stochastic (2, 3, 16, 16) step
takes ~30 ms, (8, 3, 32, 32) ~250 ms on the 2-core dev machine). On a GPU,
``do_not_specialize`` keeps the step index from causing recompilations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["fused_step", "triton_gaussian", "is_interpreted", "STREAM_X_T", "STREAM_STEP"]

# Philox counter word 3 (the "stream"): the same numbers as ddim_fast.reference (kept literal so
# that importing the kernels does not import the package).
STREAM_X_T = 0
STREAM_STEP = 1

# Groups of 4 elements per program. 256 groups = 1024 elements = 8 per thread at 4 warps:
# two 128-bit fp32 loads per operand per thread (the usual elementwise choice, cf. the Triton
# vector-add tutorial's BLOCK_SIZE=1024). Not tuned: there is no GPU on the dev machines.
MAX_GROUPS = 256
MIN_GROUPS = 16
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: larger batches are launched in chunks
_MAX_SAMPLE = 2**31 - 8  # element offsets inside one sample are int32


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _normal4(seed, g, n, k, stream):
    """Four standard-normal blocks from ONE Philox4x32-10 call per group index g.

    seed: int64 scalar (key = its low and high words); g: (BLOCK,) int32 group indices
    (counter word 0); n: sample index, k: step, stream: counter words 1, 2, 3.
    """
    c0 = g.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + n.to(tl.uint32)  # int64 -> uint32 keeps the low word, as the reference does
    c2 = zero + k.to(tl.uint32)
    c3 = zero + stream.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    z0, z1 = _box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    z2, z3 = _box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return z0, z1, z2, z3


@triton.jit
def _box_muller(u1, u2):
    """tl.pair_uniform_to_normal with a correctly rounded sqrt.

    Same formula; Triton's own uses tl.sqrt, which compiles to the approximate MUFU.SQRT on
    sm_90, one more ulp-level difference from the float32 reference on top of libdevice's
    logf/cosf/sinf (which tl.log/tl.cos/tl.sin compile to in Triton 3.9).
    """
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _place4(z0, z1, z2, z3, col):
    """The (BLOCK, 4) tile whose row g is (z0[g], z1[g], z2[g], z3[g]); col = arange(0, 4).

    A select rather than tl.join(tl.join(z0, z2), tl.join(z1, z3)) reshaped to (BLOCK, 4): the
    two compile to identical sm_90 SASS (the selects fold away, each thread keeps its rows; no
    shared memory), and the select is faster in the interpreter: 28 vs 31 ms at (2, 3, 16, 16),
    250 vs 386 ms at (8, 3, 32, 32).
    """
    c = col[None, :]
    z = tl.where(c == 0, z0[:, None], z1[:, None])
    z = tl.where(c == 2, z2[:, None], z)
    return tl.where(c == 3, z3[:, None], z)


@triton.jit(do_not_specialize=["step", "batch_start"])
def _ddim_step_kernel(
    x_ptr,  # (B, D) x_t, contiguous, any float dtype (cast to fp32 after loading)
    m_ptr,  # (B, D) model output, contiguous, any float dtype
    noise_ptr,  # (B, D) explicit z (read only when HAS_NOISE)
    out_ptr,  # (B, D) float32 x_prev, contiguous
    x0_ptr,  # (B, D) float32 x0 prediction (written only when HAS_X0_OUT)
    coef_ptr,  # (S, 5) float32 coefficient table
    coef_stride_row,  # strides of the table, in elements
    coef_stride_col,
    seed_ptr,  # int64 (seed, sample_offset)
    step,  # row of the table; also Philox counter word 2
    batch_start,  # index of this launch's first sample (batches past 65535 are chunked)
    D,  # elements per sample
    clip,  # clamp x0 to [-clip, clip] (used only when HAS_CLIP)
    PREDICTION: tl.constexpr,  # 0 epsilon, 1 v, 2 x0
    HAS_CLIP: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # add sigma * z
    HAS_NOISE: tl.constexpr,  # z from noise_ptr instead of Philox
    HAS_X0_OUT: tl.constexpr,
    STREAM: tl.constexpr,  # Philox counter word 3 of the per-step noise
    BLOCK: tl.constexpr,  # groups of 4 elements per program (power of 2)
):
    b = tl.program_id(1) + batch_start
    base = b.to(tl.int64) * D  # int64: B * D may exceed 2^31; offsets inside a sample are int32
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # group index inside the sample
    col = tl.arange(0, 4)
    j = g[:, None] * 4 + col[None, :]  # (BLOCK, 4) element index inside the sample
    mask = j < D

    row = coef_ptr + step * coef_stride_row
    sqrt_alpha_t = tl.load(row)
    sqrt_1m_alpha_t = tl.load(row + coef_stride_col)
    sqrt_alpha_prev = tl.load(row + 2 * coef_stride_col)
    c_dir = tl.load(row + 3 * coef_stride_col)
    sigma = tl.load(row + 4 * coef_stride_col)

    x = tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + base + j, mask=mask, other=0.0).to(tl.float32)

    # (x0, eps) from the model's parameterization; same operation order as the reference.
    if PREDICTION == 0:
        eps = m
        x0_pred = tl.div_rn(x - sqrt_1m_alpha_t * eps, sqrt_alpha_t)
    elif PREDICTION == 1:
        x0_pred = sqrt_alpha_t * x - sqrt_1m_alpha_t * m
        eps = sqrt_alpha_t * m + sqrt_1m_alpha_t * x
    else:
        x0_pred = m
        eps = tl.div_rn(x - sqrt_alpha_t * x0_pred, sqrt_1m_alpha_t)
    if HAS_CLIP:
        x0_pred = tl.clamp(x0_pred, -clip, clip, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch

    # Eq. 12: x_prev = sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev - sigma^2) eps + sigma z
    x_prev = sqrt_alpha_prev * x0_pred + c_dir * eps
    if STOCHASTIC:
        if HAS_NOISE:
            z = tl.load(noise_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(seed_ptr)
            n = tl.load(seed_ptr + 1) + b
            z0, z1, z2, z3 = _normal4(seed, g, n, step, tl.full((), STREAM, tl.int32))
            z = _place4(z0, z1, z2, z3, col)
        x_prev = x_prev + sigma * z

    tl.store(out_ptr + base + j, x_prev, mask=mask)
    if HAS_X0_OUT:
        tl.store(x0_ptr + base + j, x0_pred, mask=mask)


@triton.jit(do_not_specialize=["step", "stream", "extra_offset", "batch_start"])
def _gaussian_kernel(
    out_ptr,  # (B, D) float32 normals, contiguous
    seed_ptr,  # int64 (seed, sample_offset)
    step,  # Philox counter word 2
    stream,  # Philox counter word 3
    extra_offset,  # added to the sample offset read from seed_ptr
    batch_start,  # index of this launch's first sample
    D,  # elements per sample
    BLOCK: tl.constexpr,  # groups of 4 elements per program
):
    b = tl.program_id(1) + batch_start
    base = b.to(tl.int64) * D
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col = tl.arange(0, 4)
    j = g[:, None] * 4 + col[None, :]
    seed = tl.load(seed_ptr)
    n = tl.load(seed_ptr + 1) + extra_offset + b
    z0, z1, z2, z3 = _normal4(seed, g, n, step, stream)
    tl.store(out_ptr + base + j, _place4(z0, z1, z2, z3, col), mask=j < D)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_interpreted() -> bool:
    """True when this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_ddim_step_kernel).__name__ == "InterpretedFunction"


def _check_device(device: torch.device, what: str) -> None:
    if device.type == "cuda" or (device.type == "cpu" and is_interpreted()):
        return
    hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)" if device.type == "cpu" else ""
    raise RuntimeError(f"ddim_fast Triton kernel: {what} is on {device}, which this kernel cannot run on{hint}")


def _check_like_x(x, named: dict, *, inputs, outputs):
    """x: a tensor with a batch dimension on a supported device; every tensor of ``named`` has x's
    shape and device; x and the ``inputs`` among them are float, the ``outputs`` float32.
    Returns (device, shape)."""
    if not torch.is_tensor(x) or x.ndim < 1:
        raise ValueError("x: expected a tensor with a leading batch dimension")
    device = x.device
    _check_device(device, "x")
    shape = tuple(x.shape)
    for name, t in named.items():
        if not torch.is_tensor(t):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (that of x), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (x's device), got {t.device}")
    for name, t in [("x", x)] + [(n, named[n]) for n in inputs if n in named]:
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")
    for name in outputs:
        if name in named and named[name].dtype != torch.float32:
            raise ValueError(f"{name}: expected a float32 tensor, got {named[name].dtype}")
    return device, shape


def _check_table_row(coef, step, prediction, device: torch.device, *, columns: int, what: str) -> None:
    """The (S, columns) float32 table on x's device, an integer row of it, a prediction code."""
    if not torch.is_tensor(coef) or coef.ndim != 2 or coef.shape[1] != columns or coef.dtype != torch.float32:
        got = f"{coef.dtype} {tuple(coef.shape)}" if torch.is_tensor(coef) else type(coef).__name__
        raise ValueError(f"coef: expected the (S, {columns}) float32 {what}, got {got}")
    if coef.device != device:
        raise ValueError(f"coef: expected the table on {device} (x's device), got {coef.device}")
    S = coef.shape[0]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < S:
        raise ValueError(f"step: expected an integer row of the table in [0, {S}), got {step!r}")
    if prediction not in (0, 1, 2):
        raise ValueError(f"prediction: expected 0 (epsilon), 1 (v) or 2 (x0), got {prediction!r}")


def _check_seed(seed: torch.Tensor, device: torch.device) -> None:
    if not torch.is_tensor(seed) or seed.dtype != torch.int64 or seed.numel() != 2 or seed.device != device:
        got = f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if torch.is_tensor(seed) else type(seed).__name__
        raise ValueError(f"seed: expected an int64 tensor (seed, sample_offset) of 2 elements on {device}, got {got}")


def _launch_shape(D: int):
    """(BLOCK groups per program, programs per sample, num_warps) for samples of D elements."""
    groups = (D + 3) // 4
    block = min(MAX_GROUPS, max(MIN_GROUPS, triton.next_power_of_2(groups)))
    num_warps = 4 if block >= 128 else (2 if block >= 64 else 1)
    return block, triton.cdiv(groups, block), num_warps


def _batch_chunks(B: int):
    for start in range(0, B, _MAX_GRID_Y):
        yield start, min(_MAX_GRID_Y, B - start)


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _flat_out(t: torch.Tensor):
    """(tensor the kernel writes, tensor to copy back into t or None)."""
    if t.is_contiguous():
        return t, None
    tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return tmp, tmp


def fused_step(
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
    x0_out: Optional[torch.Tensor] = None,
) -> None:
    """One fused DDIM step; the contract (and arguments) of ``ddim_fast.reference.fused_step``.

    Writes ``out`` (float32, x's shape) and, when given, ``x0_out``. All inputs are checked here
    so that a mistake is a clear ValueError, never an error from inside the kernel. ``out`` may
    alias ``x`` (each element is read before it is written, by the same program).
    """
    named = {"model_out": model_out, "out": out}
    if stochastic and noise is not None:
        named["noise"] = noise
    if x0_out is not None:
        named["x0_out"] = x0_out
    device, shape = _check_like_x(x, named, inputs=("model_out", "noise"), outputs=("out", "x0_out"))
    _check_table_row(coef, step, prediction, device, columns=5, what="coefficient table")
    _check_seed(seed, device)

    B = shape[0]
    D = x.numel() // B if B else 0
    if D > _MAX_SAMPLE:
        raise ValueError(f"x: at most {_MAX_SAMPLE} elements per sample, got {D}")
    if x.numel() == 0:
        return
    x_c = x.contiguous()
    m_c = model_out.contiguous()
    z_c = named["noise"].contiguous() if "noise" in named else x_c
    seed_c = seed.contiguous()
    out_k, out_back = _flat_out(out)
    x0_k, x0_back = _flat_out(x0_out) if x0_out is not None else (out_k, None)

    block, programs, num_warps = _launch_shape(D)
    with _device_ctx(device):
        for start, count in _batch_chunks(B):
            _ddim_step_kernel[(programs, count)](
                x_c, m_c, z_c, out_k, x0_k,
                coef, coef.stride(0), coef.stride(1),
                seed_c, step, start, D, float(clip),
                PREDICTION=prediction,
                HAS_CLIP=bool(clip > 0),
                STOCHASTIC=bool(stochastic),
                HAS_NOISE="noise" in named,  # a noise tensor without stochastic is ignored, as in the reference
                HAS_X0_OUT=x0_out is not None,
                STREAM=STREAM_STEP,
                BLOCK=block,
                num_warps=num_warps,
                enable_fp_fusion=False,
            )  # fmt: skip
    if out_back is not None:
        out.copy_(out_back)
    if x0_back is not None:
        x0_out.copy_(x0_back)


def triton_gaussian(
    seed,
    shape: Sequence[int],
    *,
    step: int = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device=None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 normals of ``shape`` = (B, ...) from the kernel's generator (``reference.gaussian``).

    ``seed``: an int in [0, 2**63), or an int64 device tensor (seed, sample_offset) as the op
    takes it (then nothing is read on the host, and ``sample_offset`` is added to its second
    entry). ``out``: an optional contiguous float32 buffer to fill. Used for x_T (stream 0, one
    launch, capturable in a CUDA graph) and to test the in-kernel noise against the reference.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape: expected at least a batch dimension")
    for name, v in (("step", step), ("stream", stream), ("sample_offset", sample_offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: expected an int, got {v!r}")
    if not 0 <= step < 2**32 or not 0 <= stream < 2**32:
        raise ValueError(f"step and stream: expected values in [0, 2**32), got {step}, {stream}")
    if torch.is_tensor(seed):
        device = seed.device if device is None else torch.device(device)
        _check_seed(seed, device)
        seed_t = seed.contiguous()
        extra = sample_offset
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an integer in [0, 2**63) or an int64 tensor, got {seed!r}")
        device = torch.device(device) if device is not None else torch.device("cuda" if not is_interpreted() else "cpu")
        seed_t = torch.tensor([seed, sample_offset], dtype=torch.int64, device=device)
        extra = 0
    _check_device(device, "the output")
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 tensor of shape {shape} on {device}")
    B = shape[0]
    D = out.numel() // B if B else 0
    if D > _MAX_SAMPLE:
        raise ValueError(f"shape: at most {_MAX_SAMPLE} elements per sample, got {D}")
    if out.numel() == 0:
        return out
    block, programs, num_warps = _launch_shape(D)
    with _device_ctx(device):
        for start, count in _batch_chunks(B):
            _gaussian_kernel[(programs, count)](
                out, seed_t, step, stream, extra, start, D, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False
            )
    return out
