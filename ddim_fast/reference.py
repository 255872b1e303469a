"""Plain-PyTorch references: the fused DDIM step and the counter-based Gaussian generator.

These are the oracles the Triton kernel (``ddim_fast.kernels.ddim_step``) and the C++ kernel
(``csrc/``) are tested against, and the ``backend="torch"`` path of the sampler. They are
written for clarity, not speed: each line is one formula of DESIGN.md.

The step (Eq. 12 of the DDIM paper), for coefficient row
``(sqrt_alpha_t, sqrt_1m_alpha_t, sqrt_alpha_prev, c_dir, sigma)``::

    epsilon model:  eps = m;                         x0 = (x - sqrt_1m_alpha_t * eps) / sqrt_alpha_t
    v model:        x0  = sqrt_alpha_t * x - sqrt_1m_alpha_t * m;  eps = sqrt_alpha_t * m + sqrt_1m_alpha_t * x
    x0 model:       x0  = m;                         eps = (x - sqrt_alpha_t * x0) / sqrt_1m_alpha_t
    x0 = clamp(x0, -clip, clip)                      (only when clip > 0)
    x_prev = sqrt_alpha_prev * x0 + c_dir * eps + sigma * z     (z only when stochastic)

The noise z at (seed, global sample index n, step k, element j of the sample) is

    r0, r1, r2, r3 = Philox4x32-10(counter = (j // 4, n mod 2^32, k, stream + (n >> 32) * 2^16),
                                   key = (seed_lo, seed_hi))
    u_i = float32(int32(r_i) if >= 0 else ~int32(r_i)) * 4.6566127342e-10      (Triton's uint_to_uniform_float)
    (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3)                  (Triton's pair_uniform_to_normal)
    z = (z0, z1, z2, z3)[j % 4]

with stream 0 for x_T and stream 1 for the per-step noise; one Philox call feeds four
outputs. Sample indices n < 2^48 (``layout.MAX_SAMPLES``): bits 32..47 of n share counter word 3
with the stream, so every n below 2^32 keeps the numbers it always had. The same numbers as ``triton.language.randn4x`` with the full 128-bit counter used.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ddim_fast import layout

__all__ = [
    "PREDICTIONS",
    "STREAM_X_T",
    "STREAM_STEP",
    "philox4x32",
    "uint32_to_uniform",
    "box_muller",
    "gaussian",
    "check_sample_range",
    "fused_step",
    "GaussianMixtureEps",
]

PREDICTIONS = layout.PREDICTIONS
STREAM_X_T = layout.STREAM_X_T
STREAM_STEP = layout.STREAM_STEP

_MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53  # multiplies counter word 0
PHILOX_ROUND_B = 0xCD9E8D57  # multiplies counter word 2
PHILOX_KEY_A = 0x9E3779B9  # Weyl key increments (golden ratio, sqrt(3) - 1)
PHILOX_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # as in triton.language.random.uint_to_uniform_float
TWO_PI = 6.283185307179586


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32) and a 32-bit constant m.

    Int64 cannot hold the 64-bit product, so m is split in 16-bit halves (each partial < 2^48).
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 values; returns 4 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64) & _MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 in [0, 1], exactly as Triton's uint_to_uniform_float."""
    s = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    s = torch.where(s < 0, -s - 1, s)  # ~s
    return s.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Two float32 uniforms -> two independent standard normals (Triton's pair_uniform_to_normal)."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _split_seed(seed: int):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    return seed & _MASK32, (seed >> 32) & _MASK32


def check_sample_range(sample_offset: int, batch: int, name: str = "batch_offset") -> None:
    """sample_offset .. sample_offset + batch - 1 must be global sample indices in [0, 2**48)."""
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {sample_offset!r}")
    if sample_offset + max(int(batch), 1) > layout.MAX_SAMPLES:
        raise ValueError(
            f"{name}: the last sample index {sample_offset + max(int(batch), 1) - 1} does not fit the noise "
            f"generator's 48-bit sample counter (at most {layout.MAX_SAMPLES - 1})"
        )


def gaussian(
    seed: int,
    shape: Sequence[int],
    *,
    step: int = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device=None,
) -> torch.Tensor:
    """Float32 standard normals of ``shape`` = (B, *sample_shape) under the noise contract.

    Element (b, j) (j the flat index inside one sample) is the noise of global sample
    ``sample_offset + b`` at ``step`` in ``stream``: a pure function of those numbers and the seed.
    """
    k0, k1 = _split_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape: expected at least a batch dimension")
    B = shape[0]
    D = 1
    for s in shape[1:]:
        D *= s
    groups = (D + 3) // 4
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.arange(groups, dtype=torch.int64, device=dev).expand(B, groups)
    check_sample_range(int(sample_offset), B, "sample_offset")
    n = (torch.arange(B, dtype=torch.int64, device=dev) + int(sample_offset))[:, None].expand(B, groups)
    c3 = (n >> 32) * (1 << layout.STREAM_BITS) + int(stream)
    r = philox4x32(g, n, torch.full_like(g, int(step)), c3, k0, k1)
    u = [uint32_to_uniform(w) for w in r]
    z0, z1 = box_muller(u[0], u[1])
    z2, z3 = box_muller(u[2], u[3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(B, groups * 4)[:, :D]
    return z.reshape(shape)


def fused_step(x, model_out, table, step: int, seed, prediction: int, clip: float, history_kind: int, history, saved, noise,
               out, x0_out, flags, compute_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
    """The fused-step contract of ``ddim_fast.layout`` in plain PyTorch (the oracle of every backend).

    Arguments are those of the ``ddim_fast::step`` op (``ddim_fast.ops.step``): ``table`` the
    (S, NUM_COLUMNS) coefficient table and ``step`` its row; ``seed`` an int64 tensor
    ``(seed, sample_offset)``; ``prediction`` 0/1/2 for epsilon/v/x0; ``clip`` > 0 clamps x0;
    ``history_kind`` 0/1: the ring ``history`` (R, *x.shape) keeps x0 or eps; ``saved``: the
    predictor-corrector's state, updated in place; ``noise``: explicit z instead of the Philox
    stream 1 at this step; writes ``out``, ``x0_out`` and ``flags[step]`` when given.
    ``compute_dtype=float64`` makes it the float64 oracle of the tests. It reads the seed on the
    host only when it draws noise (the kernels read it on the device).
    """
    row = table[step].to(compute_dtype)
    sa_t = row[layout.SQRT_ALPHA]
    s1m_t = row[layout.SQRT_ONE_MINUS_ALPHA]
    xf = x.to(compute_dtype)
    m = model_out.to(compute_dtype)
    if prediction == 0:
        eps = m
        x0 = (xf - s1m_t * eps) / sa_t
    elif prediction == 1:
        x0 = sa_t * xf - s1m_t * m
        eps = sa_t * m + s1m_t * xf
    elif prediction == 2:
        x0 = m
        eps = (xf - sa_t * x0) / s1m_t
    else:
        raise ValueError(f"prediction: expected 0 (epsilon), 1 (v) or 2 (x0), got {prediction!r}")
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    zero = torch.zeros((), dtype=compute_dtype, device=x.device)

    def combine(c_x, c_x0, c_eps, c_saved, c_h):
        acc = row[c_x] * xf + row[c_x0] * x0 + row[c_eps] * eps
        if saved is not None:
            acc = acc + torch.where(row[c_saved] != 0, row[c_saved] * saved.to(compute_dtype), zero)
        if history is not None:
            R = history.shape[0]
            for j in range(1, min(layout.HISTORY_TERMS, R) + 1):
                c = row[c_h + j - 1]
                acc = acc + torch.where(c != 0, c * history[(step - j) % R].to(compute_dtype), zero)
        return acc

    x_next = combine(layout.C_X, layout.C_X0, layout.C_EPS, layout.C_SAVED, layout.C_H)
    sigma = row[layout.SIGMA]
    if bool(sigma != 0):
        if noise is not None:
            z = noise.to(compute_dtype)
        else:
            seed_host = seed.tolist()
            z = gaussian(
                int(seed_host[0]), x.shape, step=step, stream=STREAM_STEP, sample_offset=int(seed_host[1]), device=x.device
            ).to(compute_dtype)
        x_next = x_next + sigma * z
    if saved is not None:
        saved.copy_(combine(layout.D_X, layout.D_X0, layout.D_EPS, layout.D_SAVED, layout.D_H))
    if history is not None:
        history[step % history.shape[0]].copy_(eps if history_kind == layout.HISTORY_KINDS["eps"] else x0)
    if flags is not None:
        # Judged in float32, the kernels' arithmetic and the state's storage, whatever compute_dtype is.
        # Judged in float32, the kernels' arithmetic and the state's storage, whatever compute_dtype is;
        # a flag is only ever set, never cleared, as by the kernels.
        bad_model = (~torch.isfinite(model_out.to(torch.float32))).any().to(flags.dtype)
        bad_state = (~torch.isfinite(x_next.to(torch.float32))).any().to(flags.dtype)
        flags[step, layout.FLAG_MODEL] |= bad_model
        flags[step, layout.FLAG_STATE] |= bad_state
    out.copy_(x_next)
    if x0_out is not None:
        x0_out.copy_(x0)


class GaussianMixtureEps(torch.nn.Module):
    """The exact epsilon-prediction model for data from a mixture of isotropic Gaussians.

    If x_0 ~ sum_i w_i N(mu_i, s_i^2 I), then x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps is
    again a mixture, sum_i w_i N(sqrt(alpha_t) mu_i, (alpha_t s_i^2 + 1 - alpha_t) I), and the
    L_simple optimum is eps*(x, t) = -sqrt(1 - alpha_t) * grad log p_t(x) in closed form. A
    sampler driven by it must reproduce the data distribution up to discretisation error only.
    """

    def __init__(self, alphas_cumprod, means, stds, weights=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means: expected shape (K, D), got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n float64 draws of x_0, shape (n, D)."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * z

    def data_moments(self):
        """(mean, covariance) of x_0."""
        w = self.log_weights.exp()
        mean = (w[:, None] * self.means).sum(0)
        D = self.means.shape[1]
        centred = self.means - mean
        cov = (w[:, None, None] * (centred[:, :, None] * centred[:, None, :])).sum(0)
        cov = cov + torch.eye(D, dtype=torch.float64) * (w * self.stds**2).sum()
        return mean, cov

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(shape[0], -1).double()  # (B, D)
        a = self.alphas_cumprod[t.long()][:, None, None]  # (B, 1, 1)
        var = a * self.stds[None, :, None] ** 2 + (1 - a)  # (B, K, 1)
        diff = xf[:, None, :] - a.sqrt() * self.means[None]  # (B, K, D)
        D = xf.shape[1]
        logp = self.log_weights[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * D * torch.log(var[..., 0])
        r = torch.softmax(logp, dim=1)[..., None]  # (B, K, 1) responsibilities
        score = -(r * diff / var).sum(1)  # (B, D)
        eps = -(1 - a[:, 0]).sqrt() * score
        return eps.to(x.dtype).reshape(shape)
