"""FusedSampler: the generalized DDIM/DDPM process of Song, Meng & Ermon (2021), Eq. 12, and its solvers.

A façade over the layers below it: ``schedule`` (betas, tau, sigma(eta)) -> ``solvers`` (one
float64 coefficient table per solver) -> ``trajectory`` (a self-contained plan and the one
loop) -> ``ops`` (the one fused op) -> ``kernels``/``csrc`` (Triton, C++). This module checks
the options, caches the device tables and the wrapped model, builds plans, and keeps the
public API of DESIGN.md.
"""

from __future__ import annotations

import math
import warnings
import operator
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

from ddim_fast import layout, ops, reference, solvers, trajectory
from ddim_fast.compile import cpu_flags
from ddim_fast.schedule import NoiseSchedule, _check_eta
from ddim_fast.trajectory import Trajectory

__all__ = ["FusedSampler", "Trajectory", "slerp"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SOLVERS = solvers.SOLVERS
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class FusedSampler:
    """DDIM / DDPM sampling of an epsilon- (or v-, x0-) prediction model along any tau, any eta.

    ``FusedSampler(model, schedule=NoiseSchedule.linear(1000), steps=50, eta=0.0)`` then
    ``sampler.sample(shape=(64, 3, 32, 32), seed=0)``. See DESIGN.md for every option.

    ``model_timesteps``: the timestep the model is told at each step, paired with the increasing
    skip timesteps (None: those themselves); the solver's coefficients stay those of ``skip``.
    ``tune_timesteps(shift_last=True)`` finds one for the last call (LD3's decoupled timestep,
    Tong et al. 2025); ``encode`` keeps the skip timesteps.
    """

    def __init__(
        self,
        model: Callable,
        schedule: Optional[NoiseSchedule] = None,
        steps: int = 50,
        eta: Union[float, str] = 0.0,
        skip: Union[str, Sequence[int]] = "uniform",
        prediction: str = "epsilon",
        clip_x0: Union[None, bool, float] = None,
        precision: str = "auto",
        backend: str = "auto",
        cuda_graph: Union[str, bool] = "auto",
        model_kwargs: Optional[Dict[str, Any]] = None,
        solver: str = "ddim",
        channels_last: Union[str, bool] = "auto",
        guidance_scale: Optional[float] = None,
        uncond_kwargs: Optional[Dict[str, Any]] = None,
        compile: Union[bool, str] = False,
        model_timesteps: Optional[Sequence[int]] = None,
    ):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **model_kwargs), got {type(model).__name__}")
        self.model = model
        self.model_kwargs = _check_kwargs(model_kwargs, "model_kwargs")
        self.uncond_kwargs = _check_kwargs(uncond_kwargs, "uncond_kwargs")
        if guidance_scale is not None and (
            isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale: expected None or a finite float, got {guidance_scale!r}")
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        schedule = NoiseSchedule.linear(1000) if schedule is None else schedule
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        _check_eta(eta)
        self.eta = eta
        if prediction not in layout.PREDICTIONS:
            raise ValueError(f"prediction: expected one of {tuple(layout.PREDICTIONS)}, got {prediction!r}")
        self.prediction = prediction
        self.clip_x0 = _clip_value(clip_x0)
        for name, value, allowed in (
            ("precision", precision, PRECISIONS),
            ("backend", backend, ops.BACKENDS),
            ("cuda_graph", cuda_graph, ("auto", True, False)),
            ("channels_last", channels_last, ("auto", True, False)),
            ("compile", compile, ("auto", True, False)),
            ("solver", solver, SOLVERS),
        ):
            if isinstance(value, bool) and not any(a is value for a in allowed) or value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        self.precision, self.backend, self.cuda_graph = precision, backend, cuda_graph
        self.channels_last, self.compile, self.solver = channels_last, compile, solver
        if solver == "dpmpp_2m_sde" and eta == 0:
            raise ValueError("eta: solver 'dpmpp_2m_sde' is the SDE variant and needs eta > 0 (1 = DPM-Solver++(2M) SDE); "
                             "with eta = 0 use solver='dpmpp_2m'")  # fmt: skip
        self._conv2d_model = isinstance(model, torch.nn.Module) and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        self.skip = skip
        self._tau = np.ascontiguousarray(solvers.timesteps(schedule, steps, skip), dtype=np.int64)
        self.steps = steps
        self._model_tau = solvers.model_timesteps(model_timesteps, self._tau, schedule.T)
        # sample and decode run the solver (decode with eta = 0); encode is DDIM inversion whatever the solver.
        self._tables = {
            "sample": solvers.build(solver, schedule, self._tau, eta),
            "decode": solvers.build(solver, schedule, self._tau, 0.0),
            "encode": solvers.ddim_inversion(schedule, self._tau),
        }
        for kind, table in self._tables.items():
            _check_conversion(kind, table, prediction, self._tau)
        sample = self._tables["sample"]
        reads_x0 = bool((sample.table[:, layout.C_X0] != 0).any()) or (
            sample.history_slots > 0 and sample.history_kind == layout.HISTORY_KINDS["x0"]
        )
        if self.clip_x0 and not reads_x0:
            raise ValueError(f"clip_x0: the solver {solver!r} integrates eps and never uses the x0-prediction; use solver='ddim'")
        self._stochastic = {kind: any(table.stochastic) for kind, table in self._tables.items()}
        self._ring = {kind: (table.history_slots, table.uses_saved) for kind, table in self._tables.items()}
        self._device_cache: Dict[tuple, torch.Tensor] = {}
        self._models: Dict[tuple, Callable] = {}
        self._casts: Dict[tuple, trajectory.CastWeights] = {}  # (device, dtype) -> weight copies, refreshed per call
        self._graphs = None  # ddim_fast.graphs.GraphCache, created on first CUDA use
        self._expected_calls: Optional[int] = None  # model calls a long run expects (compile="auto")
        self._warned_emulated = False  # precision="bf16"/"fp16" on a CPU without it: one warning

    @classmethod
    def from_diffusers(cls, unet_or_pipeline, scheduler=None, **options) -> "FusedSampler":
        """A sampler for a diffusers UNet (or pipeline) that reproduces its scheduler's loop.

        ``scheduler`` defaults to the pipeline's: a DDIM/DDPM scheduler gives DDIM options, a
        ``DPMSolverMultistepScheduler`` (dpmsolver++) or ``UniPCMultistepScheduler`` (bh2) the
        multistep solver of its order on its own timesteps. Its betas, T, prediction type, timestep spacing/offset and clipping become
        our options (see ``ddim_fast.compat``); ``options`` (``steps=50``, ``eta``, ``solver``,
        ``precision``...) override them.
        """
        from ddim_fast.compat import sampler_options_from_diffusers

        model = unet_or_pipeline
        if hasattr(unet_or_pipeline, "unet"):
            model = unet_or_pipeline.unet
            scheduler = scheduler if scheduler is not None else getattr(unet_or_pipeline, "scheduler", None)
        if scheduler is None:
            raise ValueError("scheduler: a bare UNet needs the diffusers scheduler (or config) it was trained with")
        schedule = NoiseSchedule.from_diffusers(scheduler)
        derived = sampler_options_from_diffusers(scheduler, int(options.get("steps", 50)), schedule.alphas_cumprod.numpy())
        derived.update(options)
        return cls(model, schedule=schedule, **derived)

    @property
    def timesteps(self) -> torch.Tensor:
        """tau as an int64 tensor, descending: the model timestep of each step, first step first."""
        return torch.from_numpy(self._tau[::-1].copy())

    @property
    def model_timesteps(self) -> torch.Tensor:
        """The timestep the model is told at each step of ``sample``/``decode``, descending like
        ``timesteps`` (the same unless ``model_timesteps`` was given)."""
        return torch.from_numpy(self._model_tau[::-1].copy())

    @property
    def num_steps(self) -> int:
        return int(self._tau.size)

    def __repr__(self) -> str:
        return (
            f"FusedSampler(steps={self.num_steps}, solver={self.solver!r}, eta={self.eta!r}, skip={self.skip!r}, "
            f"prediction={self.prediction!r}, backend={self.backend!r}, precision={self.precision!r}, schedule={self.schedule!r})"
        )

    # -- public API -------------------------------------------------------------------------
    def sample(self, x_T: Optional[torch.Tensor] = None, *, shape: Optional[Sequence[int]] = None, seed: Optional[int] = None,
               noise: Optional[torch.Tensor] = None, batch_offset: int = 0, device: Union[str, torch.device, None] = None,
               return_trajectory: bool = False, progress: bool = False, model_kwargs: Optional[Dict[str, Any]] = None,
               uncond_kwargs: Optional[Dict[str, Any]] = None):  # fmt: skip
        """Run the generative process x_T -> x_0 (the solver's table; Eq. 12 for "ddim").

        x_T: the starting latent (never modified); or ``shape`` (+ ``seed``) to draw it with the
        built-in counter-based generator. ``noise``: (S, *shape) explicit per-step noise, noise[k]
        at the k-th step. ``batch_offset``: global index of the first sample, so that sample i is
        the same whether drawn alone, in a batch, or on another process. ``model_kwargs`` /
        ``uncond_kwargs``: this call's conditioning (class labels, text embeddings), replacing
        the constructor's; with ``guidance_scale`` set, each step evaluates the conditional and
        unconditional inputs in one batched model call and feeds
        eps_u + guidance_scale * (eps_c - eps_u) to the fused step (classifier-free guidance).
        """
        kwargs = (
            _check_kwargs(model_kwargs, "model_kwargs") if model_kwargs is not None else self.model_kwargs,
            _check_kwargs(uncond_kwargs, "uncond_kwargs") if uncond_kwargs is not None else self.uncond_kwargs,
        )
        return self._generate("sample", x_T, shape, seed, noise, batch_offset, device, return_trajectory, progress, kwargs)

    def decode(self, x_T: torch.Tensor, *, device: Union[str, torch.device, None] = None, return_trajectory: bool = False,
               progress: bool = False):  # fmt: skip
        """x_T -> x_0 with the deterministic process (eta = 0) and the sampler's solver, the inverse of ``encode``."""
        if x_T is None:
            raise ValueError("x_T: decode needs a latent tensor")
        kwargs = (self.model_kwargs, self.uncond_kwargs)
        return self._generate("decode", x_T, None, None, None, 0, device, return_trajectory, progress, kwargs)

    def encode(self, x0: torch.Tensor, *, eta: Union[float, str, None] = None, device: Union[str, torch.device, None] = None,
               return_trajectory: bool = False, progress: bool = False):  # fmt: skip
        """x_0 -> x_T by DDIM inversion along tau (the ODE of Eq. 14 integrated forward in t).

        This is DDIM inversion whatever the ``solver``: a multistep method run backwards is not
        its own inverse, and its first step would start at alpha = 1 with no history. With a
        multistep solver, decode(encode(x0)) therefore pairs a first-order encoding with a
        higher-order decoding; both approximate the same ODE. Inversion exists only for the
        deterministic process: ``eta`` (the sampler's when not given) must be 0.
        """
        eff = self.eta if eta is None else eta
        if eff != 0:
            raise ValueError(
                f"eta: encode is DDIM inversion, defined only for the deterministic process (eta = 0), got eta={eff!r}; "
                "pass encode(x0, eta=0) or build the sampler with eta=0"
            )
        if self.prediction == "x0":
            raise ValueError(
                'prediction: encode needs eps at the clean starting point (alpha = 1), which an "x0" model cannot '
                'give (eps = (x - x0) / 0 there); use an "epsilon" or "v" model'
            )
        if x0 is None:
            raise ValueError("x0: encode needs an image tensor")
        kwargs = (self.model_kwargs, self.uncond_kwargs)
        return self._generate("encode", x0, None, None, None, 0, device, return_trajectory, progress, kwargs)

    def reset(self) -> None:
        """Drop cached CUDA graphs, device tables and wrapped models (their memory is released)."""
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = None
        self._device_cache.clear()
        self._models.clear()

    # -- plans ------------------------------------------------------------------------------
    def _generate(self, kind, x_in, shape, seed, noise, batch_offset, device, record, progress, kwargs):
        S = self.num_steps
        start_name = "x0" if kind == "encode" else "x_T"
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
        if isinstance(batch_offset, bool) or not isinstance(batch_offset, (int, np.integer)):
            raise ValueError(f"batch_offset: expected a non-negative integer, got {batch_offset!r}")
        batch_offset = int(batch_offset)
        if shape is not None:
            shape = _check_shape(shape)
        if x_in is not None:
            x_in = _check_latent(x_in, start_name)
            if shape is not None and tuple(x_in.shape) != shape:
                raise ValueError(f"shape: {shape} disagrees with x_T's shape {tuple(x_in.shape)}; give one of them")
            shape = tuple(x_in.shape)
            dev = torch.device(device) if device is not None else x_in.device
        else:
            if shape is None:
                raise ValueError("shape: give x_T, or shape (and optionally seed) to draw x_T")
            dev = torch.device(device) if device is not None else _model_device(self.model)
        reference.check_sample_range(batch_offset, shape[0], "batch_offset")
        table = self._tables[kind]
        if seed is None and (x_in is None or (noise is None and self._stochastic[kind])):
            # Unseeded runs follow torch's global generator, so torch.manual_seed makes them reproducible.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if noise is not None:
            if kind != "sample":
                raise ValueError(f"noise: only sample() takes explicit noise, not {kind}()")
            if not torch.is_tensor(noise) or tuple(noise.shape) != (S, *shape):
                got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
                raise ValueError(f"noise: expected shape (S={S}, *{shape}) = {(S, *shape)}, got {got}")
            if not noise.is_floating_point():
                raise ValueError(f"noise: expected a floating-point tensor, got dtype {noise.dtype}")
            noise = noise.to(device=dev, dtype=torch.float32).contiguous()  # NaN in it: trajectory.check_finite
        backend = ops.resolve_backend(self.backend, dev)
        if x_in is None:
            x_start = ops.gaussian(int(seed), shape, stream=layout.STREAM_X_T, sample_offset=batch_offset, device=dev, backend=backend)
        else:
            x_start = x_in.detach().to(device=dev, dtype=torch.float32)  # NaN in it: trajectory.check_finite
        plan = self._plan(kind, table, shape, dev, seed, batch_offset, noise, kwargs, backend)
        graphs = self._graph_cache(dev)
        with torch.inference_mode():
            bufs = graphs.run(plan, x_start, record) if graphs is not None else None
        static = bufs is not None  # a captured graph's buffers: cloned before the next replay
        if bufs is None:  # no CUDA, graphs off, or this configuration failed to capture
            # Allocated outside inference mode and returned as they are: ordinary tensors for the
            # caller (usable with autograd), and no copy of the result.
            bufs = trajectory.allocate(plan, x_start, record)
            trajectory.run(plan, bufs, progress)
        trajectory.check_finite(plan, bufs, x_start)
        return trajectory.result(plan, bufs, copy=static)

    def _plan(self, kind, table: solvers.SolverTable, shape, device, seed, batch_offset, noise, kwargs, backend):
        t_host = self._tau.copy() if kind == "encode" else self._model_tau[::-1].copy()
        guided = self.guidance_scale is not None
        B_model = 2 * shape[0] if guided else shape[0]
        autocast_dtype = self._autocast_dtype(device)
        return trajectory.Plan(
            kind=kind,
            table=self._device_table(kind, device),
            history_kind=table.history_kind,
            history_slots=self._ring[kind][0],
            uses_saved=self._ring[kind][1],
            timesteps=self._device_timesteps(kind, t_host, device, B_model),
            t_host=t_host,
            prediction=layout.PREDICTIONS[self.prediction],
            clip=self.clip_x0,
            seed=torch.tensor([int(seed or 0), batch_offset], dtype=torch.int64, device=device),
            noise=noise,
            model=self._model_for(shape, device, autocast_dtype),
            model_kwargs=_prepare_kwargs(kwargs, self.guidance_scale, shape[0], device),
            autocast_dtype=autocast_dtype,
            backend=backend,
            table_key=(kind, self.solver, str(self.eta), self._tau.tobytes(), self._model_tau.tobytes()),
            model_key=(id(self.model), self.guidance_scale, self.compile),
        )

    def _model_for(self, shape, device: torch.device, autocast_dtype) -> Callable:
        """The model as the loop calls it, wrapped once per (shape, device): compile, guidance, NHWC input."""
        key = (tuple(shape), str(device), str(autocast_dtype))
        cast = self._cast_weights(device, autocast_dtype)
        if key not in self._models:
            model = self.model if cast is None else cast
            if self.compile is not False:
                from ddim_fast.compile import maybe_compile

                # "auto" weighs the compile time against the calls expected: one call's S steps, or
                # what a long run (ddim_fast.sharded) announces through _expected_calls.
                model = maybe_compile(model, self.compile, device, expected_calls=self._expected_calls or self.num_steps)
            fn: Callable = trajectory.ModelCall(model)
            guided = self.guidance_scale is not None
            model_shape = (2 * shape[0], *shape[1:]) if guided else tuple(shape)
            nhwc = self._use_channels_last(device, shape, autocast_dtype)
            if guided:
                fn = trajectory.Guided(fn, self.guidance_scale, shape, device, torch.channels_last if nhwc else torch.contiguous_format)
            elif nhwc:
                fn = trajectory.ChannelsLast(fn, model_shape, device)
            self._models[key] = fn
        return self._models[key]

    def _cast_weights(self, device: torch.device, autocast_dtype) -> Optional["trajectory.CastWeights"]:
        """Low-precision copies of the weights (``trajectory.CastWeights``, one per device and dtype,
        shared by every shape), refreshed for this call, instead of autocast casting them at every
        model call; None where that does not apply. On CPUs, where it was measured (a trajectory
        1.05-1.08x faster, docs/results/compile.md), for modules with float32 parameters; CUDA keeps
        plain autocast until a GPU measurement exists."""
        if autocast_dtype is None or device.type != "cpu" or not isinstance(self.model, torch.nn.Module):
            return None
        key = (str(device), autocast_dtype)
        cast = self._casts.get(key)
        if cast is None:
            if not any(p.dtype == torch.float32 for p in self.model.parameters()):
                return None
            cast = self._casts[key] = trajectory.CastWeights(self.model, autocast_dtype)
        else:
            cast.refresh()  # the user's weights may have changed (training, EMA) since the last call
        return cast

    def _use_channels_last(self, device: torch.device, shape, autocast_dtype: Optional[torch.dtype]) -> bool:
        if len(shape) != 4 or self.channels_last is False:
            return False
        if self.channels_last is True:
            return True
        # On CUDA, cuDNN's NHWC convolutions are the fast path for fp16. On CPUs (oneDNN), paired
        # rounds on a 2-core AVX-512 machine: fp32 UNets gain (diffusers UNet2DModel 5.4M, 8x3x32x32:
        # 1.08x), bf16 autocast does not (GroupNorm's channels-last bf16 kernel eats the gain: 0.94-1.0x).
        # "auto" only for modules built on 2-D convolutions: a model that .view()s its input needs it contiguous.
        return (device.type == "cuda" or autocast_dtype is None) and self._conv2d_model

    def _autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if self.precision != "auto":
            dtype = _DTYPES[self.precision]
            if dtype is not None and device.type == "cpu" and not self._warned_emulated and not _cpu_has_native(dtype):
                self._warned_emulated = True
                warnings.warn(
                    f"precision={self.precision!r}: this CPU has no native {self.precision} arithmetic, so the model's "
                    f"{self.precision} ops are emulated and may run far slower than fp32 (bf16, a 5.4M-parameter UNet on "
                    "an AVX2 Zen 3: 26x); precision='auto' runs fp32 on such CPUs",
                    RuntimeWarning,
                    stacklevel=5,  # sample / decode / encode's caller
                )
            return dtype
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and _cpu_has_native_bf16():
            return torch.bfloat16
        return None

    def _device_table(self, kind: str, device: torch.device) -> torch.Tensor:
        key = (kind, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self._tables[kind].table.to(device=device, dtype=torch.float32).contiguous()
        return self._device_cache[key]

    def _device_timesteps(self, kind: str, t_host: np.ndarray, device: torch.device, B_model: int) -> torch.Tensor:
        """(S, B_model) int64 timesteps on the device, made once per (kind, device, batch)."""
        key = ("t", kind, str(device), B_model)
        if key not in self._device_cache:
            self._device_cache[key] = torch.as_tensor(t_host, device=device)[:, None].expand(-1, B_model).contiguous()
        return self._device_cache[key]

    def _graph_cache(self, device: torch.device):
        if self.cuda_graph is False:
            return None
        if self._graphs is None:
            if device.type != "cuda":
                return None
            from ddim_fast import graphs

            self._graphs = graphs.GraphCache()
        return self._graphs if device.type in self._graphs.device_types else None


# -- checks and small policies ----------------------------------------------------------------
def _clip_value(clip_x0) -> float:
    if clip_x0 is None or clip_x0 is False:
        return 0.0
    if clip_x0 is True:
        return 1.0
    if isinstance(clip_x0, (int, float)) and math.isfinite(clip_x0) and clip_x0 > 0:
        return float(clip_x0)
    raise ValueError(f"clip_x0: expected None, True (clamp x0 to [-1, 1]) or a positive float, got {clip_x0!r}")


def _check_conversion(kind: str, table: solvers.SolverTable, prediction: str, tau: np.ndarray) -> None:
    """A degenerate schedule is named before sampling: its float32 table must be finite, and the
    model-output conversion divides by sqrt(alpha) (and by sqrt(1 - alpha) for x0 models)."""
    table.check("schedule")
    t = tau if kind == "encode" else tau[::-1]
    sa = table.table[:, layout.SQRT_ALPHA].to(torch.float32)
    s1m = table.table[:, layout.SQRT_ONE_MINUS_ALPHA].to(torch.float32)
    bad = sa < 1e-18  # x / sqrt(alpha) overflows float32 for |x| ~ 1e20 here
    if prediction == "x0" and kind != "encode":
        bad |= s1m == 0
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        a = float(table.table[k, layout.SQRT_ALPHA]) ** 2
        raise ValueError(
            f"schedule: alphas_cumprod = {a:.3g} at timestep {int(t[k]) if kind != 'encode' or k == 0 else int(t[k - 1])} "
            f"leaves the {prediction} model's conversion undefined in float32; use betas inside (0, 1) with margin"
        )


def _check_kwargs(kwargs, name: str) -> Dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"{name}: expected a dict of keyword arguments for the model, got {type(kwargs).__name__}")
    return dict(kwargs)


def _check_shape(shape) -> tuple:
    """A sequence of positive integers; 2.5 or "3" are errors, never truncated."""
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape: expected a sequence of positive integers (B, ...), got {shape!r}") from None
    if len(dims) < 1 or any(s < 1 for s in dims) or any(isinstance(s, bool) for s in shape):
        raise ValueError(f"shape: expected a sequence of positive integers (B, ...), got {shape!r}")
    return dims


def _check_latent(x, name: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor of shape (B, ...), got {tuple(x.shape)}")
    return x


def _prepare_kwargs(kwargs, guidance_scale, B: int, device: torch.device) -> Dict[str, Any]:
    """The model's keyword arguments on ``device``; with guidance, [conditional; unconditional] batched."""
    cond, uncond = kwargs
    cond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}
    if guidance_scale is None:
        return cond
    uncond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in uncond.items()}
    if set(cond) != set(uncond):
        raise ValueError(f"uncond_kwargs: guidance needs the same keys as model_kwargs, got {sorted(uncond)} vs {sorted(cond)}")
    merged = {}
    for key, c in cond.items():
        u = uncond[key]
        if torch.is_tensor(c) and c.ndim >= 1 and c.shape[0] == B:
            if not torch.is_tensor(u) or u.shape != c.shape:
                got = tuple(u.shape) if torch.is_tensor(u) else type(u).__name__
                raise ValueError(f"uncond_kwargs[{key!r}]: expected shape {tuple(c.shape)} like model_kwargs, got {got}")
            merged[key] = torch.cat([c, u.to(c.dtype)], dim=0)
        elif torch.is_tensor(c) and torch.is_tensor(u) and torch.equal(c, u) or (not torch.is_tensor(c) and c == u):
            merged[key] = c  # shared, non-batched argument
        else:
            raise ValueError(
                f"model_kwargs[{key!r}]: with guidance, a conditioning argument must be a tensor of batch size {B} "
                "(or equal in model_kwargs and uncond_kwargs)"
            )
    return merged


