"""The one fused step of every solver as one Triton kernel, and the Philox Gaussian it draws.

What is fused (one pass over memory per step; the contract of ``ddim_fast.layout``, whose
column indices and encodings this file imports, and of ``ddim_fast.reference.fused_step``).
A program owns BLOCK groups of 4 consecutive elements of one sample and, for them, reads

    x_t          (B, *shape)     float32 state
    model_out    (B, *shape)     fp32 / fp16 / bf16 / fp64 (read in its own dtype, cast to fp32)
    table[step]  (NUM_COLUMNS)   float32 coefficients, loaded through the table pointer and the
                                 step index, never a Python float or a constexpr: a replayed CUDA
                                 graph sees the table's current values
    history      (R, *shape)     float32 ring of earlier x0 or eps; term j (j <= min(3, R)) is
                                 slot (step - j) mod R, read only when c_hj (or d_hj) != 0
    saved        (B, *shape)     float32 predictor-corrector state, read only when c_saved or
                                 d_saved != 0 (HAS_SAVED)
    noise        (B, *shape)     float32 explicit z (HAS_NOISE), read only when sigma != 0
    seed         (2 int64)       (seed, sample_offset), read on the device, so a replayed graph
                                 draws fresh noise when the seed tensor is overwritten

and computes, with x0/eps from the prediction type (x0 clamped when clip > 0, eps kept):

    x_next = c_x x_t + c_x0 x0 + c_eps eps + c_saved saved + sum_j c_hj H[step - j] + sigma z
    saved <- d_x x_t + d_x0 x0 + d_eps eps + d_saved saved + sum_j d_hj H[step - j]
    H[step mod R] <- x0 or eps (HISTORY_KIND)

then writes ``out`` = x_next, ``x0_out``, the ring slot, ``saved``, and ``flags[step,
FLAG_MODEL]`` / ``flags[step, FLAG_STATE]`` = 1 when the model output / x_next has a non-finite
element (each thread that holds one stores 1 to the same int32: no block reduction, no atomics;
the buffer starts at 0 and nothing writes 0). A masked-off load moves no memory, so an unused ring
slot or saved state costs nothing and its contents (NaN included) never reach the result. The
noise z is drawn only on rows whose sigma != 0, a runtime branch on the loaded coefficient
(uniform across the program), so deterministic rows skip the Philox rounds. Every load of an
element happens before any store to it, by the same thread (all tensors share one tile layout):
``out`` may alias ``x``, and the ring needs no spare slot (for R = 1 the slot read is the slot
written).

Noise (the contract of ``ddim_fast.reference.gaussian``): z at (seed, global sample
n = sample_offset + b, step k, element j) is output j % 4 of Philox4x32-10 with counter
(j // 4, n mod 2^32, k, stream + (n >> 32) * 2^STREAM_BITS) and key (seed_lo, seed_hi)
(``tl.philox``), turned into normals by ``tl.uint_to_uniform_float`` and the Box-Muller formula
of ``tl.pair_uniform_to_normal`` (with a correctly rounded sqrt, see ``_box_muller``). The
sample index is 48 bits (``layout.MAX_SAMPLES``): sample 2^32 is not sample 0. A tile is
(BLOCK, 4): row g holds elements 4g..4g+3, so one Philox call feeds a row and a column select
places the four outputs; no noise tensor is materialized. The grid is (blocks of a sample,
batch), so j and n come from program ids without a division.

Precision: float32 arithmetic whatever the model output's dtype; the table is float32. One
numeric rule, as for every backend: within 2x PyTorch's own float32 error of the float64
reference (tests/test_triton_kernel.py). Bitwise equality with the reference is not a goal, so
the launcher lets the compiler contract a * b + c into an FMA (``enable_fp_fusion=True``, passed
explicitly: Triton 3.9 warns that its default turns to False in 3.10): one rounding instead of
two, so each fused term is at least as close to the float64 value; the step is memory-bound
either way (12 B per element for DDIM in fp32, 44 B with every operand). Divisions stay
``tl.div_rn`` and the Box-Muller sqrt ``tl.sqrt_rn``: Triton's plain ``/`` and ``tl.sqrt``
compile to div.full.f32 and sqrt.approx.ftz.f32 for sm_90 (checked in the PTX), which are not
PyTorch's correctly rounded float32. log/cos/sin compile to libdevice (within 2 ulp).

Interpreter (``TRITON_INTERPRET=1``, set before this module is imported; how the tests run the
kernel on CPU tensors): no bf16 arithmetic (bf16 is only loaded and cast to fp32, which works),
no libdevice (only ``tl.math`` is used), no ``&`` between a scalar and a block of bools (a
scalar condition becomes a bound, ``j < tl.where(cond, D, 0)``), and programs run one after
another in numpy, so keep test tensors small (an (8, 3, 32, 32) step with noise and flags took
0.84 s on the shared 2-core dev machine, the previous DDIM-only kernel 0.82 s in the same run).
On a GPU, ``do_not_specialize`` keeps the step index from recompiling.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ddim_fast import layout

__all__ = ["fused_step", "gaussian", "is_interpreted"]

# The contract's column indices and encodings as Triton constexpr globals (a @triton.jit
# function may read a module global only when it is a tl.constexpr), read from layout once.
_NUM_COLUMNS = tl.constexpr(layout.NUM_COLUMNS)
_SQRT_ALPHA = tl.constexpr(layout.SQRT_ALPHA)
_SQRT_ONE_MINUS_ALPHA = tl.constexpr(layout.SQRT_ONE_MINUS_ALPHA)
_C_X = tl.constexpr(layout.C_X)
_C_X0 = tl.constexpr(layout.C_X0)
_C_EPS = tl.constexpr(layout.C_EPS)
_C_SAVED = tl.constexpr(layout.C_SAVED)
_SIGMA = tl.constexpr(layout.SIGMA)
_C_H = tl.constexpr(layout.C_H)
_D_X = tl.constexpr(layout.D_X)
_D_X0 = tl.constexpr(layout.D_X0)
_D_EPS = tl.constexpr(layout.D_EPS)
_D_SAVED = tl.constexpr(layout.D_SAVED)
_D_H = tl.constexpr(layout.D_H)
_PRED_EPSILON = tl.constexpr(layout.PREDICTIONS["epsilon"])
_PRED_V = tl.constexpr(layout.PREDICTIONS["v"])
_HISTORY_EPS = tl.constexpr(layout.HISTORY_KINDS["eps"])
_FLAG_MODEL = tl.constexpr(layout.FLAG_MODEL)
_FLAG_STATE = tl.constexpr(layout.FLAG_STATE)
_STREAM_STEP = tl.constexpr(layout.STREAM_STEP)
_STREAM_BITS = tl.constexpr(layout.STREAM_BITS)
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # |v| <= this is false for inf and NaN

# Groups of 4 elements per program. 256 groups = 1024 elements = 8 per thread at 4 warps:
# two 128-bit fp32 loads per operand per thread (the usual elementwise choice, cf. the Triton
# vector-add tutorial's BLOCK_SIZE=1024). Not tuned on a GPU.
MAX_GROUPS = 256
MIN_GROUPS = 16
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: larger batches are launched in chunks


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _box_muller(u1, u2):
    """tl.pair_uniform_to_normal with a correctly rounded sqrt (Triton's tl.sqrt is MUFU.SQRT on sm_90)."""
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normal4(seed, g, n, k, stream):
    """Four standard-normal blocks from ONE Philox4x32-10 call per group index g.

    seed: int64 scalar (key = its low and high words); g: (BLOCK,) int32 group indices (counter
    word 0); n: int64 global sample index (word 1 its low 32 bits, bits 32..47 go to word 3
    above the stream); k: step (word 2); stream: the stream number (low bits of word 3).
    """
    c0 = g.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + n.to(tl.uint32)  # int64 -> uint32 keeps the low word
    c2 = zero + k.to(tl.uint32)
    c3 = zero + (stream + ((n >> 32) << _STREAM_BITS)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    z0, z1 = _box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    z2, z3 = _box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return z0, z1, z2, z3


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


@triton.jit
def _load_if_used(ptr, c, d, j, D):
    """The (BLOCK, 4) operand at ptr + j (j < D), read only when coefficient c or d is nonzero, else 0.

    The scalar condition becomes a bound on j: the interpreter cannot AND a scalar bool with a
    block of them. A masked-off load issues no memory transaction.
    """
    return tl.load(ptr + j, mask=j < tl.where((c != 0.0) | (d != 0.0), D, 0), other=0.0)


@triton.jit
def _history_term(hist_ptr, row, step, R, N, j, D, TERM: tl.constexpr, HAS_SAVED: tl.constexpr):
    """H[(step - j) mod R] for j = TERM, read only when c_hj (or, with a saved state, d_hj) != 0;
    hist_ptr points at this sample in slot 0."""
    c = tl.load(row + _C_H + TERM - 1)
    d = c
    if HAS_SAVED:
        d = tl.load(row + _D_H + TERM - 1)
    slot = ((step + R - TERM) % R).to(tl.int64)  # step + R - TERM >= 0: TERM <= min(3, R)
    return _load_if_used(hist_ptr + slot * N, c, d, j, D)


@triton.jit
def _term(c, v):
    """c * v, or exactly 0 when the coefficient is 0 (v may then be a stale NaN: not read, not used)."""
    return tl.where(c != 0.0, c * v, 0.0)


@triton.jit
def _combine(
    row, COL_X: tl.constexpr, COL_X0: tl.constexpr, COL_EPS: tl.constexpr, COL_SAVED: tl.constexpr, COL_H: tl.constexpr,
    x, x0_pred, eps, saved, h1, h2, h3, HAS_SAVED: tl.constexpr, NUM_HIST: tl.constexpr,
):  # fmt: skip
    """One linear combination of the row (x_next with the c_* columns, the saved state with d_*):
    row[COL_X] x + row[COL_X0] x0 + row[COL_EPS] eps + row[COL_SAVED] saved + sum_j row[COL_H + j - 1] h_j."""
    acc = tl.load(row + COL_X) * x + tl.load(row + COL_X0) * x0_pred + tl.load(row + COL_EPS) * eps
    if HAS_SAVED:
        acc += _term(tl.load(row + COL_SAVED), saved)
    if NUM_HIST >= 1:
        acc += _term(tl.load(row + COL_H), h1)
    if NUM_HIST >= 2:
        acc += _term(tl.load(row + COL_H + 1), h2)
    if NUM_HIST >= 3:
        acc += _term(tl.load(row + COL_H + 2), h3)
    return acc


@triton.jit(do_not_specialize=["step", "batch_start"])
def _step_kernel(
    x_ptr,  # (B, D) float32 x_t
    m_ptr,  # (B, D) model output, fp32 / fp16 / bf16 / fp64 (cast to fp32 after loading)
    table_ptr,  # (S, NUM_COLUMNS) float32 coefficient table, contiguous
    seed_ptr,  # int64 (seed, sample_offset)
    hist_ptr,  # (R, B, D) float32 ring (used only when NUM_HIST > 0)
    saved_ptr,  # (B, D) float32 saved state, read and rewritten (only when HAS_SAVED)
    noise_ptr,  # (B, D) float32 explicit z (only when HAS_NOISE)
    out_ptr,  # (B, D) float32 x_next (may be x_ptr)
    x0_ptr,  # (B, D) float32 x0 prediction (only when HAS_X0_OUT)
    flags_ptr,  # (S, flags_stride) int32 finite flags (only when HAS_FLAGS)
    step,  # row of the table; Philox counter word 2; ring position
    R,  # ring slots
    N,  # B * D: elements of one ring slot
    D,  # elements per sample
    batch_start,  # index of this launch's first sample (batches past 65535 are chunked)
    clip,  # clamp x0 to [-clip, clip] (only when HAS_CLIP)
    flags_stride,  # elements per row of flags
    PREDICTION: tl.constexpr,  # layout.PREDICTIONS
    HISTORY_KIND: tl.constexpr,  # layout.HISTORY_KINDS: what H[step mod R] receives
    NUM_HIST: tl.constexpr,  # history terms the ring holds: min(HISTORY_TERMS, R), 0 without one
    HAS_CLIP: tl.constexpr,
    HAS_SAVED: tl.constexpr,
    HAS_NOISE: tl.constexpr,  # z from noise_ptr instead of Philox
    HAS_X0_OUT: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    BLOCK: tl.constexpr,  # groups of 4 elements per program (power of 2)
):
    b = tl.program_id(1) + batch_start
    base = b.to(tl.int64) * D  # int64: B * D may exceed 2^31; offsets inside a sample are int32
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # group index inside the sample
    col = tl.arange(0, 4)
    j = g[:, None] * 4 + col[None, :]  # (BLOCK, 4) element index inside the sample
    mask = j < D
    offs = base + j

    row = table_ptr + step * _NUM_COLUMNS
    sqrt_alpha_t = tl.load(row + _SQRT_ALPHA)
    sqrt_1m_alpha_t = tl.load(row + _SQRT_ONE_MINUS_ALPHA)

    # ---- every load first (out may alias x; the ring slot written may be one that is read)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    saved, h1, h2, h3 = x, x, x, x  # placeholders for the operands this configuration lacks (never used)
    if HAS_SAVED:
        saved = _load_if_used(saved_ptr + base, tl.load(row + _C_SAVED), tl.load(row + _D_SAVED), j, D)
    if NUM_HIST >= 1:  # the history terms H[step - j], j = 1..NUM_HIST, unrolled
        h1 = _history_term(hist_ptr + base, row, step, R, N, j, D, 1, HAS_SAVED)
    if NUM_HIST >= 2:
        h2 = _history_term(hist_ptr + base, row, step, R, N, j, D, 2, HAS_SAVED)
    if NUM_HIST >= 3:
        h3 = _history_term(hist_ptr + base, row, step, R, N, j, D, 3, HAS_SAVED)

    # ---- (x0, eps) from the model's parameterization
    if PREDICTION == _PRED_EPSILON:
        eps = m
        x0_pred = tl.div_rn(x - sqrt_1m_alpha_t * eps, sqrt_alpha_t)
    elif PREDICTION == _PRED_V:
        x0_pred = sqrt_alpha_t * x - sqrt_1m_alpha_t * m
        eps = sqrt_alpha_t * m + sqrt_1m_alpha_t * x
    else:
        x0_pred = m
        eps = tl.div_rn(x - sqrt_alpha_t * x0_pred, sqrt_1m_alpha_t)
    if HAS_CLIP:  # eps stays the model's (DDIM's rule); NaN stays NaN, as in torch.clamp
        x0_pred = tl.clamp(x0_pred, -clip, clip, propagate_nan=tl.PropagateNan.ALL)

    # ---- x_next: the row's linear combination (DDIM Eq. 12 is c_x0 = sqrt(alpha_prev),
    # c_eps = sqrt(1 - alpha_prev - sigma^2), sigma; multistep rows add c_x and c_hj)
    x_next = _combine(row, _C_X, _C_X0, _C_EPS, _C_SAVED, _C_H, x, x0_pred, eps, saved, h1, h2, h3, HAS_SAVED, NUM_HIST)
    sigma = tl.load(row + _SIGMA)
    if sigma != 0.0:  # a runtime branch on the table's value: deterministic rows draw nothing
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0)
        else:
            seed = tl.load(seed_ptr)
            n = tl.load(seed_ptr + 1) + b
            z0, z1, z2, z3 = _normal4(seed, g, n, step, tl.full((), _STREAM_STEP, tl.int32))
            z = _place4(z0, z1, z2, z3, col)
        x_next += sigma * z

    # ---- the stores
    tl.store(out_ptr + offs, x_next, mask=mask)
    if HAS_X0_OUT:
        tl.store(x0_ptr + offs, x0_pred, mask=mask)
    if HAS_SAVED:
        s_next = _combine(row, _D_X, _D_X0, _D_EPS, _D_SAVED, _D_H, x, x0_pred, eps, saved, h1, h2, h3, HAS_SAVED, NUM_HIST)
        tl.store(saved_ptr + offs, s_next, mask=mask)
    if NUM_HIST >= 1:
        slot_w = (step % R).to(tl.int64)
        if HISTORY_KIND == _HISTORY_EPS:
            tl.store(hist_ptr + slot_w * N + offs, eps, mask=mask)
        else:
            tl.store(hist_ptr + slot_w * N + offs, x0_pred, mask=mask)
    if HAS_FLAGS:
        # Each group of 4 (one thread's registers) that holds a non-finite element stores 1 to the
        # flag: equal values, so the race is benign, and finite groups store nothing. Reducing only
        # the within-thread axis keeps the tile's layout; a (BLOCK, 4) store to the one address, or
        # a whole-block tl.max, goes through shared memory and a barrier on sm_90 (1024 B / 16 B).
        flag = flags_ptr + step * flags_stride + g * 0
        bad_m = tl.max((mask & ~(tl.abs(m) <= _FLOAT32_MAX)).to(tl.int32), axis=1)
        bad_x = tl.max((mask & ~(tl.abs(x_next) <= _FLOAT32_MAX)).to(tl.int32), axis=1)
        tl.store(flag + _FLAG_MODEL, 1, mask=bad_m > 0)
        tl.store(flag + _FLAG_STATE, 1, mask=bad_x > 0)


@triton.jit(do_not_specialize=["stream", "extra_offset", "batch_start"])
def _gaussian_kernel(
    out_ptr,  # (B, D) float32 normals, contiguous
    seed_ptr,  # int64 (seed, sample_offset)
    stream,  # the stream (layout.STREAM_X_T for x_T)
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
    z0, z1, z2, z3 = _normal4(seed, g, n, tl.full((), 0, tl.int32), stream)  # step 0: x_T precedes the first step
    tl.store(out_ptr + base + j, _place4(z0, z1, z2, z3, col), mask=j < D)


# --------------------------------------------------------------------------------------------
# launchers (no argument checks: ddim_fast.ops.check_step_args is the one validation)
# --------------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_step_kernel).__name__ == "InterpretedFunction"


def _launch_shape(D: int):
    """(BLOCK groups per program, programs per sample, num_warps) for samples of D elements."""
    groups = (D + 3) // 4
    block = min(MAX_GROUPS, max(MIN_GROUPS, triton.next_power_of_2(groups)))
    num_warps = 4 if block >= 128 else (2 if block >= 64 else 1)
    return block, triton.cdiv(groups, block), num_warps


def _device_ctx(device: torch.device):
    # Triton launches on the current CUDA device; tensors on another GPU need it switched.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_step(x, model_out, table, step, seed, prediction, clip, history_kind, history, saved, noise, out, x0_out, flags):
    """One row of a solver's table on the GPU: the arguments (typed in ``ddim_fast.ops.step``, the
    op's schema) and the contract of ``reference.fused_step``.

    The arguments must already be accepted by ``ddim_fast.ops.check_step_args`` (contiguous,
    shapes and devices matching); this only launches.
    """
    B = x.shape[0]
    N = x.numel()
    if N == 0:
        return
    D = N // B
    R = history.shape[0] if history is not None else 1
    block, programs, num_warps = _launch_shape(D)
    with _device_ctx(x.device):
        for start in range(0, B, _MAX_GRID_Y):
            _step_kernel[(programs, min(_MAX_GRID_Y, B - start))](
                x, model_out, table, seed,
                history if history is not None else x,  # never dereferenced when its flag is off
                saved if saved is not None else x,
                noise if noise is not None else x,
                out,
                x0_out if x0_out is not None else x,
                flags if flags is not None else seed,
                step, R, N, D, start, float(clip),
                flags.stride(0) if flags is not None else 0,
                PREDICTION=prediction,
                HISTORY_KIND=history_kind,
                NUM_HIST=min(layout.HISTORY_TERMS, R) if history is not None else 0,
                HAS_CLIP=clip > 0,
                HAS_SAVED=saved is not None,
                HAS_NOISE=noise is not None,
                HAS_X0_OUT=x0_out is not None,
                HAS_FLAGS=flags is not None,
                BLOCK=block,
                num_warps=num_warps,
                enable_fp_fusion=True,  # module docstring: the one numeric rule does not need IEEE order
            )  # fmt: skip


def gaussian(
    seed,
    shape: Sequence[int],
    *,
    stream: int,
    sample_offset: int,
    device,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 normals of ``shape`` = (B, ...) under the noise contract (``reference.gaussian``, step 0).

    ``seed``: an int in [0, 2**63), or an int64 device tensor (seed, sample_offset) as the op
    takes it (then nothing is read on the host and ``sample_offset`` is added to its second
    entry: one launch, capturable in a CUDA graph). ``out``: an optional contiguous float32
    buffer of ``shape`` to fill. Arguments are checked by the caller (``ddim_fast.ops.gaussian``).
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    if torch.is_tensor(seed):
        seed_t, extra = seed, int(sample_offset)
    else:
        seed_t, extra = torch.tensor([int(seed), int(sample_offset)], dtype=torch.int64, device=device), 0
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    B = shape[0]
    D = out.numel() // B
    block, programs, num_warps = _launch_shape(D)
    with _device_ctx(device):
        for start in range(0, B, _MAX_GRID_Y):
            _gaussian_kernel[(programs, min(_MAX_GRID_Y, B - start))](
                out, seed_t, int(stream), extra, start, D, BLOCK=block, num_warps=num_warps, enable_fp_fusion=True
            )
    return out
