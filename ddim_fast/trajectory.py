"""One trajectory: a self-contained plan, the buffers it runs on, and the one loop that runs it.

A ``Plan`` holds everything a trajectory needs: the solver's coefficient table on the device,
the timesteps, the prediction type and clip value, the seed and batch offset, explicit noise,
the model (wrapped for guidance and channels-last input, each wrapper owning its buffers) with
its conditioning, the autocast dtype, and the concrete backend. ``run`` executes it on
preallocated ``Buffers``: per step one model call and one call of the fused op, nothing read on
the host, so the same function runs eagerly and under CUDA-graph capture (``ddim_fast.graphs``,
which keys its graphs on ``Plan.graph_key``).

The finite check is in the op: it sets ``flags[k]`` when the model output or the new state has
a non-finite element, and ``check_finite`` reads the flags once per trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np
import torch

from ddim_fast import layout, ops

_MODEL_DTYPES = frozenset(ops.MODEL_DTYPES)

__all__ = ["Plan", "Buffers", "Trajectory", "ModelCall", "CastWeights", "Guided", "ChannelsLast", "allocate", "run", "check_finite",
           "result"]


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


# ---------------------------------------------------------------------------------------------
# the model, as the loop calls it: model(x, t, k, kwargs) -> a contiguous tensor of x's shape
# ---------------------------------------------------------------------------------------------


class ModelCall:
    """A user's ``model(x, t, **kwargs)`` under the conventions of DESIGN.md, its output checked.

    The output may be a tensor, a tuple whose first item is one, or an object/dict with
    ``.sample``; learned-variance models' 2C channels are sliced to C. A strided output (that
    slice, or a channels-last result) is copied into a contiguous buffer of its OWN dtype, so a
    float32 output is never rounded through a low-precision buffer.
    """

    def __init__(self, model: Callable):
        self.model = model
        self._contiguous: Dict[tuple, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, k: int, kwargs: Dict[str, Any]) -> torch.Tensor:
        out = self.model(x, t, **kwargs)
        if type(out) is torch.Tensor and out.shape == x.shape and out.dtype in _MODEL_DTYPES and out.is_contiguous():
            return out  # the common case, checked in ~1 us
        return self._conform(out, x, t, k)

    def _conform(self, out, x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[0] if len(out) else None
        elif isinstance(out, dict) and "sample" in out:
            out = out["sample"]
        elif not torch.is_tensor(out) and hasattr(out, "sample"):
            out = out.sample
        if not torch.is_tensor(out):
            raise TypeError(
                f"model returned {type(out).__name__} at step {k} (timestep {int(t[0])}); expected a tensor, "
                "a tuple whose first item is a tensor, or an object with .sample"
            )
        if out.shape != x.shape:
            # Models with a learned variance (improved DDPM, guided diffusion) return 2C channels.
            if out.ndim == x.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
                out = out[:, : x.shape[1]]
            else:
                raise ValueError(
                    f"model returned shape {tuple(out.shape)} at step {k} (timestep {int(t[0])}); "
                    f"expected the input's shape {tuple(x.shape)}"
                )
        if out.dtype not in _MODEL_DTYPES:
            raise TypeError(
                f"model returned dtype {out.dtype} at step {k} (timestep {int(t[0])}); expected float32, "
                "float16, bfloat16 or float64"
            )
        if not out.is_contiguous():
            key = (out.dtype, tuple(out.shape), out.device)
            buf = self._contiguous.get(key)
            if buf is None:
                buf = self._contiguous[key] = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            out = buf.copy_(out)
        return out


class CastWeights:
    """A user's module run with its float32 parameters cast ONCE to ``dtype``, under the same autocast.

    Autocast casts every weight again at every call inside ``torch.inference_mode``, where the
    sampler runs the model (its weight cache does not apply there); holding bf16 copies instead ran the bench UNet 1.10x
    faster a call eagerly and 1.14x compiled on a CPU with AMX (a 20-step trajectory: 1.06x and
    1.08x), with the same images (docs/results/compile.md).
    The module itself is never modified: ``torch.func.functional_call`` runs it with the copies in
    place of its parameters, and autocast stays on around it, so its buffers, the tensors it makes
    itself and autocast's float32 ops behave as under autocast alone. ``refresh()`` (once per
    trajectory, outside capture) casts again what changed since (a parameter trained, loaded or
    replaced: its identity, storage and version counter are compared), in place where the shape
    is unchanged. A module that fails with the copies but not without them is run plainly, under
    autocast, from then on, after one warning. Memory: one ``dtype`` copy of the parameters.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.module, self.dtype = module, dtype
        self.cast: Dict[str, torch.Tensor] = {}
        self.failed: Optional[str] = None
        self._key: Optional[tuple] = None
        self.refresh()

    def refresh(self) -> None:
        params = [(n, p) for n, p in self.module.named_parameters() if p.dtype == torch.float32]
        # Parameters made under torch.inference_mode have no version counter: cast again every call.
        key = None if any(p.is_inference() for _, p in params) else tuple(
            (n, id(p), p.data_ptr(), p._version, p.device) for n, p in params
        )
        if key is not None and key == self._key:
            return
        cast = {}
        with torch.no_grad():
            for name, p in params:
                c = self.cast.get(name)
                if c is not None and c.shape == p.shape and c.device == p.device:
                    cast[name] = c.copy_(p)  # the same storage: a captured graph keeps reading it
                else:
                    cast[name] = p.detach().to(self.dtype)
        self.cast, self._key = cast, key

    def call(self, *args, **kwargs):
        """The module with the cast parameters."""
        return torch.func.functional_call(self.module, self.cast, args, kwargs, strict=False)

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.module(*args, **kwargs)
        try:
            return self.call(*args, **kwargs)
        except Exception as exc:
            # If the plain module fails too, the inputs are at fault: that error is raised, and the
            # copies stay in use.
            out = self.module(*args, **kwargs)
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(f"ddim_fast: the model failed with its weights cast to {self.dtype} once ({self.failed}); "
                          "running it under autocast alone from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
            return out

    def __getattr__(self, name):
        if name in ("module", "dtype", "cast", "failed", "_key"):
            raise AttributeError(name)  # not yet set (during __init__): never recurse
        return getattr(self.module, name)


class Guided:
    """Classifier-free guidance in one batched call: [x; x] -> eps_u + s (eps_c - eps_u), float32.

    The conditioning of ``inner`` is [conditional; unconditional] batched along dim 0.
    """

    def __init__(self, inner: Callable, scale: float, shape, device, memory_format=torch.contiguous_format):
        self.inner = inner
        self.scale = scale
        self.x_model = torch.empty((2 * shape[0], *shape[1:]), dtype=torch.float32, device=device).contiguous(
            memory_format=memory_format
        )
        self.out = torch.empty(shape, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, k: int, kwargs: Dict[str, Any]) -> torch.Tensor:
        B = x.shape[0]
        self.x_model[:B].copy_(x)
        self.x_model[B:].copy_(x)
        m = self.inner(self.x_model, t, k, kwargs)
        return self.out.copy_(m[:B]).sub_(m[B:]).mul_(self.scale).add_(m[B:])


class ChannelsLast:
    """Feeds the model an NHWC copy of x (cuDNN's and oneDNN's fast convolution layout)."""

    def __init__(self, inner: Callable, shape, device):
        self.inner = inner
        self.x_model = torch.empty(shape, dtype=torch.float32, device=device).contiguous(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, k: int, kwargs: Dict[str, Any]) -> torch.Tensor:
        return self.inner(self.x_model.copy_(x), t, k, kwargs)


# ---------------------------------------------------------------------------------------------
# the plan and its buffers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything one trajectory needs, prepared before its first step."""

    kind: str  # "sample", "decode" or "encode" (messages)
    table: torch.Tensor  # (S, layout.NUM_COLUMNS) float32 on the device
    history_kind: int  # layout.HISTORY_KINDS
    history_slots: int  # R of the ring (0: none)
    uses_saved: bool  # the table reads/writes a saved state
    timesteps: torch.Tensor  # (S, B_model) int64 on the device: the model's timestep at each step
    t_host: np.ndarray  # (S,) the same on the host, for messages
    prediction: int  # layout.PREDICTIONS
    clip: float  # > 0 clamps x0
    seed: torch.Tensor  # (2,) int64 on the device: (seed, batch offset)
    noise: Optional[torch.Tensor]  # (S, *shape) float32 or None
    model: Callable  # model(x, t, k, kwargs) -> contiguous output of x's shape (ModelCall, maybe wrapped)
    model_kwargs: Dict[str, Any]  # the model's conditioning (a captured graph's static copies get new values)
    autocast_dtype: Optional[torch.dtype]  # autocast around the model, None = as given
    backend: str  # concrete: "torch", "cpp" or "triton"
    table_key: tuple  # what the table is computed from (solver, eta, tau, kind)
    model_key: tuple = ()  # the model's identity and wrapping

    @property
    def steps(self) -> int:
        return len(self.t_host)

    def graph_key(self, x_start: torch.Tensor, record: bool) -> tuple:
        """What a captured trajectory depends on; everything else is read from static buffers."""
        kwargs = tuple(
            (k, (tuple(v.shape), str(v.dtype), str(v.device)) if torch.is_tensor(v) else repr(v))
            for k, v in sorted(self.model_kwargs.items())
        )
        return (
            self.table_key, self.model_key, tuple(x_start.shape), str(x_start.device), str(self.autocast_dtype),
            self.backend, self.prediction, self.clip, bool(record), self.noise is not None, kwargs,
        )  # fmt: skip


@dataclasses.dataclass
class Buffers:
    xs: torch.Tensor  # (S + 1, ...) when recording, else (1, ...) updated in place
    x0s: Optional[torch.Tensor]  # (S, ...) x0-predictions when recording
    flags: torch.Tensor  # (S, 2) int32 finite flags written by the op
    history: Optional[torch.Tensor]  # (R, ...) float32 ring
    saved: Optional[torch.Tensor]  # float32 predictor-corrector state

    def state(self, k: int):
        """(x_t, where x_next goes): the same buffer when not recording (the op updates in place)."""
        if self.x0s is None:
            return self.xs[0], self.xs[0]
        return self.xs[k], self.xs[k + 1]


def allocate(plan: Plan, x_start: torch.Tensor, record: bool) -> Buffers:
    """Buffers of one trajectory, x_start copied in. Not recording, one state buffer is updated in
    place (17 vs 22 us a step for 64x3x32x32 with the C++ kernel: one buffer less of traffic)."""
    S, shape, dev = plan.steps, tuple(x_start.shape), x_start.device
    xs = torch.empty((S + 1 if record else 1, *shape), dtype=torch.float32, device=dev)
    xs[0].copy_(x_start)
    return Buffers(
        xs=xs,
        x0s=torch.empty((S, *shape), dtype=torch.float32, device=dev) if record else None,
        flags=torch.zeros((S, 2), dtype=torch.int32, device=dev),
        history=torch.empty((plan.history_slots, *shape), dtype=torch.float32, device=dev) if plan.history_slots else None,
        saved=torch.empty(shape, dtype=torch.float32, device=dev) if plan.uses_saved else None,
    )


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def run(plan: Plan, bufs: Buffers, progress: bool = False, capturing: bool = False, stop: Optional[int] = None) -> None:
    """S model calls and S fused steps on preallocated buffers, no host sync (eager or captured);
    with ``stop``, only the first ``stop`` (the buffers then hold the state step ``stop`` starts from).

    Autocast is entered once for the whole loop so that weight casts are cached across steps;
    the cache is off while capturing (cached casts would be freed after capture).
    """
    autocast = contextlib.nullcontext()
    if plan.autocast_dtype is not None:
        autocast = torch.autocast(bufs.xs.device.type, dtype=plan.autocast_dtype, cache_enabled=not capturing)
    steps = range(plan.steps if stop is None else stop)
    if progress and not capturing:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"ddim_fast {plan.kind}", unit="step")
    record, none = bufs.x0s is not None, (None,) * plan.steps
    step = ops.step_impl(plan.backend)  # resolved once: the loop calls the backend's function itself
    with torch.inference_mode(), autocast:
        # Views made once (unbind is one call for all steps): the loop body is the model call and the op.
        states = bufs.xs.unbind(0)
        ts = plan.timesteps.unbind(0)
        noise = none if plan.noise is None else plan.noise.unbind(0)
        x0s = none if not record else bufs.x0s.unbind(0)
        for k in steps:
            x, x_next = (states[k], states[k + 1]) if record else (states[0], states[0])
            out = plan.model(x, ts[k], k, plan.model_kwargs)
            args = (
                x, out, plan.table, k, plan.seed, plan.prediction, plan.clip, plan.history_kind, bufs.history,
                bufs.saved, noise[k], x_next, x0s[k], bufs.flags,
            )  # fmt: skip
            if k == 0:  # the one validation, once per trajectory (the model's output dtype is known now)
                ops.check_step_args(*args)
            step(*args)


