"""FusedScheduler: the fused step as a diffusers scheduler, for any diffusers pipeline.

    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config)            # the same sampler, fused
    pipe.scheduler = FusedScheduler.from_config(pipe.scheduler.config, solver="unipc", skip="logsnr")

What it is: a diffusers ``SchedulerMixin`` + ``ConfigMixin`` whose ``step`` is one call of the
``ddim_fast::step`` op (``ddim_fast.ops``) on a row of a solver's coefficient table
(``ddim_fast.solvers``), computed in float64 on the host at ``set_timesteps`` and kept as float32
on the sampling device. The row is chosen by the scheduler's own step counter, so ``step`` does
no ``.item()``, no ``nonzero()`` and no host arithmetic on device values: a denoising loop
compiles with ``torch.compile(fullgraph=True)`` and captures in a CUDA graph. The multistep
history (the ring) and the predictor-corrector state live in device buffers the scheduler owns,
allocated at the first step of each trajectory; the state is float32 whatever the pipeline's
dtype (an fp16 ``sample`` we returned is replaced by our float32 copy, ``prev_sample`` comes
back in the sample's dtype).

Configs (``from_config``): ``DDIMScheduler``, ``DDPMScheduler``, ``DPMSolverMultistepScheduler``
and ``UniPCMultistepScheduler`` configs are mapped exactly as ``ddim_fast.compat`` maps them
(betas, T, prediction type, spacing, offset, clipping; unsupported settings refused by name),
and reproduce those schedulers' loops. PNDM, Euler, LMS and Heun configs (Stable Diffusion's
defaults) lend their noise schedule and spacing only, sampled by ``solver`` (default DDIM), as
diffusers' own ``X.from_config(other.config)`` swaps do. ``solver=`` picks any ddim_fast solver,
``skip=`` any spacing of ``solvers.timesteps``, an explicit increasing sequence, or a tuned
timestep file (``skip="steps.json"``, read by ``ddim_fast.tune.load_tuned`` and stored in the
config as the timesteps themselves, so ``save_pretrained`` keeps them). A file tuned with
``shift_last`` also stores ``model_timesteps``: ``timesteps``, which a pipeline calls its UNet
with, then carry them (the last one shifted), while the coefficients stay the solver's.

eta: ``from_config(eta=x)`` fixes it (pipelines pass ``eta=0.0`` by default, which would otherwise
undo it); with ``eta=None`` the ``step(eta=...)`` argument decides, and without one the source
scheduler's own default (DDPM: 1, or sigma-hat for ``variance_type="fixed_large"``; else 0).
With clipping, DDPM configs and ``use_clipped_model_output=True`` re-derive eps from the
clipped x0 as diffusers does (a rewrite of the table's rows, same op).

Noise: Philox (``ddim_fast.reference.gaussian``) keyed by (seed, sample index, step, element).
The seed is one 63-bit draw, ``torch.randint(2**63 - 1, (1,), generator=g)``, from the
pipeline's ``generator`` at the first step that adds noise (a list of generators: the first;
none: torch's default generator, so ``torch.manual_seed`` fixes it too); on a CUDA generator the
draw stays on the device. So a seeded generator gives the same images on every run and backend,
but the noise values are not the ``torch.randn`` values diffusers' schedulers draw from it: to
match those, pass ``variance_noise=`` per step (as DDIMScheduler takes it) or the whole
trajectory's noise with ``set_noise``. Inside ``torch.compile`` or a CUDA-graph capture the draw
cannot happen; call ``set_timesteps(..., generator=g)`` before the loop.

Deliberate differences (``ddim_fast.compat``): the previous timestep comes from the schedule
itself, never from a stride; ``set_alpha_to_one=False`` still lands the last step on alpha = 1 (the
paper's alpha_0 := 1: the output is the last step's x0-prediction); ``order`` is 1 for every solver
(one model call per step). ``timestep`` is checked against the schedule without a sync when it is
an element of ``scheduler.timesteps`` (as in every pipeline loop), a Python number, or a CPU
tensor; a device tensor from elsewhere costs one sync (skipped under compile and capture).

diffusers is imported when ``FusedScheduler`` is first used (module ``__getattr__``), never by
``import ddim_fast``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ddim_fast import compat, layout, ops, solvers
from ddim_fast.schedule import SKIP_TYPES, NoiseSchedule, _check_eta, select_timesteps

__all__ = ["FusedScheduler", "FusedSchedulerOutput"]

# The source scheduler's config fields our config keeps (every other field is checked at
# from_config and must have the value we support, so dropping it loses nothing).
_SOURCE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one", "variance_type",
                "solver_order", "lower_order_final", "lambda_min_clipped")
_OURS = ("source_scheduler", "solver", "skip", "eta", "backend", "model_timesteps")
_SEED_HIGH = 2**63 - 1


def __getattr__(name):
    if name in __all__:
        value = _classes()[name]
    elif name in ("SchedulerMixin", "ConfigMixin"):
        # A pipeline's model_index.json names this module for our scheduler, and diffusers' loader
        # looks up the loadable base classes in that module: DiffusionPipeline.from_pretrained works.
        from diffusers import ConfigMixin, SchedulerMixin

        value = {"SchedulerMixin": SchedulerMixin, "ConfigMixin": ConfigMixin}[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


@functools.lru_cache(maxsize=None)
def _classes() -> Dict[str, type]:
    """FusedScheduler and its output class on diffusers' base classes (imported here, once)."""
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.schedulers.scheduling_utils import SchedulerMixin
        from diffusers.utils import BaseOutput
    except ImportError as e:
        raise ImportError(f"FusedScheduler needs diffusers (pip install 'ddim_fast[diffusers]'): {e}") from e

    output = dataclasses.dataclass(type("FusedSchedulerOutput", (BaseOutput,), {
        "__module__": __name__,
        "__doc__": "prev_sample: x at the next timestep (the sample's dtype); pred_original_sample: the x0-prediction.",
        "__annotations__": {"prev_sample": torch.Tensor, "pred_original_sample": Optional[torch.Tensor]},
        "pred_original_sample": None,
    }))
    scheduler = type("FusedScheduler", (_FusedSchedulerImpl, SchedulerMixin, ConfigMixin), {
        "__module__": __name__,
        "__doc__": _FusedSchedulerImpl.__doc__,
        "__init__": register_to_config(_FusedSchedulerImpl.__init__),
        "config_name": "scheduler_config.json",
        "_output_class": output,
    })
    return {"FusedScheduler": scheduler, "FusedSchedulerOutput": output}


