"""The one driver of every table: cached cells within a time budget.

A table is a list of cells, each a key and a function that computes it. ``run_cells`` walks
them in order, skips the ones already in the table's cache, and starts no new cell once the
time budget is spent. The cache (``<out-dir>/<table>_cells.json``, keyed by the model's
weight hash) is rewritten atomically after each cell, so a killed or time-boxed run resumes
where it stopped, and the Markdown / PNG outputs are rendered from whatever has finished.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

from ddim_fast.nn import model_fingerprint

__all__ = ["Cache", "run_cells", "load", "image_shape", "quantize", "eta_name", "atomic_json", "atomic_text", "make_sampler"]

_clock = time.monotonic  # the budget's clock (tests replace it)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def eta_name(eta) -> str:
    return "ddpm_large" if eta == "ddpm_large" else f"{float(eta):g}"


def atomic_json(path: str, obj: Any) -> None:
    from ddim_fast.data import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_text(path: str, text: str) -> None:
    from ddim_fast.data import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def load(ckpt: Optional[str], device: str = "cpu", weights: str = "ema"):
    """(model, schedule, description) of a checkpoint; None = the embedded digits model."""
    from ddim_fast.train import load_model, read_checkpoint

    model, schedule = load_model(ckpt, device=device, weights=weights)
    meta, _ = read_checkpoint(ckpt, verify=False)  # for the step only: a training run may have moved on since
    desc = {
        "ckpt": "embedded (ddim_fast/assets/digits.json)" if ckpt is None else str(ckpt),
        "weights": weights,
        "fingerprint": model_fingerprint(model),
        "train_step": meta.get("step"),
        "model": meta.get("model"),
    }
    return model, schedule, desc


def image_shape(model) -> Tuple[int, int, int]:
    cfg = getattr(model, "config", None) or {}
    return int(cfg.get("in_channels", 1)), int(cfg.get("resolution", 16)), int(cfg.get("resolution", 16))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> what a saved uint8 image holds, back in [-1, 1] (FID is computed on saved images)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().div(127.5).sub(1.0)


def make_sampler(model, schedule, options: Optional[Dict[str, Any]] = None, **kw):
    """``FusedSampler(model, schedule, **kw, **options)``: ``options`` (e.g. ``compile=True``)
    are a table's sampler settings that do not change what a cell measures."""
    from ddim_fast import FusedSampler

    return FusedSampler(model, schedule=schedule, **kw, **(options or {}))


class Cache:
    """``<table>_cells.json``: finished cells of one table for one model, rewritten atomically
    after each; ``path=None`` keeps them in memory (a table that must be measured afresh)."""

    def __init__(self, path: Optional[str], fingerprint: str, fresh: bool = False):
        self.path = path
        self.data = {"model": fingerprint, "cells": {}}
        if path is not None and os.path.isfile(path) and not fresh:
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path} is not a valid cell cache ({e}); pass --fresh to discard it") from None
            if old.get("model") != fingerprint:
                raise ValueError(
                    f"{path} holds results of another model ({old.get('model')}, this one is {fingerprint}); "
                    "pass --fresh to discard them or choose another --out-dir"
                )
            self.data = old

    @property
    def cells(self) -> Dict[str, Any]:
        return self.data["cells"]

    def put(self, key: str, value: Dict[str, Any], **extra) -> None:
        self.cells[key] = value
        self.data.update(extra)
        if self.path is not None:
            atomic_json(self.path, self.data)


def run_cells(name: str, cells: Iterable[Tuple[str, Callable[[], Dict[str, Any]]]], cache: Cache, *,
              max_minutes: Optional[float] = None, log: Optional[Callable[[str], None]] = log,
              describe: Optional[Callable[[str, Dict[str, Any]], str]] = None, **extra) -> int:
    """Compute the cells not yet in ``cache``, in order, each stored (with ``extra``) as soon as
    it is done; with ``max_minutes``, no cell starts after that long. Returns how many ran."""
    deadline = None if max_minutes is None else _clock() + 60.0 * max_minutes
    ran = 0
    for key, compute in cells:
        if key in cache.cells:
            continue
        if deadline is not None and _clock() > deadline:
            if log:
                log(f"{name}: time budget of {max_minutes} min used; stopping before {key}")
            break
        t0 = time.perf_counter()
        with torch.no_grad():
            cell = compute()
        cell["seconds"] = round(time.perf_counter() - t0, 2)
        cache.put(key, cell, **extra)
        ran += 1
        if log:
            log(f"{name}: {key}: " + (describe(key, cell) if describe else f"{cell['seconds']:.0f} s"))
    return ran