def _cpu_has_native_bf16() -> bool:
    return _cpu_has_native(torch.bfloat16)


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` (bfloat16 / float16) natively (AVX-512 or AMX flags)."""
    flags = cpu_flags()
    if dtype == torch.bfloat16:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return "avx512_fp16" in flags or "amx_fp16" in flags


def _model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: Union[float, Sequence[float], torch.Tensor]) -> torch.Tensor:
    """Spherical linear interpolation between latents (DDIM paper, Section 5.3 and Appendix D.5).

    z = sin((1 - alpha) theta) / sin(theta) * z1 + sin(alpha theta) / sin(theta) * z2, with theta
    the angle between z1[i] and z2[i] flattened: latents are batched (B, ...) as the sampler
    uses them, one angle per sample (a 1-D input is one latent). A scalar ``alpha`` gives the
    input's shape; K values give a leading dimension K. Where z1[i] and z2[i] are (anti)parallel
    it falls back to linear interpolation.
    """
    if not torch.is_tensor(z1) or not torch.is_tensor(z2):
        raise TypeError("z1, z2: expected tensors")
    if z1.shape != z2.shape:
        raise ValueError(f"z2: expected the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    if not z1.is_floating_point() or not z2.is_floating_point():
        raise ValueError("z1, z2: expected floating-point tensors")
    al = torch.as_tensor(alpha, dtype=torch.float64, device=z1.device)
    if al.ndim > 1:
        raise ValueError(f"alpha: expected a scalar or a 1-D sequence, got shape {tuple(al.shape)}")
    a = z1.double().reshape(z1.shape[0], -1) if z1.ndim > 1 else z1.double().reshape(1, -1)
    b = z2.double().reshape(a.shape)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]  # (B, 1)
    al_ = al.reshape(-1, 1, 1)  # (K or 1, 1, 1)
    sin_t = torch.sin(theta)
    parallel = sin_t < 1e-6
    w1 = torch.where(parallel, 1 - al_, torch.sin((1 - al_) * theta) / torch.where(parallel, 1.0, sin_t))
    w2 = torch.where(parallel, al_, torch.sin(al_ * theta) / torch.where(parallel, 1.0, sin_t))
    out = w1 * a + w2 * b  # (K or 1, B, D)
    out = out.reshape(-1, *z1.shape).to(z1.dtype)
    return out if al.ndim == 1 else out[0]