@functools.lru_cache(maxsize=None)
def _class_defaults(kind: str) -> Dict[str, Any]:
    """The __init__ defaults of a diffusers scheduler class: what a config that omits a key means."""
    import diffusers

    cls = getattr(diffusers, kind, None)
    if cls is None:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _source_solver(source: Dict[str, Any]) -> str:
    return compat.sampler_options_from_diffusers(source, 1, None, schedule_only=True).get("solver", "ddim")


def _resolve_skip(skip, schedule: NoiseSchedule, solver: str):
    """(skip as stored in the config: None, a spacing name, or a list of increasing timesteps; the
    model's timesteps of a tuned file that has them (``tune_timesteps(shift_last=True)``), else None)."""
    if skip is None:
        return None, None
    model_tau = None
    if isinstance(skip, (str, os.PathLike)) and (str(skip).endswith(".json") or os.path.isfile(skip)):
        from ddim_fast import tune

        skip, model_tau = tune.load_tuned(os.fspath(skip), schedule=schedule, solver=solver, with_model_timesteps=True)
        model_tau = None if np.array_equal(skip, model_tau) else model_tau.tolist()
    if isinstance(skip, str):
        names = (*SKIP_TYPES, *solvers.SCHEDULE_SKIPS)
        if skip not in names:
            raise ValueError(f"skip: expected one of {names}, a sequence of timesteps or a tuned-timesteps .json file, got {skip!r}")
        return skip, None
    tau = np.asarray(skip.cpu() if torch.is_tensor(skip) else skip)
    return select_timesteps(schedule.T, int(tau.size), tau).tolist(), model_tau


