"""Reading diffusers schedulers and pipelines (diffusers itself is never imported here).

Correspondences with ``DDIMScheduler`` (and the DDPM/DPM-Solver schedulers' shared config):

| diffusers                          | ddim_fast                                                     |
|------------------------------------|---------------------------------------------------------------|
| beta_schedule / trained_betas      | NoiseSchedule (linear, scaled_linear, squaredcos_cap_v2, betas) |
| prediction_type epsilon/v_prediction/sample | prediction="epsilon"/"v"/"x0"                        |
| timestep_spacing="leading", steps_offset=0 | skip="uniform" (T % S == 0)                            |
| timestep_spacing="leading", steps_offset=k | skip = [i * (T // S) + k for i in range(S)]           |
| timestep_spacing="trailing"/"linspace"      | skip="trailing"/"linspace"                            |
| clip_sample=True, clip_sample_range=r       | clip_x0=r                                             |
| set_alpha_to_one=True                       | always: the last step lands on alpha = 1 (paper's alpha_0 := 1) |

Deliberate differences: diffusers takes the previous timestep as ``t - T // S`` (a stride),
we take it from tau itself, so non-uniform spacings get the right alpha_prev; with
``set_alpha_to_one=False`` diffusers' last step lands on alpha[0] instead of 1 (a difference of
one noise level of ~1e-4 in the linear schedule), and we keep the paper's alpha_0 := 1.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["schedule_from_diffusers", "sampler_options_from_diffusers", "config_of"]

_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def config_of(scheduler_or_config) -> Dict[str, Any]:
    """A plain dict of a diffusers scheduler's config (a scheduler, its .config, or a dict)."""
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    try:
        return dict(cfg)
    except (TypeError, ValueError):
        raise TypeError(
            f"scheduler_or_config: expected a diffusers scheduler or its config dict, got {type(scheduler_or_config).__name__}"
        ) from None


def schedule_from_diffusers(cls, scheduler_or_config):
    cfg = config_of(scheduler_or_config)
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler_or_config: rescale_betas_zero_snr=True makes alpha_T = 0, where epsilon models cannot predict x0; "
            "not supported"
        )
    trained = cfg.get("trained_betas")
    if trained is not None:
        return cls.from_betas(np.asarray(trained, dtype=np.float64))
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    # Built in float32 first, as diffusers does, so alphas agree to float32 rounding.
    if kind == "linear":
        betas = np.linspace(start, end, T, dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        return cls.cosine(T)
    else:
        raise ValueError(
            f"scheduler_or_config: beta_schedule={kind!r} is not supported "
            '(expected "linear", "scaled_linear", "squaredcos_cap_v2" or trained_betas)'
        )
    schedule = cls.from_betas(betas.astype(np.float64))
    schedule.name = kind
    return schedule


def sampler_options_from_diffusers(scheduler_or_config, steps: int) -> Dict[str, Any]:
    """FusedSampler keyword arguments that reproduce a diffusers DDIM-style configuration."""
    cfg = config_of(scheduler_or_config)
    T = int(cfg.get("num_train_timesteps", 1000))
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"scheduler_or_config: prediction_type={prediction_type!r} is not supported")
    if cfg.get("thresholding", False):
        raise ValueError("scheduler_or_config: dynamic thresholding is not supported; use clip_x0")
    spacing = cfg.get("timestep_spacing", "leading")
    offset = int(cfg.get("steps_offset", 0))
    if spacing == "leading":
        if not 1 <= steps <= T:
            raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
        skip = "uniform" if offset == 0 and T % steps == 0 else [i * (T // steps) + offset for i in range(steps)]
    elif spacing in ("trailing", "linspace"):
        skip = spacing
    else:
        raise ValueError(f"scheduler_or_config: timestep_spacing={spacing!r} is not supported")
    options: Dict[str, Any] = {"steps": steps, "skip": skip, "prediction": _PREDICTIONS[prediction_type]}
    if cfg.get("clip_sample", False):
        options["clip_x0"] = float(cfg.get("clip_sample_range", 1.0))
    return options
