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

``UniPCMultistepScheduler`` (predict_x0=True, solver_type="bh2", lower_order_final=True, no
disabled corrector, final_sigmas_type="zero", no Karras/exponential/beta/flow sigmas) maps to
``solver="unipc"`` (solver_order=2) or ``"unipc_3"`` (3) on the same timesteps as DPM-Solver.

``DPMSolverMultistepScheduler`` (algorithm_type="dpmsolver++", solver_type="midpoint",
final_sigmas_type="zero", no Karras/exponential/beta/Lu/flow sigmas) maps to
``solver="dpmpp_2m"`` (solver_order=2), ``"dpmpp_3m"`` (3) or ``"ddim"`` (1, the same update),
with its own timesteps for linspace/leading/trailing (computed here as diffusers does, passed as
an explicit tau) and its lower-order warm-up and final steps; other DPM-Solver variants are
refused with the option that differs.

``default_eta``: what a scheduler's own ``step`` does when no eta is passed: DDPMScheduler's
variance_type "fixed_small"/"fixed_small_log" is eta = 1 (the posterior variance), "fixed_large"
is the paper's sigma-hat (``eta="ddpm_large"``); everything else is eta = 0.

Schedule-only configs (``schedule_only=True``, what ``FusedScheduler.from_config`` accepts for
the diffusers-style sampler swap): PNDM, Euler, Euler-ancestral, LMS and Heun configs give their
betas, T, prediction type and DDIM-rule timesteps (spacing, offset), sampled by our solver
(default DDIM); their own update is not reproduced.

Deliberate differences: diffusers takes the previous timestep as ``t - T // S`` (a stride),
we take it from tau itself, so non-uniform spacings get the right alpha_prev; with
``set_alpha_to_one=False`` diffusers' last step lands on alpha[0] instead of 1 (a difference of
one noise level of ~1e-4 in the linear schedule), and we keep the paper's alpha_0 := 1.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = [
    "schedule_from_diffusers",
    "sampler_options_from_diffusers",
    "config_of",
    "scheduler_kind",
    "default_eta",
    "EXACT_KINDS",
    "SCHEDULE_ONLY_KINDS",
]

_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
_DDIM_LIKE = ("DDIMScheduler", "DDPMScheduler")
_DPM_MULTISTEP = "DPMSolverMultistepScheduler"
_UNIPC = "UniPCMultistepScheduler"
EXACT_KINDS = (*_DDIM_LIKE, _DPM_MULTISTEP, _UNIPC)  # whose loops we reproduce
# Configs that only lend their noise schedule and timestep spacing to our solvers.
SCHEDULE_ONLY_KINDS = ("PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                       "HeunDiscreteScheduler")
# A bare config dict's class, from a key that only that class's config has (first match wins).
_KEYS_OF_KINDS = (("algorithm_type", _DPM_MULTISTEP), ("predict_x0", _UNIPC), ("variance_type", "DDPMScheduler"),
                  ("skip_prk_steps", "PNDMScheduler"), ("interpolation_type", "EulerDiscreteScheduler"))
# DPMSolverMultistepScheduler options that select sigma spacings or updates we do not implement.
_DPM_UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                          "use_flow_sigmas", "use_dynamic_shifting")
# Options (of any supported class) that replace the timesteps or sigmas: refused when set.
_SIGMA_OPTIONS = ("sigma_min", "sigma_max", "shift_terminal")


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


def scheduler_kind(scheduler_or_config, schedule_only: bool = False) -> str:
    """The diffusers scheduler class a scheduler or config stands for.

    A scheduler object gives its class name, a saved config its ``_class_name``; a bare config
    dict is recognised by a key of its class (``_KEYS_OF_KINDS``; none: DDIM). ``schedule_only`` also accepts ``SCHEDULE_ONLY_KINDS``.
    """
    cfg = config_of(scheduler_or_config)
    name = cfg.get("_class_name")
    if name is None and hasattr(scheduler_or_config, "config"):
        name = type(scheduler_or_config).__name__
    if name is None:  # a live scheduler's .config has no _class_name: a key only that class has
        name = next((kind for key, kind in _KEYS_OF_KINDS if key in cfg), "DDIMScheduler")
    if name in EXACT_KINDS or (schedule_only and name in SCHEDULE_ONLY_KINDS):
        return name
    others = f", or the schedule of {', '.join(SCHEDULE_ONLY_KINDS)}" if schedule_only else ""
    raise ValueError(
        f"scheduler_or_config: {name} is not supported (expected DDIMScheduler, DDPMScheduler, {_DPM_MULTISTEP} or "
        f"{_UNIPC}{others}; the other schedulers' updates are not Eq. 12, DPM-Solver++ or UniPC multistep)"
    )


