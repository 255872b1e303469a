"""FusedSampler: the generalized DDIM/DDPM process of Song, Meng & Ermon (2021), Eq. 12.

One loop runs every trajectory (sampling, decoding, encoding, with or without recording):
buffers are allocated once before the first step, the per-step timestep tensors and the
coefficient table live on the sampling device, and each step is one model call plus one call
of the fused op (``ddim_fast.ops.step``) that writes into a preallocated buffer. Nothing in
the loop reads a device value on the host, so on CUDA the same loop is what
``ddim_fast.graphs`` captures into a CUDA graph, and on CPUs it runs eagerly.

Model outputs are checked without a host sync per step: each step writes the float32 sum of
the model output of every sample into a small device buffer; one check after the loop turns a
non-finite entry into an error that names the step and the timestep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ddim_fast import ops, reference, solvers
from ddim_fast.schedule import NoiseSchedule, inverse_step_table, select_timesteps, step_table, _check_eta

__all__ = ["FusedSampler", "Trajectory", "slerp"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SOLVERS = solvers.SOLVERS
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trajectory(NamedTuple):
    """What ``return_trajectory=True`` returns (the tensors of the paper's figures).

    x0: the result (the sample for ``sample``/``decode``, the latent x_T for ``encode``);
    xs: (S + 1, *shape) every state visited, xs[0] the input and xs[-1] == x0;
    x0_preds: (S, *shape) the x0-prediction made at each step;
    timesteps: (S,) the model timestep of each step, in the order they ran.
    """

    x0: torch.Tensor
    xs: torch.Tensor
    x0_preds: torch.Tensor
    timesteps: torch.Tensor


@dataclasses.dataclass
class _Plan:
    """Everything one trajectory needs, prepared before its first step (also the graph key)."""

    kind: str  # "sample" or "encode"
    table: torch.Tensor  # (S, 5) float32 on device
    t_steps: torch.Tensor  # (S, B) int64 on device: the model's timestep at each step
    t_host: np.ndarray  # (S,) the same on the host, for error messages
    stochastic: tuple  # (S,) host bools: does step k add noise
    seed: torch.Tensor  # int64 (2,) on device: (seed, sample offset)
    noise: Optional[torch.Tensor]  # (S, *shape) float32 or None
    backend: str
    model_dtype: Optional[torch.dtype]
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    guidance_scale: Optional[float] = None
    solver: str = "ddim"  # the step this trajectory runs: a multistep solver's table is (S, 6)


class _ModelAdapter:
    """Calls a user's model under the conventions of DESIGN.md and checks what it returns."""

    def __init__(self, model: Callable):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **model_kwargs), got {type(model).__name__}")
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int, timestep: int, kwargs: Dict[str, Any]) -> torch.Tensor:
        out = self.model(x, t, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0] if len(out) else None
        elif not torch.is_tensor(out) and hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, dict) and "sample" in out:
            out = out["sample"]
        if not torch.is_tensor(out):
            raise TypeError(
                f"model returned {type(out).__name__} at step {step} (timestep {timestep}); expected a tensor, "
                "a tuple whose first item is a tensor, or an object with .sample"
            )
        if out.shape != x.shape:
            # Models with a learned variance (improved DDPM, guided diffusion) return 2C channels.
            if out.ndim == x.ndim and out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
                out = out[:, : x.shape[1]]
            else:
                raise ValueError(
                    f"model returned shape {tuple(out.shape)} at step {step} (timestep {timestep}); "
                    f"expected the input's shape {tuple(x.shape)}"
                )
        if not out.is_floating_point():
            raise TypeError(f"model returned dtype {out.dtype} at step {step} (timestep {timestep}); expected floating point")
        return out


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