def _check_model_timesteps(model_timesteps, skip, T: int):
    """``model_timesteps`` (paired with the increasing ``skip`` list) as a list, or None. The pipeline
    calls its UNet at ``timesteps`` and ``step`` finds the step by value, so they must be distinct."""
    if model_timesteps is None:
        return None
    if isinstance(skip, str) or skip is None:
        raise ValueError("model_timesteps: they pair with explicit timesteps; give skip as a sequence or a tuned .json file")
    told = solvers.model_timesteps(model_timesteps, skip, T)
    if len(set(told.tolist())) != len(told):
        raise ValueError(f"model_timesteps: expected distinct timesteps (step() finds its step by the timestep), got {told.tolist()}")
    return [int(t) for t in told]


def _fused_config(config, solver=None, skip=None, eta=None) -> Dict[str, Any]:
    """Our config dict from a diffusers scheduler, its config (dict or FrozenDict), or ours."""
    cfg = compat.config_of(config)
    kind = cfg.get("_class_name") or (type(config).__name__ if hasattr(config, "config") else None)
    if kind == "FusedScheduler" or (kind is None and "source_scheduler" in cfg):
        ours = {k: cfg[k] for k in (*_SOURCE_KEYS, *_OURS) if k in cfg}
    else:
        named = kind is not None
        kind = compat.scheduler_kind(config, schedule_only=True)
        defaults = _class_defaults(kind)
        foreign = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
        if not named and foreign:  # a bare dict whose class was guessed from its keys, wrongly
            raise ValueError(
                f"config: the fields {foreign} are not {kind}'s; this is another scheduler's config (pass the scheduler "
                "itself, or its config with '_class_name')"
            )
        source = {**defaults, **cfg, "_class_name": kind}
        _validate_source(source)
        ours = {k: source[k] for k in _SOURCE_KEYS if k in source}
        ours["source_scheduler"] = kind
    if ours.get("trained_betas") is not None:
        ours["trained_betas"] = np.asarray(ours["trained_betas"], dtype=np.float64).tolist()
    for key, value in (("solver", solver), ("eta", eta)):
        if value is not None:
            ours[key] = value
    if skip is not None:
        schedule = NoiseSchedule.from_diffusers({**ours, "_class_name": ours.get("source_scheduler", "DDIMScheduler")})
        ours["skip"], ours["model_timesteps"] = _resolve_skip(skip, schedule, ours.get("solver") or _source_solver(_source_of(ours)))
    return {**ours, "_class_name": "FusedScheduler"}


def _source_of(config) -> Dict[str, Any]:
    """The source scheduler's config as compat reads it, from our config."""
    kind = config.get("source_scheduler", "DDIMScheduler")
    return {**_class_defaults(kind), **{k: config[k] for k in _SOURCE_KEYS if k in config}, "_class_name": kind}


def _validate_source(source: Dict[str, Any]) -> None:
    """Every check of ddim_fast.compat on a source config (one probe of its options)."""
    compat.scheduler_kind(source, schedule_only=True)
    NoiseSchedule.from_diffusers(source)
    compat.sampler_options_from_diffusers(source, 1, NoiseSchedule.from_diffusers(source).alphas_cumprod.numpy(), schedule_only=True)
    compat.default_eta(source)


def _eps_from_clipped_x0(st: solvers.SolverTable) -> solvers.SolverTable:
    """The same rows with eps re-derived from the (clipped) x0, eps = (x_t - sqrt_alpha x0) / sqrt_1m_alpha:
    diffusers' use_clipped_model_output=True and DDPMScheduler's clipping. Equal rows without clipping."""
    t = st.table.clone()
    sa, s1m = t[:, layout.SQRT_ALPHA], t[:, layout.SQRT_ONE_MINUS_ALPHA]
    for c_x, c_x0, c_eps in ((layout.C_X, layout.C_X0, layout.C_EPS), (layout.D_X, layout.D_X0, layout.D_EPS)):
        w = torch.where(s1m > 0, t[:, c_eps] / s1m, torch.zeros_like(s1m))
        t[:, c_x] += w
        t[:, c_x0] -= w * sa
        t[:, c_eps] = torch.where(s1m > 0, torch.zeros_like(s1m), t[:, c_eps])
    return solvers.SolverTable(t, st.history_kind)


