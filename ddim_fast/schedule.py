"""Noise schedules, trajectory (tau) selection and sigma(eta); the solvers' tables are in ``solvers``.

Everything here is computed once per sampler, on the host, in float64 (the paper's alphas are
products of up to 1000 factors: float32 loses ~1e-5 relative by the end of a linear schedule).
The tables that the fused step reads (``ddim_fast.solvers``) are stored as float32 on the device.

Notation follows the DDIM paper (Song, Meng & Ermon, 2021): ``alpha_t`` is the *cumulative*
product (the DDPM paper's alpha-bar), ``tau`` is the increasing sub-sequence of training
timesteps that is sampled, and ``alpha_prev`` is the alpha of the next timestep visited by the
sampler (alpha_0 := 1 past the end of tau, so the last step returns the x0-prediction).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

__all__ = [
    "NoiseSchedule",
    "select_timesteps",
    "sigmas_for_eta",
    "SKIP_TYPES",
]

SKIP_TYPES = ("uniform", "quad", "trailing", "linspace")

EtaLike = Union[float, int, str]


class NoiseSchedule:
    """A discrete forward process q(x_t | x_0) = N(sqrt(alpha_t) x_0, (1 - alpha_t) I), t in [0, T)."""

    def __init__(self, betas, *, name: str = "custom"):
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64) if not torch.is_tensor(betas) else betas)
        betas = betas.detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas: expected every beta in the open interval (0, 1)")
        self.name = name
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM (Ho et al., 2020) and DDIM paper default: betas linear in [beta_start, beta_end]."""
        _check_T(T)
        return cls(np.linspace(beta_start, beta_end, T, dtype=np.float64), name="linear")

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        """Latent-diffusion schedule: sqrt(beta) linear (diffusers' "scaled_linear")."""
        _check_T(T)
        return cls(np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2, name="scaled_linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Improved DDPM (Nichol & Dhariwal, 2021), Eq. 17: alpha(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
        _check_T(T)

        def alpha_bar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls(np.asarray(betas, dtype=np.float64), name="cosine")

    @classmethod
    def from_betas(cls, betas) -> "NoiseSchedule":
        """Any 1-D tensor or array of betas in (0, 1)."""
        return cls(betas, name="custom")

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "NoiseSchedule":
        """A schedule given by its alpha_t (decreasing, in (0, 1])."""
        a = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        return cls(1.0 - a / prev, name="custom")

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "NoiseSchedule":
        """The betas of a diffusers scheduler (or its config): DDPM/DDIM/DPMSolver schedulers."""
        from ddim_fast.compat import schedule_from_diffusers

        return schedule_from_diffusers(cls, scheduler_or_config)

    # -- properties -----------------------------------------------------------------------
    @property
    def T(self) -> int:
        return int(self.betas.numel())

    def __len__(self) -> int:
        return self.T

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name}, T={self.T}, alpha_T={self.alphas_cumprod[-1].item():.3g})"

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(alpha_t) x0 + sqrt(1 - alpha_t) noise, with t an int64 tensor (B,)."""
        a = self.alphas_cumprod.to(x0.device)[t].to(torch.float32)
        a = a.reshape(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _check_T(T) -> None:
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T: expected a positive integer number of training timesteps, got {T!r}")


def select_timesteps(T: int, steps: int, skip: Union[str, Sequence[int]] = "uniform") -> np.ndarray:
    """The increasing sub-sequence tau of [0, T) that the sampler visits (int64, no duplicates).

    - "uniform": the original DDIM code's ``range(0, T, T // S)`` (exactly S steps when
      T % S == 0; when it is not, ``range`` yields a few more, as the original code does);
    - "quad": the original code's ``int(linspace(0, sqrt(0.8 T), S) ** 2)`` with duplicates
      removed (so fewer than S steps can run at large S);
    - "trailing" and "linspace": diffusers' ``timestep_spacing`` of the same names;
    - an explicit strictly increasing sequence of timesteps in [0, T).
    """
    _check_T(T)
    if isinstance(skip, str):
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1 or steps > T:
            raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
        S = int(steps)
        if skip == "uniform":
            tau = np.arange(0, T, T // S, dtype=np.int64)
        elif skip == "quad":
            tau = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)
        elif skip == "trailing":
            tau = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
        elif skip == "linspace":
            tau = np.linspace(0, T - 1, S).round().astype(np.int64)
        elif skip == "logsnr":
            raise ValueError('skip: "logsnr" needs the schedule; use ddim_fast.solvers.logsnr_timesteps(schedule, steps)')
        else:
            raise ValueError(f"skip: expected one of {SKIP_TYPES} or a sequence of timesteps, got {skip!r}")
        return np.unique(tau)
    try:
        tau = np.asarray(skip)
    except Exception as e:  # pragma: no cover - exotic objects
        raise ValueError(f"skip: expected a name or a sequence of integers, got {type(skip).__name__}") from e
    if tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer):
        raise ValueError(f"skip: an explicit tau must be a non-empty 1-D sequence of integers, got {skip!r}")
    tau = tau.astype(np.int64)
    if (np.diff(tau) <= 0).any():
        raise ValueError(f"skip: an explicit tau must be strictly increasing, got {tau.tolist()}")
    if tau[0] < 0 or tau[-1] >= T:
        raise ValueError(f"skip: every timestep must lie in [0, T={T}), got {tau[0]}..{tau[-1]}")
    return tau


def _check_eta(eta: EtaLike) -> None:
    if isinstance(eta, str):
        if eta != "ddpm_large":
            raise ValueError(f'eta: expected a float >= 0 or "ddpm_large", got {eta!r}')
        return
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
        raise ValueError(f'eta: expected a float >= 0 or "ddpm_large", got {eta!r}')
    if not math.isfinite(float(eta)) or float(eta) < 0:
        raise ValueError(f"eta: expected a finite float >= 0 (0 = DDIM, 1 = DDPM), got {eta!r}")


def sigmas_for_eta(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: EtaLike):
    """(sigma for the direction term, sigma of the noise), both float64.

    Eq. 16: sigma(eta) = eta * sqrt((1 - alpha_prev) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_prev).
    "ddpm_large" is the paper's sigma-hat = sqrt(1 - alpha_t / alpha_prev) (Ho et al.'s larger
    variance): its mean is the DDPM posterior mean (eta = 1) and only the noise is larger,
    exactly as the original code's ``ddpm_steps``; so the two sigmas differ for it.
    """
    _check_eta(eta)
    ratio = (1.0 - alpha_t / alpha_prev).clamp_min(0.0)
    sigma_ddpm = torch.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t) * ratio)
    if eta == "ddpm_large":
        return sigma_ddpm, torch.sqrt(ratio)
    s = float(eta) * sigma_ddpm
    return s, s