def check_finite(plan: Plan, bufs: Buffers, x_start: torch.Tensor) -> None:
    """The one host sync of a trajectory: the first step whose flags are set becomes an error
    naming what is wrong: the input (x_T / x0, explicit noise), the model, or the state."""
    bad = bufs.flags.any(dim=1)
    if not bool(bad.any()):
        return
    start = "x0" if plan.kind == "encode" else "x_T"
    # The inputs are checked only now, when something went wrong: no extra pass in the normal case.
    if not bool(torch.isfinite(x_start).all()):
        raise ValueError(f"{start}: contains NaN or infinite values")
    if plan.noise is not None and not bool(torch.isfinite(plan.noise).all()):
        raise ValueError("noise: contains NaN or infinite values")
    k = int(torch.nonzero(bad)[0, 0])
    where = f"step {k} (timestep {int(plan.t_host[k])}) of {plan.kind}"
    if bool(bufs.flags[k, layout.FLAG_MODEL]):
        raise FloatingPointError(f"model returned NaN or infinite values at {where}")
    raise FloatingPointError(
        f"the state became NaN or infinite at {where}, though the model output was finite: the input {start} "
        f"(max |value| {float(x_start.abs().max()):.3g}) times the step's coefficients overflows float32; "
        f"scale {start} down"
    )


def result(plan: Plan, bufs: Buffers, copy: bool = True):
    """The final state, or the whole ``Trajectory`` when the buffers recorded one; ``copy=False``
    hands out the buffers themselves (fresh ones that nothing else will write)."""
    clone = torch.Tensor.clone if copy else (lambda t: t)
    if bufs.x0s is None:
        return clone(bufs.xs[0])
    return Trajectory(
        x0=clone(bufs.xs[plan.steps]), xs=clone(bufs.xs), x0_preds=clone(bufs.x0s),
        timesteps=torch.from_numpy(plan.t_host.copy()),
    )  # fmt: skip