@dataclasses.dataclass(frozen=True)
class _Table:
    """A trajectory's table on the device, with what the step reads of it on the host (computed
    once here: under torch.compile nothing in ``step`` may look at the table's values)."""

    table: torch.Tensor  # (S, NUM_COLUMNS) float32 on the sampling device
    history_kind: int
    history_slots: int
    uses_saved: bool
    stochastic: tuple  # per row: sigma != 0

    @classmethod
    def of(cls, st: solvers.SolverTable, device) -> "_Table":
        return cls(st.table.to(torch.float32).to(device).contiguous(), st.history_kind, st.history_slots, st.uses_saved,
                   st.stochastic)


@dataclasses.dataclass
class _Plan:
    """One set_timesteps: what every step of the trajectory reads."""

    tau_desc: tuple  # host ints, first step first: the solver's timesteps
    model_desc: tuple  # what the UNet is told at each step (``timesteps``): tau_desc unless model_timesteps
    solver: str
    prediction: int
    clip: float
    rederive: bool  # the source re-derives eps from the clipped x0 (DDPM)
    device: torch.device
    backend: str  # concrete: ops.resolve_backend for the device


class _FusedSchedulerImpl:
    """A diffusers scheduler running ddim_fast's fused step (module docstring of ``ddim_fast.scheduler``).

    Build it with ``FusedScheduler.from_config(any_supported_config, solver=None, skip=None, eta=None)``;
    the constructor takes diffusers' field names (DDIMScheduler defaults) plus ``source_scheduler``
    (the class whose loop and timestep rule are followed), ``solver``, ``skip``, ``eta`` and
    ``backend`` ("auto", "torch", "triton", "cpp": ``ddim_fast.ops.resolve_backend``).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[List[float]] = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        variance_type: Optional[str] = None,
        solver_order: int = 2,
        lower_order_final: bool = True,
        lambda_min_clipped: float = -float("inf"),
        source_scheduler: str = "DDIMScheduler",
        solver: Optional[str] = None,
        skip: Union[None, str, List[int]] = None,
        eta: Union[None, float, str] = None,
        backend: str = "auto",
        model_timesteps: Optional[List[int]] = None,
    ):
        source = _source_of(dict(self.config))
        _validate_source(source)
        if solver is not None and solver not in solvers.BUILDERS:
            raise ValueError(f"solver: expected one of {tuple(solvers.BUILDERS)}, got {solver!r}")
        if eta is not None:
            _check_eta(eta)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.schedule = NoiseSchedule.from_diffusers(source)
        self._skip, from_file = _resolve_skip(skip, self.schedule, solver or _source_solver(source))
        if from_file is not None and model_timesteps is not None and list(model_timesteps) != from_file:
            raise ValueError("model_timesteps: given, and different from those of the tuned file passed as skip")
        self._model_tau = _check_model_timesteps(from_file if from_file is not None else model_timesteps, self._skip,
                                                 self.schedule.T)
        self._source = source
        self._fixed_eta = eta
        self._default_eta = compat.default_eta(source) if eta is None else eta
        # diffusers' float32 copies, for code that reads them (training scripts, some pipelines).
        self.betas = self.schedule.betas.to(torch.float32)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self._plan: Optional[_Plan] = None
        self._noise_tables: Dict[Any, torch.Tensor] = {}
        self._pending_noise: Optional[torch.Tensor] = None
        self._reset()

    # -- diffusers' constructors -----------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, solver=None, skip=None, eta=None, **kwargs):
        """A FusedScheduler from a DDIM/DDPM/DPM-Solver/UniPC (or PNDM/Euler/LMS/Heun) scheduler or config.

        solver: any of ``ddim_fast.solvers.BUILDERS`` (default: the source's own update, DDIM for the
        schedule-only classes); skip: a spacing name, an increasing sequence of timesteps, or a
        tuned-timesteps .json file; eta: fixes eta (None: the step's ``eta=`` or the source's default).
        Other keyword arguments override config fields, as in diffusers.
        """
        if config is None:
            config = kwargs.pop("pretrained_model_name_or_path", None)
        if config is None:
            raise ValueError("config: expected a diffusers scheduler config (dict or FrozenDict) or a scheduler")
        return super().from_config(_fused_config(config, solver, skip, eta), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # -- set_timesteps ---------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._row0 = 0  # the table's row 0 is this step (set_begin_index rebuilds the table)
        self._active = None  # (table key, _Table) of the running trajectory
        self._buffers = None
        self._returned = None
        self._seed_pending = True

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps: Optional[Sequence[int]] = None,
                      generator=None, **unused):
        """The trajectory: ``num_inference_steps`` by the config's spacing (or ``skip``), or the
        explicit descending ``timesteps``; its tables are built here (float64, on the host) and put
        on ``device``. ``generator`` draws the noise seed now instead of at the first step (needed
        when the loop runs under torch.compile or CUDA-graph capture)."""
        if unused.get("sigmas") is not None:
            raise ValueError("sigmas: not supported (pass timesteps=)")
        # Re-read: pipelines edit an outdated config in place (StableDiffusionPipeline sets steps_offset=1).
        self._source = _source_of(dict(self.config))
        if self._fixed_eta is None:
            self._default_eta = compat.default_eta(self._source)
        T = self.schedule.T
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("num_inference_steps: pass either num_inference_steps or timesteps, not both")
            desc = np.asarray([int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)], dtype=np.int64)
            if desc.size < 1 or (np.diff(desc) >= 0).any() or desc[0] >= T or desc[-1] < 0:
                raise ValueError(f"timesteps: expected strictly decreasing timesteps in [0, {T}), got {desc.tolist()}")
            S = int(desc.size)
        elif (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
              or not 1 <= num_inference_steps <= T):
            raise ValueError(f"num_inference_steps: expected an integer in [1, T={T}], got {num_inference_steps!r}")
        else:
            S = int(num_inference_steps)
        derived = compat.sampler_options_from_diffusers(self._source, S, self.schedule.alphas_cumprod.numpy(), schedule_only=True)
        if timesteps is None:
            skip = self._skip if self._skip is not None else derived["skip"]
            if not isinstance(skip, str) and len(skip) != S:
                raise ValueError(f"num_inference_steps: the configured timesteps (skip) have {len(skip)} steps, got {S}")
            desc = solvers.timesteps(self.schedule, S, skip)[::-1]
        solver = self.config.solver or derived.get("solver", "ddim")
        clip = float(derived.get("clip_x0", 0.0))
        model_desc = tuple(int(t) for t in desc)
        if timesteps is None and self._model_tau is not None:  # the configured skip list, paired with them
            model_desc = tuple(self._model_tau[::-1])
        self._plan = _Plan(
            tau_desc=tuple(int(t) for t in desc),
            model_desc=model_desc,
            solver=solver,
            prediction=layout.PREDICTIONS[derived["prediction"]],
            clip=clip,
            rederive=clip > 0 and self._source["_class_name"] == "DDPMScheduler",
            device=torch.device(device) if device is not None else torch.device("cpu"),
            backend=ops.resolve_backend(self.config.backend, device if device is not None else "cpu"),
        )
        self._tables: Dict[tuple, tuple] = {}
        self._reset()
        self.num_inference_steps = len(desc)
        self.timesteps = torch.tensor(self._plan.model_desc, dtype=torch.int64, device=self._plan.device)
        self._select_table(self._default_eta, self._plan.rederive)  # built before the loop, on the device
        if generator is not None:
            self._draw_seed(generator, self._plan.device)

    @property
    def step_index(self) -> Optional[int]:
        """The index in ``timesteps`` of the next step (None before the first)."""
        return self._step_index

    @property
    def resolved_backend(self) -> Optional[str]:
        """The backend running this trajectory's steps ("cpp", "triton" or "torch"; None before the first)."""
        return None if self._buffers is None else self._plan.backend

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the trajectory at ``timesteps[begin_index]`` (img2img): a multistep solver warms up again there."""
        if self._plan is None:
            raise ValueError("set_begin_index: call set_timesteps first")
        S = len(self._plan.tau_desc)
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or not 0 <= begin_index < S:
            raise ValueError(f"begin_index: expected an integer in [0, {S}), got {begin_index!r}")
        self._begin_index = int(begin_index)
        self._row0 = int(begin_index)
        self._active = None
        self._select_table(self._default_eta, self._plan.rederive)

    def set_noise(self, noise: Optional[torch.Tensor]) -> None:
        """Explicit noise for the next trajectory: ``noise[k]`` is added at its k-th step (k = 0 the
        noisiest) instead of Philox noise, so a pipeline run can be matched against any other
        sampler's draws. ``variance_noise=`` of a step still takes precedence. None clears it."""
        if noise is not None and (not torch.is_tensor(noise) or noise.ndim < 2 or not noise.is_floating_point()):
            raise ValueError(f"noise: expected a floating tensor of shape (steps, *sample.shape), got {ops._describe(noise)}")
        self._pending_noise = noise

    # -- tables ----------------------------------------------------------------------------
    def _select_table(self, eta, rederive: bool):
        """The table of this trajectory for (eta, rederive, first row), cached per set_timesteps."""
        plan = self._plan
        key = (eta, rederive, self._row0)
        if key not in self._tables:
            tau = np.asarray(plan.tau_desc[self._row0 :][::-1], dtype=np.int64)
            st = solvers.build(plan.solver, self.schedule, tau, eta)
            uses_x0 = bool(st.table[:, [layout.C_X0, layout.D_X0]].any()) or st.history_kind == layout.HISTORY_KINDS["x0"]
            if plan.clip > 0 and not uses_x0:
                raise ValueError(
                    f"clip_sample: the solver {plan.solver!r} integrates eps and never uses the x0-prediction; use solver='ddim'"
                )
            if rederive:
                st = _eps_from_clipped_x0(st)
            st.check("schedule")
            self._tables[key] = _Table.of(st, plan.device)
        self._active = (key, self._tables[key])
        return self._active

    # -- noise seed --------------------------------------------------------------------------
    def _draw_seed(self, generator, device) -> None:
        g = generator[0] if isinstance(generator, (list, tuple)) else generator
        seed = torch.zeros(2, dtype=torch.int64, device=device)
        if g is not None and g.device.type != "cpu":
            seed[:1].copy_(torch.randint(_SEED_HIGH, (1,), generator=g, device=g.device, dtype=torch.int64))
        else:
            seed[0] = int(torch.randint(_SEED_HIGH, (1,), generator=g, dtype=torch.int64))
        self._seed = seed
        self._seed_pending = False

    # -- the step ----------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The model input is the sample itself (variance-preserving schedules need no scaling)."""
        return sample

    def _index_of(self, timestep) -> Optional[int]:
        """The position of ``timestep`` in ``self.timesteps`` without a device sync, or None when that
        needs one (a device tensor that is not an element of ``self.timesteps``) or runs compiled."""
        ts = self.timesteps
        if torch.is_tensor(timestep):
            if timestep.numel() != 1:
                raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(timestep.shape)}")
            if torch.compiler.is_compiling():
                return None
            if timestep.device == ts.device and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr():
                return timestep.storage_offset() - ts.storage_offset()
            if timestep.device.type != "cpu" and (timestep.device.type != "cuda" or torch.cuda.is_current_stream_capturing()):
                return None
            value = int(timestep.reshape(()).item())  # a CPU tensor (no device sync), or one sync on a foreign device tensor
        elif isinstance(timestep, (int, np.integer, float, np.floating)) and not isinstance(timestep, bool):
            value = int(timestep)
        else:
            raise ValueError(f"timestep: expected an int or a one-element tensor, got {type(timestep).__name__}")
        if value not in self._plan.model_desc:
            raise ValueError(f"timestep: {value} is not in the schedule set by set_timesteps ({list(self._plan.model_desc)})")
        return self._plan.model_desc.index(value)

    def _start(self, timestep) -> int:
        """The first step of a trajectory: its index (begin_index, else found from the timestep)."""
        k = self._begin_index
        found = self._index_of(timestep)
        if k is None:
            k = found if found is not None else 0
            if k != self._row0:
                self._row0 = k
                self._active = None
        elif found is not None and found != k:
            raise ValueError(f"timestep: expected {self._plan.model_desc[k]} (begin_index {k}), got {self._plan.model_desc[found]}")
        return k

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: Optional[float] = None,
        use_clipped_model_output: Optional[bool] = None,
        generator=None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One fused step from ``timestep`` to the next one in ``timesteps``.

        model_output: the model's output at ``sample`` (its prediction type); eta: see the module
        docstring (a fixed config eta wins); use_clipped_model_output: re-derive eps from the
        clipped x0; generator: seeds the Philox noise at the first noisy step; variance_noise:
        explicit noise for this step. Returns ``FusedSchedulerOutput(prev_sample,
        pred_original_sample)``, or that tuple when ``return_dict`` is False.
        """
        plan = self._plan
        if plan is None:
            raise ValueError("step: call set_timesteps(num_inference_steps) before the first step")
        S = len(plan.tau_desc)
        first = self._step_index is None
        k = self._start(timestep) if first else self._step_index
        if k >= S:
            raise ValueError(f"step: all {S} steps of the schedule have run; call set_timesteps to start another trajectory")
        if not first:
            found = self._index_of(timestep)
            if found is not None and found != k:
                raise ValueError(
                    f"timestep: expected {plan.model_desc[k]} at step {k} (the scheduler advances one step per call; "
                    f"set_timesteps restarts it), got {plan.model_desc[found]}"
                )
        want_eta = self._fixed_eta if self._fixed_eta is not None else (eta if eta is not None else self._default_eta)
        rederive = plan.rederive or bool(use_clipped_model_output and plan.clip > 0)
        if self._active is None or self._active[0] != (want_eta, rederive, self._row0):
            if not first:
                raise ValueError(f"eta: {want_eta!r} (or use_clipped_model_output) changed in the middle of a trajectory")
            self._select_table(want_eta, rederive)
        tab = self._active[1]
        row = k - self._row0
        if first:
            tab = self._begin(model_output, sample, tab, S - self._row0)
        buf = self._buffers
        if tuple(sample.shape) != buf["shape"]:
            raise ValueError(f"sample: expected shape {buf['shape']} (fixed at the first step), got {tuple(sample.shape)}")
        x = self._state_for(sample)
        m = model_output if model_output.is_contiguous() else model_output.contiguous()
        noise = None
        if tab.stochastic[row]:
            if variance_noise is not None:
                noise = self._as_noise(variance_noise, "variance_noise", buf)
            elif buf["noise"] is not None:
                noise = buf["noise"][row]
            elif self._seed_pending:
                if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                    raise ValueError(
                        "generator: the noise seed cannot be drawn inside torch.compile or a CUDA-graph capture; "
                        "call set_timesteps(..., generator=g) before the loop"
                    )
                self._draw_seed(generator, x.device)
        out = torch.empty(buf["shape"], dtype=torch.float32, device=x.device)
        x0 = torch.empty(buf["shape"], dtype=torch.float32, device=x.device)
        ops.run_step(x, m, tab.table, row, self._seed, plan.prediction, plan.clip, tab.history_kind, buf["ring"], buf["saved"],
                     noise, out, x0, buf["flags"], plan.backend)
        self._step_index = k + 1
        prev = out if sample.dtype == torch.float32 else out.to(sample.dtype)
        self._returned = (prev, out, None if torch.compiler.is_compiling() else prev._version)
        pred = x0 if sample.dtype == torch.float32 else x0.to(sample.dtype)
        if not return_dict:
            return prev, pred
        return self._output_class(prev_sample=prev, pred_original_sample=pred)

    def _begin(self, model_output, sample, tab: _Table, rows: int) -> _Table:
        """Buffers of one trajectory, and the one argument check of the op (eager only: compiled,
        the op itself checks its arguments)."""
        if not torch.is_tensor(sample) or not torch.is_tensor(model_output):
            raise ValueError(f"sample, model_output: expected tensors, got {type(sample).__name__}, {type(model_output).__name__}")
        device, shape = sample.device, tuple(sample.shape)
        plan = self._plan
        if tab.table.device != device:  # set_timesteps without the pipeline's device: moved once
            plan.device, plan.backend = device, ops.resolve_backend(self.config.backend, device)
            self._tables = {key: dataclasses.replace(t, table=t.table.to(device)) for key, t in self._tables.items()}
            self.timesteps = self.timesteps.to(device)
            self._active = (self._active[0], self._tables[self._active[0]])
            tab = self._active[1]
        R = tab.history_slots
        ring = torch.zeros((R, *shape), dtype=torch.float32, device=device) if R else None
        saved = torch.zeros(shape, dtype=torch.float32, device=device) if tab.uses_saved else None
        flags = torch.zeros((rows, 2), dtype=torch.int32, device=device)
        buf = {"shape": shape, "ring": ring, "saved": saved, "flags": flags, "noise": None}
        if self._pending_noise is not None:
            noise, self._pending_noise = self._pending_noise, None
            if tuple(noise.shape) != (rows, *shape):
                raise ValueError(f"noise: expected shape {(rows, *shape)} (steps, *sample.shape), got {tuple(noise.shape)}")
            buf["noise"] = noise.to(device=device, dtype=torch.float32).contiguous()
        if self._seed_pending:
            self._seed = torch.zeros(2, dtype=torch.int64, device=device)  # replaced by the draw when noise is needed
        elif self._seed.device != device:
            self._seed = self._seed.to(device)
        self._buffers = buf
        if not torch.compiler.is_compiling():
            x = sample.to(torch.float32).contiguous()
            ops.check_step_args(x, model_output.contiguous(), tab.table, 0, self._seed, plan.prediction, plan.clip,
                                tab.history_kind, ring, saved, None, torch.empty_like(x), torch.empty_like(x), flags)
        return tab

    def _state_for(self, sample: torch.Tensor) -> torch.Tensor:
        """x_t as float32: our own float32 copy when ``sample`` is the low-precision tensor we returned."""
        if self._returned is not None and sample is self._returned[0] and sample.dtype != torch.float32:
            if torch.compiler.is_compiling() or sample._version == self._returned[2]:
                return self._returned[1]
        x = sample if sample.dtype == torch.float32 else sample.to(torch.float32)
        return x if x.is_contiguous() else x.contiguous()

    @staticmethod
    def _as_noise(noise, name, buf) -> torch.Tensor:
        if not torch.is_tensor(noise) or tuple(noise.shape) != buf["shape"] or not noise.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor of shape {buf['shape']}, got {ops._describe(noise)}")
        noise = noise.to(torch.float32)
        return noise if noise.is_contiguous() else noise.contiguous()

    def nonfinite_steps(self) -> List[int]:
        """Steps (indices into ``timesteps``) of the current trajectory whose model output or new
        state had a non-finite element (the op's flags; one host sync)."""
        if self._buffers is None:
            return []
        bad = self._buffers["flags"].any(dim=1).cpu()
        return [int(i) + self._row0 for i in torch.nonzero(bad).flatten().tolist()]

    # -- forward process -------------------------------------------------------------------
    def _sqrt_alphas(self, device) -> tuple:
        key = ("sqrt_alphas", torch.device(device))
        if key not in self._noise_tables:
            a = self.schedule.alphas_cumprod
            self._noise_tables[key] = (a.sqrt().to(torch.float32).to(device), (1.0 - a).sqrt().to(torch.float32).to(device))
        return self._noise_tables[key]

    def _coefficients(self, timesteps, like: torch.Tensor):
        sa, s1m = self._sqrt_alphas(like.device)
        t = torch.as_tensor(timesteps, device=like.device).to(torch.int64).reshape(-1)
        shape = (-1, *([1] * (like.ndim - 1)))
        return sa[t].reshape(shape), s1m[t].reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) noise (img2img), in the samples' dtype."""
        sa, s1m = self._coefficients(timesteps, original_samples)
        return (sa * original_samples.to(torch.float32) + s1m * noise.to(torch.float32)).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target sqrt(alpha_t) noise - sqrt(1 - alpha_t) x_0 (training)."""
        sa, s1m = self._coefficients(timesteps, sample)
        return (sa * noise.to(torch.float32) - s1m * sample.to(torch.float32)).to(sample.dtype)
