"""Capture of a whole trajectory (every model call and every fused step) as one CUDA graph.

The trajectory loop (``ddim_fast.trajectory.run``) already runs on static buffers: the states x_t
live in a preallocated ping-pong (or trajectory) buffer, the per-step timestep tensors and the
coefficient table are on the device before the first step, the seed is read from device memory
by the kernels, and nothing reads a device value on the host. This module runs that same loop
under ``torch.cuda.graph`` once per configuration and replays it afterwards:

- one entry per ``Plan.graph_key`` (the table, the model and its wrapping, the shape, precision,
  backend, recording, explicit noise, the shapes of the conditioning tensors); the cache lives
  on the sampler, which owns the model;
- inputs (x_T, the seed and batch offset, explicit noise, conditioning) are copied into the entry's static
  buffers before each replay, so a new seed draws new noise without recapture;
- the first call warms up on a side stream (cuDNN/cuBLAS autotuning, lazy init) and returns
  that eager result; the capture uses a private memory pool; outputs are cloned after replay;
- a capture that fails (a model that syncs with the host, an op that is not capturable) is
  remembered, reported in one warning that names the reason, and that configuration runs
  eagerly from then on.

Only ``_CudaCapturer`` touches CUDA; tests drive everything else on the CPU with a stand-in
capturer whose "graph" replays the loop eagerly.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, Optional

import torch

__all__ = ["GraphCache"]


class _CudaCapturer:
    """The CUDA-only part: warm-up stream, capture into a private pool, replay."""

    device_types = frozenset({"cuda"})

    def __init__(self):
        self.pool = None

    def warmup(self, fn: Callable[[], None]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph.replay


@dataclasses.dataclass
class _Entry:
    plan: object  # a static copy of the first plan: its seed/noise/conditioning tensors are the graph's inputs
    bufs: object  # trajectory.Buffers: static states, x0-predictions, ring and finite flags
    replay: Optional[Callable[[], None]] = None

    def load(self, plan, x_start: torch.Tensor) -> None:
        self.bufs.xs[0].copy_(x_start)
        self.bufs.flags.zero_()
        self.plan.seed.copy_(plan.seed)
        if plan.noise is not None:
            self.plan.noise.copy_(plan.noise)
        for key, value in plan.model_kwargs.items():  # conditioning tensors: same shapes (graph key)
            if torch.is_tensor(value):
                self.plan.model_kwargs[key].copy_(value)


class GraphCache:
    """Captured trajectories, keyed by ``Plan.graph_key``."""

    def __init__(self, capturer=None):
        self._capturer = capturer if capturer is not None else _CudaCapturer()
        self._entries: Dict[tuple, _Entry] = {}
        self._failed: Dict[tuple, str] = {}

    @property
    def device_types(self):
        """The device types whose trajectories this cache captures."""
        return self._capturer.device_types

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph and static buffer (their memory returns to the allocator)."""
        self._entries.clear()
        self._failed.clear()
        if hasattr(self._capturer, "pool"):
            self._capturer.pool = None

    def run(self, plan, x_start: torch.Tensor, record: bool):
        """The trajectory's buffers, or None when this configuration must run eagerly.

        The buffers are the entry's static ones: the caller clones what it returns before the
        next replay can overwrite them.
        """
        key = plan.graph_key(x_start, record)
        if key in self._failed:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return self._first_run(key, plan, x_start, record)
        entry.load(plan, x_start)
        entry.replay()
        return entry.bufs

    def _first_run(self, key, plan, x_start, record):
        from ddim_fast import trajectory

        static_plan = dataclasses.replace(
            plan,
            seed=plan.seed.clone(),
            noise=plan.noise.clone() if plan.noise is not None else None,
            model_kwargs={k: v.clone() if torch.is_tensor(v) else v for k, v in plan.model_kwargs.items()},
        )
        bufs = trajectory.allocate(static_plan, x_start, record)
        entry = _Entry(plan=static_plan, bufs=bufs)

        def loop():
            trajectory.run(static_plan, bufs, capturing=True)

        # Warm-up runs the real computation: its result is this call's answer.
        self._capturer.warmup(loop)
        result = dataclasses.replace(
            bufs,
            xs=bufs.xs.clone(),
            x0s=bufs.x0s.clone() if bufs.x0s is not None else None,
            flags=bufs.flags.clone(),
        )
        try:
            bufs.flags.zero_()  # the captured loop must start from clear flags
            entry.replay = self._capturer.capture(loop)
        except Exception as e:  # noqa: BLE001 - any capture failure means "run eagerly"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._failed[key] = reason
            warnings.warn(
                f"ddim_fast: CUDA graph capture failed ({reason}); this trajectory runs eagerly. "
                "Models that synchronize with the host (.item(), data-dependent Python control flow) cannot be captured; "
                "pass cuda_graph=False to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return result
        self._entries[key] = entry
        return result