def default_eta(scheduler_or_config):
    """The eta of a scheduler's own ``step`` when none is passed (module docstring)."""
    cfg = config_of(scheduler_or_config)
    if scheduler_kind(scheduler_or_config, schedule_only=True) != "DDPMScheduler":
        return 0.0
    variance = cfg.get("variance_type", "fixed_small")
    if variance in ("fixed_small", "fixed_small_log"):
        return 1.0
    if variance == "fixed_large":
        return "ddpm_large"
    raise ValueError(
        f"scheduler_or_config: variance_type={variance!r} is not supported (expected 'fixed_small', 'fixed_small_log' or "
        "'fixed_large'; a learned variance needs the model's variance output)"
    )


def _common_options(cfg: Dict[str, Any]) -> Dict[str, Any]:
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"scheduler_or_config: prediction_type={prediction_type!r} is not supported")
    if cfg.get("thresholding", False):
        raise ValueError("scheduler_or_config: dynamic thresholding is not supported; use clip_x0")
    for key in _SIGMA_OPTIONS:
        if cfg.get(key) is not None:
            raise ValueError(f"scheduler_or_config: {key}={cfg[key]!r} is not supported (expected None)")
    return {"prediction": _PREDICTIONS[prediction_type]}


def sampler_options_from_diffusers(scheduler_or_config, steps: int, alphas_cumprod=None, schedule_only: bool = False) -> Dict[str, Any]:
    """FusedSampler keyword arguments that reproduce a diffusers scheduler's sampling loop.

    DDIM/DDPM configurations give DDIM options; a ``DPMSolverMultistepScheduler`` or
    ``UniPCMultistepScheduler`` gives the multistep solver of its order on its own timesteps.
    ``alphas_cumprod`` (float64, T) is needed only for a DPM-Solver config with a finite
    ``lambda_min_clipped``. ``schedule_only`` accepts ``SCHEDULE_ONLY_KINDS`` too (DDIM options).
    """
    kind = scheduler_kind(scheduler_or_config, schedule_only)
    if kind == _DPM_MULTISTEP:
        return _dpm_solver_options(config_of(scheduler_or_config), steps, alphas_cumprod)
    if kind == _UNIPC:
        return _unipc_options(config_of(scheduler_or_config), steps)
    cfg = config_of(scheduler_or_config)
    if kind in SCHEDULE_ONLY_KINDS:
        _check_schedule_only(kind, cfg)
    T = int(cfg.get("num_train_timesteps", 1000))
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
    options: Dict[str, Any] = {"steps": steps, "skip": skip, **_common_options(cfg)}
    if cfg.get("clip_sample", False):
        options["clip_x0"] = float(cfg.get("clip_sample_range", 1.0))
    return options


def _dpm_solver_options(cfg: Dict[str, Any], steps: int, alphas_cumprod) -> Dict[str, Any]:
    """DPMSolverMultistepScheduler -> solver, explicit tau, prediction (see the module docstring)."""
    options = _common_options(cfg)
    expected = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero",
                "variance_type": None}
    for key, want in expected.items():
        got = cfg.get(key, want)
        if got != want:
            raise ValueError(f"scheduler_or_config: {key}={got!r} is not supported (expected {want!r})")
    for key in _DPM_UNSUPPORTED_FLAGS:
        if cfg.get(key, False):
            hint = ' (skip="logsnr" spaces tau uniformly in log-SNR)' if key == "use_lu_lambdas" else ""
            raise ValueError(f"scheduler_or_config: {key}=True is not supported{hint}")
    order = int(cfg.get("solver_order", 2))
    if order not in (1, 2, 3):
        raise ValueError(f"scheduler_or_config: solver_order={order} is not supported (expected 1, 2 or 3)")
    T = int(cfg.get("num_train_timesteps", 1000))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")
    if order == 3 and steps < 15 and not cfg.get("lower_order_final", True):
        # diffusers then keeps third order on the second-to-last step; ours is second order there.
        raise ValueError("scheduler_or_config: lower_order_final=False with solver_order=3 and steps < 15 is not supported")
    tau = _dpm_solver_timesteps(cfg, steps, T, alphas_cumprod)
    if np.unique(tau).size != tau.size:
        raise ValueError(
            f"steps: {steps} steps with timestep_spacing={cfg.get('timestep_spacing', 'linspace')!r} repeat a timestep "
            f"({tau[::-1].tolist()}); choose fewer steps or another spacing"
        )
    solver = {1: "ddim", 2: "dpmpp_2m", 3: "dpmpp_3m"}[order]
    return {"steps": steps, "skip": np.sort(tau).tolist(), "solver": solver, **options}


