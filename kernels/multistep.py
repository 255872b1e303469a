"""The fused multistep step (DPM-Solver++(2M), (3M); DDIM as the first-order case) as one Triton kernel.

What is fused (one pass over memory per step; ``ddim_fast.solvers`` derives the coefficients).
Each program reads BLOCK consecutive elements of the flattened batch:

    x_t          (B, *shape)     fp32 / fp16 / bf16 / fp64, read in its own dtype
    model_out    (B, *shape)     fp32 / fp16 / bf16 / fp64, read in its own dtype
    coef[step]   (6 floats)      sqrt(a_t), sqrt(1 - a_t), c_x, c_0, c_1, c_2, loaded through a
                                 pointer and the step index (never Python floats or constexprs,
                                 so a captured CUDA graph sees the table's current values)
    history      (H, B, *shape)  float32 ring of earlier x0-predictions: x0_{k-1} in slot
                                 (k - 1) % H (H >= 2), x0_{k-2} in slot (k - 2) % H (H = 3)

and writes ``out`` = x_next (float32), x0_k into ring slot k % H, and, when asked, ``x0_out``:

    x0     = (x - sqrt(1 - a_t) m) / sqrt(a_t)   | sqrt(a_t) x - sqrt(1 - a_t) m   | m
             (epsilon / v / x0 models), clamped to [-clip, clip] when clip > 0
    x_next = c_x x + c_0 x0 + c_1 x0_{k-1} + c_2 x0_{k-2}

A history term whose coefficient is 0 (warm-up and final steps) is a masked-off load: nothing
is read, so the ring may hold garbage (even NaN) there and costs no bandwidth on those steps.
The ring slots are chosen on the host from the Python step index (``solvers.history_slots``)
and passed as element offsets; a CUDA graph records them per launch, which is what a captured
trajectory needs (step k is always ring slot k % H). The write slot differs from the read
slots, so no program reads what another writes. Bytes per element and step: 4 (x) + 2-4
(model) + 4 (out) + 4 (x0 store) + 4 per history term read, i.e. 20 B in fp32 for 2M against
16 B for the DDIM step.

Precision: float32 arithmetic whatever the input dtypes; ``enable_fp_fusion=False`` and
``tl.div_rn`` make it the reference's float32 operations in the same order (under the
interpreter the output equals ``ddim_fast.solvers.multistep_step`` bitwise, measured).

Interpreter (``TRITON_INTERPRET=1`` before this module is imported): no bf16 arithmetic (bf16
is only loaded and cast), programs run one after another in numpy; keep test tensors small.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["multistep_step", "is_interpreted"]

# Elements per program: 8 per thread at 4 warps, two 128-bit fp32 loads per operand (the usual
# elementwise choice, as kernels/ddim_step.py). Not tuned: there is no GPU on the dev machines.
BLOCK = 1024
NUM_WARPS = 4
_MAX_ELEMENTS = 2**62  # offsets are int64


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["step", "w_off", "p1_off", "p2_off"])
def _multistep_kernel(
    x_ptr,  # (N,) x_t, contiguous, any float dtype (cast to fp32 after loading)
    m_ptr,  # (N,) model output, contiguous, any float dtype
    hist_ptr,  # (H * N,) float32 ring of x0-predictions, contiguous
    out_ptr,  # (N,) float32 x_next
    x0_ptr,  # (N,) float32 x0-prediction (written only when HAS_X0_OUT)
    coef_ptr,  # (S, 6) float32 coefficient table
    coef_stride_row,  # strides of the table, in elements
    coef_stride_col,
    step,  # row of the table
    w_off,  # element offset of the ring slot written with x0_k
    p1_off,  # element offset of x0_{k-1} (read only when NUM_PREV >= 1 and c_1 != 0)
    p2_off,  # element offset of x0_{k-2} (read only when NUM_PREV >= 2 and c_2 != 0)
    N,  # elements in x
    clip,  # clamp x0 to [-clip, clip] (used only when HAS_CLIP)
    PREDICTION: tl.constexpr,  # 0 epsilon, 1 v, 2 x0
    HAS_CLIP: tl.constexpr,
    NUM_PREV: tl.constexpr,  # history terms the ring can hold: min(H - 1, 2)
    HAS_X0_OUT: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program (power of 2)
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N

    row = coef_ptr + step * coef_stride_row
    sqrt_alpha_t = tl.load(row)
    sqrt_1m_alpha_t = tl.load(row + coef_stride_col)
    c_x = tl.load(row + 2 * coef_stride_col)
    c_0 = tl.load(row + 3 * coef_stride_col)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # x0 from the model's parameterization; same operation order as the reference.
    if PREDICTION == 0:
        x0_pred = tl.div_rn(x - sqrt_1m_alpha_t * m, sqrt_alpha_t)
    elif PREDICTION == 1:
        x0_pred = sqrt_alpha_t * x - sqrt_1m_alpha_t * m
    else:
        x0_pred = m
    if HAS_CLIP:
        x0_pred = tl.clamp(x0_pred, -clip, clip, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch

    # DPM-Solver++ multistep update in linear form: x_next = c_x x + c_0 x0_k + c_1 x0_{k-1} + c_2 x0_{k-2}
    x_next = c_x * x + c_0 * x0_pred
    if NUM_PREV >= 1:
        c_1 = tl.load(row + 4 * coef_stride_col)
        # (a scalar bound rather than mask & (c_1 != 0): the interpreter cannot AND a scalar bool)
        x0_prev1 = tl.load(hist_ptr + p1_off + offs, mask=offs < tl.where(c_1 != 0.0, N, 0), other=0.0)
        x_next = x_next + c_1 * x0_prev1
    if NUM_PREV >= 2:
        c_2 = tl.load(row + 5 * coef_stride_col)
        x0_prev2 = tl.load(hist_ptr + p2_off + offs, mask=offs < tl.where(c_2 != 0.0, N, 0), other=0.0)
        x_next = x_next + c_2 * x0_prev2

    tl.store(out_ptr + offs, x_next, mask=mask)
    tl.store(hist_ptr + w_off + offs, x0_pred, mask=mask)
    if HAS_X0_OUT:
        tl.store(x0_ptr + offs, x0_pred, mask=mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

# Shared with the DDIM kernel's launcher (same device rules, dtypes and interpreter check).
from .ddim_step import _check_like_x, _check_table_row, _device_ctx, is_interpreted  # noqa: E402


def multistep_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    step: int,
    prediction: int,
    clip: float,
    history: torch.Tensor,
    out: torch.Tensor,
    x0_out: Optional[torch.Tensor] = None,
) -> None:
    """One fused multistep step; the contract (and arguments) of ``ddim_fast.solvers.multistep_step``.

    Writes ``out`` (float32, x's shape), ring slot ``step % H`` of ``history`` and, when given,
    ``x0_out``. Inputs are checked here so that a mistake is a clear ValueError, never an error
    from inside the kernel. ``out`` may alias ``x`` (each element is read before it is written,
    by the same program); ``history`` must be contiguous (the sampler's static buffer).
    """
    named = {"model_out": model_out, "out": out}
    if x0_out is not None:
        named["x0_out"] = x0_out
    device, shape = _check_like_x(x, named, inputs=("model_out",), outputs=("out", "x0_out"))
    if (
        not torch.is_tensor(history)
        or history.ndim != x.ndim + 1
        or tuple(history.shape[1:]) != shape
        or not 1 <= history.shape[0] <= 3
        or history.dtype != torch.float32
        or history.device != device
        or not history.is_contiguous()
    ):
        got = type(history).__name__
        if torch.is_tensor(history):
            got = f"{history.dtype} {tuple(history.shape)} on {history.device}"
        raise ValueError(f"history: expected a contiguous float32 (H, *{shape}) ring with H in 1..3 on {device}, got {got}")
    _check_table_row(coef, step, prediction, device, columns=6, what="multistep table")

    N = x.numel()
    if N == 0:
        return
    if N * history.shape[0] > _MAX_ELEMENTS:
        raise ValueError(f"x: at most {_MAX_ELEMENTS // 3} elements, got {N}")
    H = history.shape[0]
    w, p1, p2 = step % H, (step - 1) % H, (step - 2) % H  # solvers.history_slots (not imported: no package import here)
    x_c = x.contiguous()
    m_c = model_out.contiguous()
    out_k = out if out.is_contiguous() else torch.empty(shape, dtype=torch.float32, device=device)
    x0_k = out_k
    if x0_out is not None:
        x0_k = x0_out if x0_out.is_contiguous() else torch.empty(shape, dtype=torch.float32, device=device)

    with _device_ctx(device):
        _multistep_kernel[(triton.cdiv(N, BLOCK),)](
            x_c, m_c, history, out_k, x0_k,
            coef, coef.stride(0), coef.stride(1),
            step, w * N, p1 * N, p2 * N, N, float(clip),
            PREDICTION=prediction,
            HAS_CLIP=bool(clip > 0),
            NUM_PREV=min(H - 1, 2),
            HAS_X0_OUT=x0_out is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip
    if out_k is not out:
        out.copy_(out_k)
    if x0_out is not None and x0_k is not x0_out:
        x0_out.copy_(x0_k)