class FusedSampler:
    """DDIM / DDPM sampling of an epsilon- (or v-, x0-) prediction model along any tau, any eta.

    ``FusedSampler(model, schedule=NoiseSchedule.linear(1000), steps=50, eta=0.0)`` then
    ``sampler.sample(shape=(64, 3, 32, 32), seed=0)``. See DESIGN.md for every option.
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
    ):
        self.adapter = _ModelAdapter(model)
        self.model = model
        self.model_kwargs = self._check_kwargs(model_kwargs, "model_kwargs")
        self.uncond_kwargs = self._check_kwargs(uncond_kwargs, "uncond_kwargs")
        if guidance_scale is not None and (
            isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale: expected None or a finite float, got {guidance_scale!r}")
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        if schedule is None:
            schedule = NoiseSchedule.linear(1000)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        _check_eta(eta)
        self.eta = eta
        if prediction not in reference.PREDICTIONS:
            raise ValueError(f"prediction: expected one of {tuple(reference.PREDICTIONS)}, got {prediction!r}")
        self.prediction = prediction
        self.clip_x0 = self._clip_value(clip_x0)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f'cuda_graph: expected "auto", True or False, got {cuda_graph!r}')
        self.cuda_graph = cuda_graph
        if solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
        if solver != "ddim" and eta != 0:
            raise ValueError(f"eta: the multistep solver {solver!r} is deterministic (eta = 0), got eta={eta!r}; use solver='ddim'")
        self.solver = solver
        if channels_last not in ("auto", True, False):
            raise ValueError(f'channels_last: expected "auto", True or False, got {channels_last!r}')
        self.channels_last = channels_last
        self._conv2d_model = isinstance(model, torch.nn.Module) and any(
            isinstance(m, torch.nn.Conv2d) for m in model.modules()
        )
        self.skip = skip
        if isinstance(skip, str) and skip == "logsnr":
            self._tau = solvers.logsnr_timesteps(schedule, steps)
        else:
            self._tau = select_timesteps(schedule.T, steps, skip)
        self.steps = steps
        self._tables64 = {
            "sample": step_table(schedule, self._tau, eta),
            "decode": step_table(schedule, self._tau, 0.0),
            "encode": inverse_step_table(schedule, self._tau),
        }
        if solver != "ddim":  # sample and decode (eta = 0) run the multistep table; encode stays DDIM inversion
            self._tables64["multistep"] = solvers.multistep_table(schedule, self._tau, solver)
        self._device_cache: Dict[tuple, torch.Tensor] = {}
        self._graphs = None  # ddim_fast.graphs.GraphCache, created on first CUDA use

    @classmethod
    def from_diffusers(cls, unet_or_pipeline, scheduler=None, **options) -> "FusedSampler":
        """A sampler for a diffusers UNet (or pipeline) that reproduces its scheduler's loop.

        ``scheduler`` defaults to the pipeline's: a DDIM/DDPM scheduler gives DDIM options, a
        ``DPMSolverMultistepScheduler`` (dpmsolver++) the multistep solver of its order on its
        own timesteps. Its betas, T, prediction type, timestep spacing/offset and clipping become
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

    # -- public properties ----------------------------------------------------------------
    @property
    def timesteps(self) -> torch.Tensor:
        """tau as an int64 tensor, descending: the model timestep of each step, first step first."""
        return torch.from_numpy(self._tau[::-1].copy())

    @property
    def num_steps(self) -> int:
        return int(self._tau.size)

    def __repr__(self) -> str:
        return (
            f"FusedSampler(steps={self.num_steps}, solver={self.solver!r}, eta={self.eta!r}, skip={self.skip!r}, "
            f"prediction={self.prediction!r}, backend={self.backend!r}, precision={self.precision!r}, schedule={self.schedule!r})"
        )

    # -- public API -------------------------------------------------------------------------
    def sample(
        self,
        x_T: Optional[torch.Tensor] = None,
        *,
        shape: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
        batch_offset: int = 0,
        device: Union[str, torch.device, None] = None,
        return_trajectory: bool = False,
        progress: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        uncond_kwargs: Optional[Dict[str, Any]] = None,
    ):
        """Run the generative process x_T -> x_0 (Eq. 12 at every step of tau).

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
            self._check_kwargs(model_kwargs, "model_kwargs") if model_kwargs is not None else self.model_kwargs,
            self._check_kwargs(uncond_kwargs, "uncond_kwargs") if uncond_kwargs is not None else self.uncond_kwargs,
        )
        return self._generate("sample", x_T, shape, seed, noise, batch_offset, device, return_trajectory, progress, kwargs)

    def decode(
        self,
        x_T: torch.Tensor,
        *,
        device: Union[str, torch.device, None] = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ):
        """x_T -> x_0 with the deterministic process (eta = 0) and the sampler's solver, the inverse of ``encode``."""
        if x_T is None:
            raise ValueError("x_T: decode needs a latent tensor")
        return self._generate(
            "decode", x_T, None, None, None, 0, device, return_trajectory, progress, (self.model_kwargs, self.uncond_kwargs)
        )

    def encode(
        self,
        x0: torch.Tensor,
        *,
        eta: Union[float, str, None] = None,
        device: Union[str, torch.device, None] = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ):
        """x_0 -> x_T by DDIM inversion along tau (the ODE of Eq. 14 integrated forward in t).

        This is DDIM inversion whatever the ``solver``: a multistep method run backwards is not
        its own inverse, and its first step would start at alpha = 1 with no history. With a
        multistep solver, decode(encode(x0)) therefore pairs a first-order encoding with a
        higher-order decoding; both approximate the same ODE.

        Inversion exists only for the deterministic process: ``eta`` (the sampler's when not
        given) must be 0.
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
        x0 = self._check_latent(x0, "x0")
        return self._generate(
            "encode", x0, None, None, None, 0, device, return_trajectory, progress, (self.model_kwargs, self.uncond_kwargs)
        )

    # -- preparation --------------------------------------------------------------------------
    @staticmethod
    def _clip_value(clip_x0) -> float:
        if clip_x0 is None or clip_x0 is False:
            return 0.0
        if clip_x0 is True:
            return 1.0
        if isinstance(clip_x0, (int, float)) and math.isfinite(clip_x0) and clip_x0 > 0:
            return float(clip_x0)
        raise ValueError(f"clip_x0: expected None, True (clamp x0 to [-1, 1]) or a positive float, got {clip_x0!r}")

    @staticmethod
    def _check_kwargs(kwargs, name: str) -> Dict[str, Any]:
        if kwargs is None:
            return {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(f"{name}: expected a dict of keyword arguments for the model, got {type(kwargs).__name__}")
        return dict(kwargs)

    def _prepare_kwargs(self, kwargs, B: int, device: torch.device) -> Dict[str, Any]:
        """The model's keyword arguments on ``device``; with guidance, [conditional, unconditional] batched."""
        cond, uncond = kwargs
        cond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}
        if self.guidance_scale is None:
            return cond
        uncond = {k: v.to(device) if torch.is_tensor(v) else v for k, v in uncond.items()}
        if set(cond) != set(uncond):
            raise ValueError(
                f"uncond_kwargs: guidance needs the same keys as model_kwargs, got {sorted(uncond)} vs {sorted(cond)}"
            )
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

    @staticmethod
    def _check_latent(x, name: str) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 1 or x.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty tensor of shape (B, ...), got {tuple(x.shape)}")
        return x

    def _model_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if self.precision != "auto":
            return _DTYPES[self.precision]
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and _cpu_has_native_bf16():
            return torch.bfloat16
        return None

    def _device_table(self, kind: str, device: torch.device) -> torch.Tensor:
        key = (kind, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = self._tables64[kind].to(device=device, dtype=torch.float32)
        return self._device_cache[key]

    def _plan(self, kind, B, device, seed, batch_offset, noise, kwargs=None) -> _Plan:
        table_kind = "multistep" if kind != "encode" and self.solver != "ddim" else kind
        tau = self._tau if kind == "encode" else self._tau[::-1]
        t_host = np.ascontiguousarray(tau)
        guided = self.guidance_scale is not None
        t_steps = torch.as_tensor(t_host, device=device)[:, None].expand(-1, 2 * B if guided else B).contiguous()
        table64 = self._tables64[table_kind]
        stochastic = (False,) * len(t_host)  # multistep solvers are deterministic
        if table_kind != "multistep":
            stochastic = tuple(bool(s > 0) for s in table64[:, 4].tolist())
        seed_t = torch.tensor([int(seed or 0), int(batch_offset)], dtype=torch.int64, device=device)
        return _Plan(
            kind=kind,
            table=self._device_table(table_kind, device),
            t_steps=t_steps,
            t_host=t_host,
            stochastic=stochastic,
            seed=seed_t,
            noise=noise,
            backend=ops.resolve_backend(self.backend, device),
            model_dtype=self._model_dtype(device),
            model_kwargs=self._prepare_kwargs(kwargs or ({}, {}), B, device),
            guidance_scale=self.guidance_scale,
            solver=self.solver if table_kind == "multistep" else "ddim",
        )

    def _generate(self, kind, x_T, shape, seed, noise, batch_offset, device, return_trajectory, progress, kwargs=None):
        S = self.num_steps
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
        if isinstance(batch_offset, bool) or not isinstance(batch_offset, (int, np.integer)) or batch_offset < 0:
            raise ValueError(f"batch_offset: expected a non-negative integer, got {batch_offset!r}")
        if shape is not None:
            try:
                shape = tuple(int(s) for s in shape)
            except TypeError:
                raise ValueError(f"shape: expected a sequence of positive integers, got {shape!r}") from None
            if len(shape) < 1 or any(s < 1 for s in shape):
                raise ValueError(f"shape: expected a sequence of positive integers (B, ...), got {shape!r}")
        if x_T is not None:
            x_T = self._check_latent(x_T, "x_T")
            if shape is not None and tuple(x_T.shape) != shape:
                raise ValueError(f"shape: {shape} disagrees with x_T's shape {tuple(x_T.shape)}; give one of them")
            shape = tuple(x_T.shape)
            dev = torch.device(device) if device is not None else x_T.device
        else:
            if shape is None:
                raise ValueError("shape: give x_T, or shape (and optionally seed) to draw x_T")
            dev = torch.device(device) if device is not None else _model_device(self.model)
        needs_seed = x_T is None or (kind == "sample" and noise is None and any(self._tables64["sample"][:, 4] > 0))
        if seed is None and needs_seed:
            # Unseeded runs follow torch's global generator, so torch.manual_seed makes them reproducible.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if noise is not None:
            if kind != "sample":
                raise ValueError(f"noise: only sample() takes explicit noise, not {kind}()")
            if not torch.is_tensor(noise) or tuple(noise.shape) != (S, *shape):
                got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
                raise ValueError(f"noise: expected shape (S={S}, *{shape}) = {(S, *shape)}, got {got}")
            noise = noise.to(device=dev, dtype=torch.float32).contiguous()

        plan = self._plan(kind, shape[0], dev, seed, batch_offset, noise, kwargs)
        if x_T is None:
            x_start = ops.gaussian(
                seed, shape, stream=reference.STREAM_X_T, sample_offset=batch_offset, device=dev, backend=plan.backend
            )
        else:
            x_start = x_T.detach().to(device=dev, dtype=torch.float32)
            if not bool(torch.isfinite(x_start).all()):
                raise ValueError(f"{'x0' if kind == 'encode' else 'x_T'}: contains NaN or infinite values")
        with torch.inference_mode():
            graph_runner = self._graph_runner(dev)
            result = graph_runner.run(self, plan, x_start, return_trajectory) if graph_runner is not None else None
            if result is None:  # no CUDA, graphs off, or this configuration failed to capture
                result = self._buffers(plan, x_start, return_trajectory)
                self._loop(plan, result, progress)
        self._check_finite(plan, result.flags)
        # Cloned outside inference mode: the caller gets ordinary tensors (usable with autograd).
        return self._result(result, plan, return_trajectory)

    # -- the loop ---------------------------------------------------------------------------------
    def _buffers(self, plan: _Plan, x_start: torch.Tensor, record: bool) -> "_Buffers":
        S = len(plan.t_host)
        shape = tuple(x_start.shape)
        dev = x_start.device
        if record:
            xs = torch.empty((S + 1, *shape), dtype=torch.float32, device=dev)
            x0s = torch.empty((S, *shape), dtype=torch.float32, device=dev)
        else:
            # One state buffer updated in place: the step reads x_t[i] and writes x_prev[i] in the
            # same pass (17 vs 22 us a step for 64x3x32x32 with the C++ kernel: one buffer less traffic).
            xs = torch.empty((1, *shape), dtype=torch.float32, device=dev)
            x0s = None
        xs[0].copy_(x_start)
        flags = torch.zeros((S, shape[0]), dtype=torch.float32, device=dev)
        guided = plan.guidance_scale is not None
        model_shape = (2 * shape[0], *shape[1:]) if guided else shape  # [conditional; unconditional]
        x_model = guided_out = None
        if self._use_channels_last(dev, shape, plan.model_dtype):
            x_model = torch.empty(model_shape, dtype=torch.float32, device=dev).contiguous(memory_format=torch.channels_last)
        elif guided:
            x_model = torch.empty(model_shape, dtype=torch.float32, device=dev)
        if guided:
            guided_out = torch.empty(shape, dtype=torch.float32, device=dev)
        model_out = torch.empty(model_shape, dtype=plan.model_dtype or torch.float32, device=dev)
        history = None
        if plan.solver != "ddim":  # ring of x0-predictions; a slot is written before any step reads it
            history = torch.empty((solvers.HISTORY_SLOTS[plan.solver], *shape), dtype=torch.float32, device=dev)
        return _Buffers(
            xs=xs, x0s=x0s, flags=flags, record=record, x_model=x_model, model_out=model_out, guided_out=guided_out,
            history=history,
        )  # fmt: skip

    def _use_channels_last(self, device: torch.device, shape, model_dtype: Optional[torch.dtype]) -> bool:
        if len(shape) != 4 or self.channels_last is False:
            return False
        # On CUDA, cuDNN's NHWC convolutions are the fast path for fp16. On CPUs (oneDNN), measured
        # with paired rounds on a 2-core AVX-512 machine: fp32 UNets gain (diffusers UNet2DModel 5.4M,
        # 8x3x32x32: 108 -> 100 ms a step, 1.08x; the embedded digits UNet 1.02x), bf16 autocast
        # does not (GroupNorm's channels-last bf16 kernel eats the convolutions' gain: 0.94-1.0x).
        # "auto" only for modules built on 2-D convolutions: a model that .view()s its input needs
        # it contiguous, and NHWC only helps convolutions.
        if self.channels_last is True:
            return True
        return (device.type == "cuda" or model_dtype is None) and self._conv2d_model

    def _loop(self, plan: _Plan, bufs: "_Buffers", progress: bool = False, capturing: bool = False) -> None:
        """The trajectory: S model calls and S fused steps into preallocated buffers, no host sync.

        The same code runs eagerly (CPU, or CUDA without graphs) and under CUDA-graph capture.
        Autocast is entered once for the whole loop so that weight casts are cached across steps;
        the cache is off while capturing (cached casts would be freed after capture).
        """
        S = len(plan.t_host)
        pred = reference.PREDICTIONS[self.prediction]
        autocast = (
            torch.autocast(device_type=bufs.xs.device.type, dtype=plan.model_dtype, cache_enabled=not capturing)
            if plan.model_dtype is not None
            else contextlib.nullcontext()
        )
        steps = range(S)
        if progress and not capturing:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"ddim_fast {plan.kind}", unit="step")
        with torch.inference_mode(), autocast:
            for k in steps:
                x_cur, x_next = bufs.slot(k)
                x_in = x_cur
                if bufs.x_model is not None:  # channels_last and/or [cond; uncond] copy of x_t for the model
                    bufs.x_model.unflatten(0, (-1, x_cur.shape[0])).copy_(x_cur.unsqueeze(0).expand(len(bufs.x_model) // len(x_cur), *x_cur.shape))
                    x_in = bufs.x_model
                out = self.adapter(x_in, plan.t_steps[k], k, int(plan.t_host[k]), plan.model_kwargs)
                if not out.is_contiguous():
                    bufs.model_out.copy_(out)
                    out = bufs.model_out
                if plan.guidance_scale is not None:  # classifier-free guidance, in float32, no allocation
                    B = x_cur.shape[0]
                    g = bufs.guided_out
                    g.copy_(out[:B]).sub_(out[B:]).mul_(plan.guidance_scale).add_(out[B:])
                    out = g
                torch.sum(out.reshape(out.shape[0], -1), dim=1, dtype=torch.float32, out=bufs.flags[k])
                if bufs.history is not None:  # a multistep solver (ddim_fast.solvers): same pass, plus the x0 ring
                    ops.fused_multistep_step(
                        x_cur, out, plan.table, k, pred, self.clip_x0, bufs.history, x_next,
                        bufs.x0s[k] if bufs.x0s is not None else None, plan.backend,
                    )  # fmt: skip
                    continue
                ops.fused_step(
                    x_cur,
                    out,
                    plan.table,
                    k,
                    plan.seed,
                    pred,
                    self.clip_x0,
                    plan.stochastic[k],
                    plan.noise[k] if plan.noise is not None else None,
                    x_next,
                    bufs.x0s[k] if bufs.x0s is not None else None,
                    plan.backend,
                )

    def _check_finite(self, plan: _Plan, flags: torch.Tensor) -> None:
        bad = ~torch.isfinite(flags).all(dim=1)
        if bool(bad.any()):  # the one host sync of a trajectory
            k = int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"model returned NaN or infinite values at step {k} (timestep {int(plan.t_host[k])}) of {plan.kind}"
            )

    def _result(self, bufs: "_Buffers", plan: _Plan, record: bool):
        S = len(plan.t_host)
        final = bufs.xs[S] if record else bufs.xs[0]
        if not record:
            return final.clone()
        return Trajectory(
            x0=final.clone(), xs=bufs.xs.clone(), x0_preds=bufs.x0s.clone(), timesteps=torch.from_numpy(plan.t_host.copy())
        )

    def _graph_runner(self, device: torch.device):
        if self.cuda_graph is False:
            return None
        if self._graphs is None:
            if device.type != "cuda":
                return None
            from ddim_fast import graphs

            self._graphs = graphs.GraphCache()
        return self._graphs if device.type in self._graphs.device_types else None

    def reset(self) -> None:
        """Drop cached CUDA graphs and device tables (their memory is released)."""
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = None
        self._device_cache.clear()


@dataclasses.dataclass
class _Buffers:
    xs: torch.Tensor  # (S + 1, ...) when recording, else (1, ...) updated in place
    x0s: Optional[torch.Tensor]
    flags: torch.Tensor  # (S, B) float32 per-sample sums of the model output
    record: bool
    x_model: Optional[torch.Tensor] = None  # channels_last copy of x_t fed to the model
    model_out: Optional[torch.Tensor] = None  # contiguous copy of a strided model output
    guided_out: Optional[torch.Tensor] = None  # float32 eps_u + s (eps_c - eps_u) under guidance
    history: Optional[torch.Tensor] = None  # (H, ...) float32 ring of x0-predictions (multistep solvers)

    def slot(self, k: int):
        if self.record:
            return self.xs[k], self.xs[k + 1]
        return self.xs[0], self.xs[0]  # in place


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