def _check_steps(steps, T: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an integer in [1, T={T}], got {steps!r}")


def _check_flags(cfg: Dict[str, Any], keys, hint: str = "") -> None:
    for key in keys:
        if cfg.get(key, False):
            raise ValueError(f"scheduler_or_config: {key}=True is not supported{hint}")


def _check_schedule_only(kind: str, cfg: Dict[str, Any]) -> None:
    """A schedule-only config whose spacing our timestep rule cannot follow is refused by name."""
    _check_flags(cfg, ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"),
                 ' (pass skip="karras" or "logsnr" to space the timesteps)')
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"scheduler_or_config: timestep_type={cfg['timestep_type']!r} is not supported (expected 'discrete')")


def _unipc_options(cfg: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """UniPCMultistepScheduler -> solver, explicit tau, prediction (see the module docstring)."""
    options = _common_options(cfg)
    expected = {"predict_x0": True, "solver_type": "bh2", "lower_order_final": True, "final_sigmas_type": "zero",
                "solver_p": None}
    for key, want in expected.items():
        got = cfg.get(key, want)
        if got != want:
            raise ValueError(f"scheduler_or_config: {key}={got!r} is not supported (expected {want!r})")
    if list(cfg.get("disable_corrector", []) or []):
        raise ValueError(f"scheduler_or_config: disable_corrector={cfg['disable_corrector']!r} is not supported (expected [])")
    _check_flags(cfg, _DPM_UNSUPPORTED_FLAGS)
    order = int(cfg.get("solver_order", 2))
    if order not in (2, 3):
        raise ValueError(f"scheduler_or_config: solver_order={order} is not supported (expected 2 or 3)")
    T = int(cfg.get("num_train_timesteps", 1000))
    _check_steps(steps, T)
    tau = _dpm_solver_timesteps({"timestep_spacing": "linspace", **cfg, "lambda_min_clipped": -float("inf")}, int(steps), T, None)
    if np.unique(tau).size != tau.size:
        raise ValueError(f"steps: {steps} steps repeat a timestep ({tau.tolist()}); choose fewer steps or another spacing")
    return {"steps": int(steps), "skip": np.sort(tau).tolist(), "solver": {2: "unipc", 3: "unipc_3"}[order], **options}


def _dpm_solver_timesteps(cfg: Dict[str, Any], steps: int, T: int, alphas_cumprod) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps without Karras & co: descending int64 timesteps."""
    last = T
    lambda_min = float(cfg.get("lambda_min_clipped", -float("inf")))
    if lambda_min > -float("inf"):  # drop the final timesteps whose log-SNR is below the clip
        if alphas_cumprod is None:
            raise ValueError("alphas_cumprod: needed for a finite lambda_min_clipped")
        from ddim_fast.solvers import half_log_snr

        lam = half_log_snr(np.asarray(alphas_cumprod, dtype=np.float64)).numpy()
        last = T - int(np.searchsorted(lam[::-1], lambda_min))
    spacing = cfg.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        tau = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        tau = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + int(cfg.get("steps_offset", 0))
    elif spacing == "trailing":
        tau = np.arange(last, 0, -T / steps).round() - 1
    else:
        raise ValueError(f"scheduler_or_config: timestep_spacing={spacing!r} is not supported")
    return tau.astype(np.int64)
