"""The paper's experiments as commands: Table 1, Table 2, Figure 4, the figures, sampling at scale.

    ddim-fast eval table1  [--n 500] [--max-minutes M]   FD vs S x eta, "uniform" and "quad" (Table 1)
    ddim-fast eval table2  [--n 100]                     encode -> decode MSE vs S (Table 2)
    ddim-fast eval timing                                seconds per sample vs S (Figure 4)
    ddim-fast eval solvers [--n 1000]                    multistep solvers at S vs DDIM at 5 S (issue 8)
    ddim-fast figure consistency | interpolate | sequence             PNG grids (Figs. 5, 6, 7-8)
    torchrun --nproc_per_node W -m ddim_fast.cli sample --num-samples 50000 --npz out.npz
                                                         sharded, resumable, identical for any W

Every table caches its finished cells in ``<out-dir>/<table>_cells.json`` (written atomically
after each cell, keyed by the model's weight hash), so a killed or time-boxed run
(``--max-minutes``) resumes where it stopped, and the Markdown / PNG outputs are re-rendered
from whatever has finished.

Sharded sampling: sample i is a pure function of (seed, i) (DESIGN.md's noise contract,
``batch_offset`` = global index), so the images do not depend on how the work is split. The
unit of work is a shard of ``--shard-size`` consecutive indices; shards are dealt round-robin
to the torchrun ranks (gloo on CPUs), each written atomically as
``<npz>.shards/shard-<start>-<stop>.npz`` and skipped on a restart; rank 0 then concatenates
them into the final ``.npz`` (uint8 NHWC under ``arr_0``, written atomically with a ``meta``
JSON string) and removes the shard folder. Byte-identity holds for any number of processes
(the same shard is computed the same way); across batch sizes it holds as far as the model's
own kernels give batch-independent results (true of GroupNorm/conv UNets in float32 here,
not guaranteed by every BLAS).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "register",
    "main",
    "sample_npz",
    "table1",
    "table2",
    "timing",
    "figure_consistency",
    "figure_interpolate",
    "figure_sequence",
    "model_fingerprint",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
]

TABLE1_STEPS = (10, 20, 50, 100, 1000)
TABLE1_ETAS = (0.0, 0.2, 0.5, 1.0, "ddpm_large")
TABLE1_SKIPS = ("uniform", "quad")
TABLE2_STEPS = (10, 20, 50, 100, 200, 500, 1000)
TIMING_STEPS = (10, 20, 50, 100, 200, 500, 1000)
DEFAULT_OUT_DIR = os.path.join("docs", "results")
# Issue 8's comparison: each multistep cell at S against DDIM at 5S (the targets: S = 10 vs 50, 20 vs 100).
SOLVER_CELLS = (("dpmpp_3m", "logsnr", 10), ("dpmpp_2m", "logsnr", 10), ("ddim", "uniform", 10), ("ddim", "uniform", 50),
                ("dpmpp_3m", "logsnr", 20), ("dpmpp_2m", "logsnr", 20), ("ddim", "uniform", 20), ("ddim", "uniform", 100))

# Table 1 of the paper (FID of 50k samples), as transcribed in the slides (seeds/003).
# Rows: eta; "ddpm_large" is sigma-hat.
PAPER_TABLE1 = {
    "CIFAR10 (32x32)": {
        0.0: (13.36, 6.84, 4.67, 4.16, 4.04),
        0.2: (14.04, 7.11, 4.77, 4.25, 4.09),
        0.5: (16.66, 8.35, 5.25, 4.46, 4.29),
        1.0: (41.07, 18.36, 8.01, 5.78, 4.73),
        "ddpm_large": (367.43, 133.37, 32.72, 9.99, 3.17),
    },
    "CelebA (64x64)": {
        0.0: (17.33, 13.73, 9.17, 6.53, 3.51),
        0.2: (17.66, 14.11, 9.51, 6.79, 3.64),
        0.5: (19.86, 16.06, 11.01, 8.09, 4.28),
        1.0: (33.12, 26.03, 18.48, 13.93, 5.98),
        "ddpm_large": (299.71, 183.83, 71.71, 45.20, 3.26),
    },
}
# Table 2 of the paper (CIFAR-10 test set, per-dimension MSE in [0, 1]). Not in the seed copy
# (its tables were lost in extraction): quoted from the published paper (arXiv 2010.02502),
# to be checked against it.
PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_eta(text: Union[str, float]) -> Union[float, str]:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if text == "ddpm_large":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'eta: expected a float >= 0 or "ddpm_large", got {text!r}') from None


def _eta_name(eta) -> str:
    return "ddpm_large" if eta == "ddpm_large" else f"{float(eta):g}"


from ddim_fast.nn import model_fingerprint  # noqa: E402  (re-exported: the caches key on it)


def _load(ckpt: Optional[str], device: str = "cpu", weights: str = "ema"):
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


def _shape(model) -> Tuple[int, int, int]:
    cfg = getattr(model, "config", None) or {}
    return int(cfg.get("in_channels", 1)), int(cfg.get("resolution", 16)), int(cfg.get("resolution", 16))


def _atomic_json(path: str, obj: Any) -> None:
    from ddim_fast.data import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _atomic_text(path: str, text: str) -> None:
    from ddim_fast.data import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> what a saved uint8 image holds, back in [-1, 1] (FID is computed on saved images)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().div(127.5).sub(1.0)


def _sample_batched(sampler, n: int, shape: Tuple[int, int, int], seed: int, batch_size: int, offset: int = 0,
                    device=None) -> torch.Tensor:
    """Samples offset .. offset + n - 1 of ``seed`` (batch_offset = global index), on the CPU."""
    out = []
    for b in range(0, n, batch_size):
        bs = min(batch_size, n - b)
        out.append(sampler.sample(shape=(bs, *shape), seed=seed, batch_offset=offset + b, device=device).float().cpu())
    return torch.cat(out)


class _Cache:
    """``<table>_cells.json``: finished cells of one table for one model, rewritten atomically after each."""

    def __init__(self, path: str, fingerprint: str, fresh: bool = False):
        self.path = path
        self.data = {"model": fingerprint, "cells": {}}
        if os.path.isfile(path) and not fresh:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("model") != fingerprint:
                raise SystemExit(
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
        _atomic_json(self.path, self.data)


# --------------------------------------------------------------------------------------------
# sharded sampling (torchrun / gloo)
# --------------------------------------------------------------------------------------------
def _dist_env() -> Tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_npz_meta(path: str) -> Optional[Dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["meta"])) if "meta" in f.files else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def sample_npz(
    model: Callable,
    schedule,
    n: int,
    out: str,
    *,
    shape: Optional[Sequence[int]] = None,
    steps: int = 50,
    eta: Union[float, str] = 0.0,
    skip: Union[str, Sequence[int]] = "uniform",
    solver: str = "ddim",
    seed: int = 0,
    batch_size: int = 256,
    shard_size: int = 1000,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    precision: str = "auto",
    fingerprint: Optional[str] = None,
    keep_shards: bool = False,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Sample ``n`` images into ``out`` (uint8 (N, H, W, C) under ``arr_0``), sharded over the
    torchrun ranks of this job (one process without torchrun) and over batches; resumable.

    Returns a summary (on every rank); only rank 0 writes ``out``. Shard files of an earlier run
    with different settings are refused rather than mixed in.
    """
    from ddim_fast import FusedSampler
    from ddim_fast.data import NPZ_KEY, atomic_write_bytes, to_uint8

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n!r}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    shape = tuple(int(s) for s in (shape or _shape(model)))
    rank, world, _ = _dist_env()
    fingerprint = fingerprint or model_fingerprint(model)
    settings = {
        "model": fingerprint, "shape_chw": list(shape), "steps": int(steps), "eta": eta,
        "skip": skip if isinstance(skip, str) else [int(t) for t in skip], "solver": solver, "seed": int(seed),
        "shard_size": int(shard_size), "precision": precision,
        "T": int(schedule.T), "alphas_cumprod_sha256": hashlib.sha256(schedule.alphas_cumprod.numpy().tobytes()).hexdigest()[:16],
    }
    meta_final = {**settings, "n": int(n), "layout": "uint8 (N, H, W, C)", "index": f"{NPZ_KEY}[i] is sample i of (seed, i)"}
    out = os.fspath(out)
    t0 = time.perf_counter()
    if os.path.isfile(out) and _read_npz_meta(out) == meta_final:  # every rank sees it: all return
        if log and rank == 0:
            log(f"{out} is already complete ({n} images, same settings): nothing to do")
        return {"n": n, "computed_shards": 0, "skipped_shards": 0, "seconds": 0.0, "out": out, "rank": rank, "world": world, "complete": True}

    shard_dir = out + ".shards"
    manifest = os.path.join(shard_dir, "manifest.json")
    distributed = world > 1
    own_group = False
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            # A rank that finishes its shards early waits at the barrier: allow for long runs.
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))
            own_group = True
    try:
        if rank == 0:
            os.makedirs(shard_dir, exist_ok=True)
            if os.path.isfile(manifest):
                with open(manifest, encoding="utf-8") as f:
                    old = json.load(f)
                if old != settings:
                    raise ValueError(
                        f"{shard_dir} holds shards of different settings ({old}); delete it or choose another --npz path"
                    )
            else:
                _atomic_json(manifest, settings)
        if distributed:
            dist.barrier()

        sampler = FusedSampler(model, schedule=schedule, steps=steps, eta=eta, skip=skip, solver=solver, backend=backend,
                               precision=precision)
        shards = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
        computed = skipped = 0
        for j in range(rank, len(shards), world):
            start, stop = shards[j]
            path = os.path.join(shard_dir, f"shard-{start:09d}-{stop:09d}.npz")
            if os.path.isfile(path):
                try:
                    with np.load(path, allow_pickle=False) as f:
                        ok = f[NPZ_KEY].shape == (stop - start, shape[1], shape[2], shape[0])
                except (OSError, ValueError, KeyError, EOFError):
                    ok = False
                if ok:
                    skipped += 1
                    continue
            t_shard = time.perf_counter()
            with torch.no_grad():
                x = _sample_batched(sampler, stop - start, shape, seed, batch_size, offset=start, device=device)
            atomic_write_bytes(path, _npz_bytes(**{NPZ_KEY: to_uint8(x)}))
            computed += 1
            if log:
                log(f"rank {rank}/{world}: shard {start}..{stop} in {time.perf_counter() - t_shard:.1f} s")
        if distributed:
            dist.barrier()
        if rank == 0:
            parts = []
            for start, stop in shards:
                with np.load(os.path.join(shard_dir, f"shard-{start:09d}-{stop:09d}.npz"), allow_pickle=False) as f:
                    parts.append(f[NPZ_KEY])
            images = np.concatenate(parts)
            atomic_write_bytes(out, _npz_bytes(**{NPZ_KEY: images}, meta=np.array(json.dumps(meta_final))))
            if not keep_shards:
                shutil.rmtree(shard_dir, ignore_errors=True)
        if distributed:
            dist.barrier()
    finally:
        if own_group:
            dist.destroy_process_group()
    return {"n": n, "computed_shards": computed, "skipped_shards": skipped, "seconds": time.perf_counter() - t0,
            "out": out, "rank": rank, "world": world, "complete": False}


# --------------------------------------------------------------------------------------------
# Table 1: Frechet distance vs S and eta
# --------------------------------------------------------------------------------------------
def _cell_key(skip: str, S: int, eta, n: int, seed: int) -> str:
    return f"{skip}|S={S}|eta={_eta_name(eta)}|n={n}|seed={seed}"


def table1(
    model,
    schedule,
    *,
    n: int = 500,
    seed: int = 0,
    spread_seed: Optional[int] = 1,
    spread_steps: Sequence[int] = (10, 20, 50, 100),
    steps: Sequence[int] = TABLE1_STEPS,
    etas: Sequence[Union[float, str]] = TABLE1_ETAS,
    skips: Sequence[str] = TABLE1_SKIPS,
    batch_size: int = 250,
    out_dir: str = DEFAULT_OUT_DIR,
    fingerprint: Optional[str] = None,
    description: Optional[Dict[str, Any]] = None,
    max_minutes: Optional[float] = None,
    fresh: bool = False,
    extractor: Optional[Callable] = None,
    reference: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    shape: Optional[Sequence[int]] = None,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Fill (resuming) the Table 1 cells, then write table1.md / table1.png / table1_cells.json.

    Every cell draws samples 0..n-1 of the same ``seed``: the same x_T in every cell (common
    random numbers), so differences between cells are less noisy than one cell's spread. The
    second seed (``spread_seed``) is run for S in ``spread_steps`` and gives the spread that the
    table reports. Cells run cheapest first; with ``max_minutes`` no cell starts after that.
    ``extractor`` / ``reference`` (mu, sigma): another feature space and reference set than the
    digit classifier's and the 1,797 digits (``shape``: (C, H, W) when the model has no config).
    """
    from ddim_fast import FusedSampler
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = _Cache(os.path.join(out_dir, "table1_cells.json"), fingerprint, fresh=fresh)
    shape = tuple(shape) if shape is not None else _shape(model)
    ref = reference if reference is not None else metrics.reference_statistics(extractor)
    plan = []
    for sd in [seed] + ([spread_seed] if spread_seed is not None else []):
        for skip in skips:
            for S in steps:
                if sd != seed and S not in spread_steps:
                    continue
                for eta in etas:
                    n_steps = len(FusedSampler(model, schedule=schedule, steps=S, skip=skip).timesteps)
                    plan.append((sd != seed, n_steps, skip, S, eta, sd))
    # Cheapest first; at equal cost the main seed first, then eta = 0, 1, sigma-hat before the
    # intermediate etas (so a time-boxed run fills the paper's three key rows of the S = 1000 column).
    prio = {0.0: 0, 1.0: 1, "ddpm_large": 2}
    plan.sort(key=lambda p: (p[1], p[0], prio.get(p[4], 3)))
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    extra = {"n": n, "seed": seed, "spread_seed": spread_seed, "model_desc": description or {}, "extractor": "digit classifier" if extractor is None else repr(extractor)}
    for _, n_steps, skip, S, eta, sd in plan:
        key = _cell_key(skip, S, eta, n, sd)
        if key in cache.cells:
            continue
        if deadline is not None and time.monotonic() > deadline:
            if log:
                log(f"table1: time budget of {max_minutes} min used; stopping before {key}")
            break
        t0 = time.perf_counter()
        sampler = FusedSampler(model, schedule=schedule, steps=S, eta=eta, skip=skip)
        with torch.no_grad():
            x = _quantize(_sample_batched(sampler, n, shape, sd, batch_size))
        mu, sigma = metrics.feature_statistics(x, extractor)
        fd = metrics.frechet_distance(mu, sigma, *ref)
        cell = {"skip": skip, "S": S, "steps_run": n_steps, "eta": eta, "n": n, "seed": sd, "fd": fd,
                "seconds": round(time.perf_counter() - t0, 2)}
        if extractor is None:
            cell["labels"] = metrics.label_distribution(x)
        cache.put(key, cell, **extra)
        if log:
            log(f"table1: {key}: FD {fd:.3f} ({cell['seconds']:.0f} s)")
    # the real-data floor at this n: n digits drawn from the reference set itself
    floor_key = f"real|n={n}|seed={seed}"
    if floor_key not in cache.cells and reference is None:
        x_real, _ = metrics._digits()
        idx = np.random.default_rng(seed).choice(len(x_real), size=min(n, len(x_real)), replace=False)
        mu, sigma = metrics.feature_statistics(x_real[torch.as_tensor(idx)], extractor)
        cache.put(floor_key, {"fd": metrics.frechet_distance(mu, sigma, *ref), "n": int(len(idx))}, **extra)
    render_table1(cache.data, out_dir, n=n, seed=seed, spread_seed=spread_seed, steps=steps, etas=etas, skips=skips)
    return cache.data


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render_table1(data: Dict[str, Any], out_dir: str, *, n: int, seed: int, spread_seed: Optional[int],
                  steps=TABLE1_STEPS, etas=TABLE1_ETAS, skips=TABLE1_SKIPS) -> str:
    """table1.md (ours, the spread, mode coverage, the paper's) and table1.png from the cached cells."""
    cells = data["cells"]

    def get(skip, S, eta, sd):
        c = cells.get(_cell_key(skip, S, eta, n, sd))
        return None if c is None else c["fd"]

    lines = [f"Frechet distance in the digit classifier's 64-d feature space (lower is better), {n} samples per cell "
             f"(seed {seed}) against all 1,797 digits. Model: `{data.get('model')}`.", ""]
    floor = cells.get(f"real|n={n}|seed={seed}")
    header = "| eta \\ S | " + " | ".join(str(S) for S in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    for skip in skips:
        lines += [f"**tau = \"{skip}\"**", "", header, rule]
        for eta in etas:
            lines.append(f"| {_eta_name(eta) if eta != 'ddpm_large' else 'sigma-hat (ddpm_large)'} | "
                         + " | ".join(_fmt(get(skip, S, eta, seed)) for S in steps) + " |")
        lines.append("")
    if floor is not None and floor["n"] < n:
        lines += [f"Real-data floor: none at this n (the reference set has only {floor['n']} digits).", ""]
    elif floor is not None:
        lines += [f"Real-data floor: {floor['n']} real digits (a subset of the reference set) score {floor['fd']:.2f}; "
                  "this is mostly the estimator's finite-sample bias at this n.", ""]
    if spread_seed is not None:
        diffs = []
        lines += [f"**Spread: |FD(seed {seed}) - FD(seed {spread_seed})|** (same n; cells computed with both seeds)", "",
                  header, rule]
        for skip in skips:
            for eta in etas:
                row = []
                for S in steps:
                    a, b = get(skip, S, eta, seed), get(skip, S, eta, spread_seed)
                    if a is None or b is None:
                        row.append("")
                    else:
                        diffs.append(abs(a - b))
                        row.append(f"{abs(a - b):.2f}")
                if any(row):
                    lines.append(f"| {skip}, {_eta_name(eta)} | " + " | ".join(row) + " |")
        if diffs:
            lines += ["", f"Seed-to-seed spread over {len(diffs)} cells: median {np.median(diffs):.2f}, max {max(diffs):.2f}."]
        # Paired differences: within one seed every cell starts from the same x_T, so a difference
        # between two etas is less noisy than either cell; the sign should agree across seeds.
        base = etas[0]
        prow = []
        for skip in skips:
            for S in steps:
                for eta in etas[1:]:
                    a0, a1 = get(skip, S, eta, seed), get(skip, S, eta, spread_seed)
                    b0, b1 = get(skip, S, base, seed), get(skip, S, base, spread_seed)
                    if None not in (a0, a1, b0, b1):
                        prow.append((skip, S, eta, a0 - b0, a1 - b1))
        if prow:
            agree = sum(1 for p in prow if np.sign(p[3]) == np.sign(p[4]))
            lines += ["", f"**Paired differences FD(eta) - FD(eta={_eta_name(base)})**, seed {seed} / seed {spread_seed} "
                      f"(same x_T within a seed); the sign agrees in {agree} of {len(prow)}:", "",
                      "| tau | S | " + " | ".join(_eta_name(e) for e in etas[1:]) + " |", "|---|---|" + "---|" * (len(etas) - 1)]
            for skip in skips:
                for S in steps:
                    cells_ = {p[2]: p for p in prow if p[0] == skip and p[1] == S}
                    if cells_:
                        lines.append(f"| {skip} | {S} | " + " | ".join(
                            "" if e not in cells_ else f"{cells_[e][3]:+.1f} / {cells_[e][4]:+.1f}" for e in etas[1:]) + " |")
        lines.append("")
    cov = [c for c in cells.values() if "labels" in c and c["seed"] == seed and c["n"] == n]
    if cov:
        lines += ["**Mode coverage** (classifier's predicted labels of the samples: classes with at least half "
                  "their uniform share / 10, total-variation distance to uniform, mean confidence)", "",
                  "| tau | S | eta | coverage | TV to uniform | confidence | label counts 0..9 |", "|---|---|---|---|---|---|---|"]
        for c in sorted(cov, key=lambda c: (c["skip"], c["S"], str(c["eta"]))):
            if c["eta"] in (0.0, 1.0, "ddpm_large") and c["S"] in (10, 100, 1000):
                lb = c["labels"]
                lines.append(f"| {c['skip']} | {c['S']} | {_eta_name(c['eta'])} | {lb['coverage']}/10 | {lb['tv_uniform']:.3f} | "
                             f"{lb['confidence']:.3f} | {' '.join(str(k) for k in lb['counts'])} |")
        lines.append("")
    text = "\n".join(lines)
    _atomic_text(os.path.join(out_dir, "table1.md"), text)
    panels = []
    for skip in skips:
        series = []
        for eta in etas:
            pts = [(S, get(skip, S, eta, seed)) for S in steps]
            pts = [(S, v) for S, v in pts if v is not None and v > 0]
            if pts:
                series.append((f"eta={_eta_name(eta)}" if eta != "ddpm_large" else "sigma-hat", [p[0] for p in pts], [p[1] for p in pts]))
        panels.append({"title": f'tau = "{skip}", n = {n}', "series": series})
    if any(p["series"] for p in panels):
        line_plot(panels, os.path.join(out_dir, "table1.png"), xlabel="S (sampling steps)", ylabel="Frechet distance",
                  xlog=True, ylog=True)
    return text


# --------------------------------------------------------------------------------------------
# Solvers: multistep at S vs DDIM at 5 S (issue 8)
# --------------------------------------------------------------------------------------------
def _solver_key(solver: str, skip: str, S: int, n: int, seed: int) -> str:
    return f"{solver}|{skip}|S={S}|n={n}|seed={seed}"


def solvers_table(
    model,
    schedule,
    *,
    n: int = 1000,
    seeds: Sequence[int] = (0, 1),
    cells: Sequence[Tuple[str, str, int]] = SOLVER_CELLS,
    batch_size: int = 250,
    out_dir: str = DEFAULT_OUT_DIR,
    fingerprint: Optional[str] = None,
    description: Optional[Dict[str, Any]] = None,
    max_minutes: Optional[float] = None,
    fresh: bool = False,
    extractor: Optional[Callable] = None,
    reference: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    shape: Optional[Sequence[int]] = None,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Frechet distance of each (solver, skip, S) cell for every seed (resuming), then solvers.md.

    As in Table 1, a seed's cells all start from the same x_T (samples 0..n-1 of that seed), so
    the comparison within a seed column is paired; the columns give the seed-to-seed spread.
    ``extractor`` / ``reference`` / ``shape``: as in ``table1``.
    """
    from ddim_fast import FusedSampler
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = _Cache(os.path.join(out_dir, "solvers_cells.json"), fingerprint, fresh=fresh)
    shape = tuple(shape) if shape is not None else _shape(model)
    ref = reference if reference is not None else metrics.reference_statistics(extractor)
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    plan = sorted(((S, sd, solver, skip) for sd in seeds for solver, skip, S in cells), key=lambda p: (p[1], p[0]))
    for S, sd, solver, skip in plan:
        key = _solver_key(solver, skip, S, n, sd)
        if key in cache.cells:
            continue
        if deadline is not None and time.monotonic() > deadline:
            if log:
                log(f"solvers: time budget of {max_minutes} min used; stopping before {key}")
            break
        t0 = time.perf_counter()
        sampler = FusedSampler(model, schedule=schedule, steps=S, skip=skip, solver=solver)
        with torch.no_grad():
            x = _quantize(_sample_batched(sampler, n, shape, sd, batch_size))
        fd = metrics.frechet_distance(*metrics.feature_statistics(x, extractor), *ref)
        cache.put(key, {"solver": solver, "skip": skip, "S": S, "n": n, "seed": sd, "fd": fd,
                        "seconds": round(time.perf_counter() - t0, 2)}, n=n, seeds=list(seeds), model_desc=description or {},
                  features="digit classifier" if extractor is None else repr(extractor))
        if log:
            log(f"solvers: {key}: FD {fd:.3f}")
    render_solvers(cache.data, out_dir, n=n, seeds=seeds, cells=cells)
    return cache.data


def render_solvers(data: Dict[str, Any], out_dir: str, *, n: int, seeds: Sequence[int], cells=SOLVER_CELLS) -> str:
    """solvers.md: one row per (solver, skip, S), one FD column per seed, and each target's verdict."""
    got = data["cells"]

    def fd(solver, skip, S, sd):
        c = got.get(_solver_key(solver, skip, S, n, sd))
        return None if c is None else c["fd"]

    space = "the digit classifier's 64-d feature space" if data.get("features") == "digit classifier" else "the given features"
    lines = [f"Frechet distance in {space} (lower is better), {n} samples per cell, "
             f"model `{data.get('model')}`; within a seed column every cell starts from the same x_T.", "",
             "| solver (skip) | S | " + " | ".join(f"seed {sd}" for sd in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for solver, skip, S in cells:
        lines.append(f"| {solver} ({skip}) | {S} | " + " | ".join(_fmt(fd(solver, skip, S, sd)) for sd in seeds) + " |")
    lines.append("")
    # The verdict: the best multistep solver at S (by its mean over seeds) against DDIM at 5 S,
    # on the mean over seeds (n x seeds samples each); the per-seed paired differences beside it.
    for S in sorted({S for solver, _, S in cells if solver != "ddim"}):
        ddim = [fd("ddim", "uniform", 5 * S, sd) for sd in seeds]
        multi = [(solver, skip) for solver, skip, S_ in cells if S_ == S and solver != "ddim"]
        scored = []
        for solver, skip in multi:
            vals = [fd(solver, skip, S, sd) for sd in seeds]
            if None not in vals:
                scored.append((float(np.mean(vals)), solver, vals))
        if not scored or None in ddim:
            continue
        mean, name, vals = min(scored)
        d_mean = float(np.mean(ddim))
        per_seed = ", ".join(f"seed {sd} {v - d:+.2f}" for sd, v, d in zip(seeds, vals, ddim))
        lines.append(f"- S = {S}: best multistep solver {name}, mean FD {mean:.2f} vs DDIM at S = {5 * S} {d_mean:.2f} "
                     f"({'met' if mean <= d_mean else 'missed'}: as good at 1/5 of the steps); paired per-seed "
                     f"differences {per_seed}.")
    lines.append("")
    text = "\n".join(lines)
    _atomic_text(os.path.join(out_dir, "solvers.md"), text)
    return text


# --------------------------------------------------------------------------------------------
# Table 2: reconstruction error
# --------------------------------------------------------------------------------------------
def table2(
    model,
    schedule,
    *,
    n: int = 100,
    steps: Sequence[int] = TABLE2_STEPS,
    skip: str = "uniform",
    batch_size: int = 250,
    out_dir: str = DEFAULT_OUT_DIR,
    fingerprint: Optional[str] = None,
    description: Optional[Dict[str, Any]] = None,
    images: Optional[torch.Tensor] = None,
    max_minutes: Optional[float] = None,
    fresh: bool = False,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Encode the first ``n`` digits of the classifier's held-out split with S DDIM steps, decode
    with the same S, and record the per-dimension MSE in [0, 1] units (the paper's Table 2)."""
    from ddim_fast import FusedSampler
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    fingerprint = fingerprint or model_fingerprint(model)
    cache = _Cache(os.path.join(out_dir, "table2_cells.json"), fingerprint, fresh=fresh)
    if images is None:
        x_all, _ = metrics._digits()
        test_idx = metrics.classifier_info()["split"]["test_indices"]
        images = x_all[torch.as_tensor(test_idx[:n])]
    n = int(images.shape[0])
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    for S in sorted(steps):
        key = f"{skip}|S={S}|n={n}"
        if key in cache.cells:
            continue
        if deadline is not None and time.monotonic() > deadline:
            if log:
                log(f"table2: time budget of {max_minutes} min used; stopping before {key}")
            break
        t0 = time.perf_counter()
        sampler = FusedSampler(model, schedule=schedule, steps=S, eta=0.0, skip=skip)
        errs = []
        with torch.no_grad():
            for b in range(0, n, batch_size):
                x0 = images[b : b + batch_size]
                x_rec = sampler.decode(sampler.encode(x0)).float().cpu().clamp(-1, 1)
                errs.append(metrics.reconstruction_mse(x_rec, x0, reduction="none"))
        e = torch.cat(errs)
        cell = {"S": S, "skip": skip, "n": n, "mse": float(e.mean()), "sem": float(e.std() / math.sqrt(n)) if n > 1 else 0.0,
                "seconds": round(time.perf_counter() - t0, 2)}
        cache.put(key, cell, skip=skip, model_desc=description or {})
        if log:
            log(f"table2: {key}: MSE {cell['mse']:.5f} +- {cell['sem']:.5f} ({cell['seconds']:.0f} s)")
    render_table2(cache.data, out_dir, n=n, steps=steps, skip=skip)
    return cache.data


def render_table2(data: Dict[str, Any], out_dir: str, *, n: int, steps=TABLE2_STEPS, skip: str = "uniform") -> str:
    cells = data["cells"]
    got = {S: cells.get(f"{skip}|S={S}|n={n}") for S in steps}
    lines = [
        f"Per-dimension MSE (images in [0, 1]) of encode(S steps) -> decode(S steps), eta = 0, tau = \"{skip}\", "
        f"on {n} digits of the classifier's test split (the diffusion model itself was trained on all 1,797 digits), "
        f"mean +- standard error. Model: `{data.get('model')}`.", "",
        "| S | " + " | ".join(str(S) for S in steps) + " |", "|---|" + "---|" * len(steps),
        "| ours (digits 16x16) | " + " | ".join("—" if got[S] is None else f"{got[S]['mse']:.2e}" for S in steps) + " |",
        "| +- | " + " | ".join("" if got[S] is None else f"{got[S]['sem']:.1e}" for S in steps) + " |",
        "| paper (CIFAR-10) | " + " | ".join(f"{PAPER_TABLE2[S]:g}" if S in PAPER_TABLE2 else "" for S in steps) + " |",
        "",
    ]
    text = "\n".join(lines)
    _atomic_text(os.path.join(out_dir, "table2.md"), text)
    ours = [(S, got[S]["mse"]) for S in steps if got[S] is not None and got[S]["mse"] > 0]
    if ours:
        series = [("ours (digits)", [p[0] for p in ours], [p[1] for p in ours]),
                  ("paper (CIFAR-10)", [S for S in steps if S in PAPER_TABLE2], [PAPER_TABLE2[S] for S in steps if S in PAPER_TABLE2])]
        line_plot([{"title": "reconstruction error vs S", "series": series}], os.path.join(out_dir, "table2.png"),
                  xlabel="S (encode and decode steps)", ylabel="MSE per dimension", xlog=True, ylog=True)
    return text


# --------------------------------------------------------------------------------------------
# Figure 4: time per sample vs S
# --------------------------------------------------------------------------------------------
def timing(
    model,
    schedule,
    *,
    steps: Sequence[int] = TIMING_STEPS,
    n: int = 16,
    repeats: int = 1,
    out_dir: str = DEFAULT_OUT_DIR,
    description: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Seconds per sample of ``sample(shape=(n, ...))`` for each S (eta = 0), with a linear fit."""
    from ddim_fast import FusedSampler
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    shape = (n, *_shape(model))
    rows = []
    for S in steps:
        sampler = FusedSampler(model, schedule=schedule, steps=S, eta=0.0)
        with torch.no_grad():
            s = metrics.seconds_per_sample(sampler, shape, repeats=repeats)
        rows.append({"S": S, "seconds_per_sample": s})
        if log:
            log(f"timing: S={S}: {s * 1e3:.1f} ms per sample")
    xs = np.array([r["S"] for r in rows], dtype=np.float64)
    ys = np.array([r["seconds_per_sample"] for r in rows])
    slope, intercept = np.polyfit(xs, ys, 1) if len(rows) > 1 else (ys[0] / xs[0], 0.0)
    pred = slope * xs + intercept
    r2 = 1.0 - float(((ys - pred) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-300))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    env = {"device": "cpu", "threads": torch.get_num_threads(), "batch": n, "cpu_count": os.cpu_count(),
           "loadavg_1min_at_end": load, "torch": torch.__version__}
    result = {"rows": rows, "slope_s_per_step_per_sample": float(slope), "intercept_s": float(intercept), "r2": r2,
              "env": env, "model_desc": description or {}}
    _atomic_json(os.path.join(out_dir, "timing.json"), result)
    lines = [f"Seconds per sample (batch of {n}, eta = 0, {env['threads']} CPU threads, 1-min load average "
             f"{load if load is None else round(load, 2)} on {env['cpu_count']} cores shared with other jobs).", "",
             "| S | " + " | ".join(str(r["S"]) for r in rows) + " |", "|---|" + "---|" * len(rows),
             "| s / sample | " + " | ".join(f"{r['seconds_per_sample']:.4f}" for r in rows) + " |", "",
             f"Linear fit: {slope * 1e3:.3f} ms per step per sample {intercept * 1e3:+.2f} ms, R^2 = {r2:.4f}.", ""]
    _atomic_text(os.path.join(out_dir, "timing.md"), "\n".join(lines))
    line_plot([{"title": f"time per sample vs S (R^2 = {r2:.3f})",
                "series": [("measured", list(xs), list(ys)), ("linear fit", list(xs), list(pred))]}],
              os.path.join(out_dir, "timing.png"), xlabel="S (sampling steps)", ylabel="seconds per sample", xlog=False, ylog=False)
    return result


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _x_T(seed: int, n: int, shape, offset: int = 0) -> torch.Tensor:
    from ddim_fast import reference

    return reference.gaussian(seed, (n, *shape), step=0, stream=reference.STREAM_X_T, sample_offset=offset).float()


def figure_consistency(model, schedule, out: str, *, rows: int = 8, steps: Sequence[int] = TABLE1_STEPS, seed: int = 0,
                       scale: int = 4) -> str:
    """Section 5.2 / Fig. 5: one row per x_T, one column per S (eta = 0): high-level features agree."""
    from ddim_fast import FusedSampler

    x_T = _x_T(seed, rows, _shape(model))
    cols = []
    with torch.no_grad():
        for S in steps:
            cols.append(FusedSampler(model, schedule=schedule, steps=S, eta=0.0).decode(x_T).float().cpu())
    grid = [[cols[j][i] for j in range(len(steps))] for i in range(rows)]
    labeled_grid(grid, out, col_labels=[f"S={S}" for S in steps], row_labels=None, scale=scale,
                 title=f"same x_T per row (seed {seed}), DDIM eta=0")
    return out


def figure_interpolate(model, schedule, out: str, *, pairs: int = 4, num: int = 9, steps: int = 50,
                       ddpm_t: Sequence[int] = (100, 250), seed: int = 0, scale: int = 4) -> str:
    """Section 5.3 / Fig. 6 and the seed report's Fig. 5: per pair of latents, one row of DDIM
    decodes of slerp(z1, z2, alpha), then for each t in ``ddpm_t`` one row of DDPM-style
    interpolation: x_t, x_t' ~ q(x_t | x0) of the two DDIM endpoints (independent noise),
    lerp, then the stochastic DDPM reverse process (eta = 1, every timestep t..0)."""
    from ddim_fast import FusedSampler, slerp
    from ddim_fast import reference

    shape = _shape(model)
    z1, z2 = _x_T(seed, pairs, shape, 0), _x_T(seed, pairs, shape, pairs)
    alphas = torch.linspace(0, 1, num)
    ddim = FusedSampler(model, schedule=schedule, steps=steps, eta=0.0)
    rows, labels = [], []
    with torch.no_grad():
        z = slerp(z1, z2, alphas)  # (num, pairs, ...)
        dec = ddim.decode(z.reshape(num * pairs, *shape)).float().cpu().reshape(num, pairs, *shape)
        x0a, x0b = dec[0], dec[-1]
        ddpm_rows = {}
        for t in ddpm_t:
            a = float(schedule.alphas_cumprod[t])
            e1 = reference.gaussian(seed + 1, (pairs, *shape), step=t, stream=reference.STREAM_STEP).float()
            e2 = reference.gaussian(seed + 2, (pairs, *shape), step=t, stream=reference.STREAM_STEP).float()
            xa, xb = math.sqrt(a) * x0a + math.sqrt(1 - a) * e1, math.sqrt(a) * x0b + math.sqrt(1 - a) * e2
            lam = alphas.view(-1, 1, 1, 1, 1)
            xt = ((1 - lam) * xa + lam * xb).reshape(num * pairs, *shape)
            ddpm = FusedSampler(model, schedule=schedule, skip=list(range(0, t + 1)), eta=1.0)
            # one noise stream for every lambda of a pair (batch_offset = pair index): only x_t differs
            outs = [ddpm.sample(xt[k * pairs : (k + 1) * pairs], seed=seed, batch_offset=0).float().cpu() for k in range(num)]
            ddpm_rows[t] = torch.stack(outs)  # (num, pairs, ...)
    for p in range(pairs):
        rows.append([dec[k, p] for k in range(num)])
        labels.append(f"DDIM slerp x_T (S={steps})")
        for t in ddpm_t:
            rows.append([ddpm_rows[t][k, p] for k in range(num)])
            labels.append(f"DDPM lerp x_t, t={t}")
    labeled_grid(rows, out, col_labels=[f"{a:.3g}" for a in alphas.tolist()], row_labels=labels, scale=scale,
                 title="interpolation between pairs (columns: alpha / lambda)")
    return out


def figure_sequence(model, schedule, out: str, *, n: int = 4, steps: int = 50, cols: int = 11, eta: float = 0.0,
                    seed: int = 0, scale: int = 4) -> str:
    """The seed report's Fig. 7 (and the paper's trajectories): per sample, a row of x_t and a row
    of the x0-predictions at ``cols`` evenly spaced steps of one DDIM trajectory."""
    from ddim_fast import FusedSampler

    sampler = FusedSampler(model, schedule=schedule, steps=steps, eta=eta)
    with torch.no_grad():
        tr = sampler.sample(shape=(n, *_shape(model)), seed=seed, return_trajectory=True)
    S = tr.x0_preds.shape[0]
    ks = sorted(set(np.linspace(0, S - 1, cols).round().astype(int).tolist()))
    rows, labels = [], []
    for i in range(n):
        rows.append([tr.xs[k, i].float() for k in ks] + [tr.x0[i].float()])
        labels.append("x_t")
        rows.append([tr.x0_preds[k, i].float() for k in ks] + [tr.x0[i].float()])
        labels.append("x0-pred")
    col_labels = [f"t={int(tr.timesteps[k])}" for k in ks] + ["x_0"]
    labeled_grid(rows, out, col_labels=col_labels, row_labels=labels, scale=scale,
                 title=f"trajectory of S={S} steps, eta={eta:g} (x_t clipped to [-1, 1] for display)")
    return out


# --------------------------------------------------------------------------------------------
# pictures with Pillow (matplotlib is not a dependency)
# --------------------------------------------------------------------------------------------
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def labeled_grid(rows: List[List[torch.Tensor]], out: str, *, col_labels=None, row_labels=None, scale: int = 4,
                 title: Optional[str] = None, pad: int = 2) -> None:
    """A PNG of image tiles ([-1, 1] (C, H, W) tensors, one list per row) with column / row labels."""
    from PIL import Image, ImageDraw

    from ddim_fast.data import atomic_write_bytes, to_uint8

    font = _font(12)
    c, h, w = rows[0][0].shape
    th, tw = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    left = 0 if not row_labels else 8 + max(int(font.getlength(s)) for s in row_labels)
    top = (18 if title else 0) + (18 if col_labels else 0)
    W = left + ncol * (tw + pad) + pad
    H = top + len(rows) * (th + pad) + pad
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if title:
        d.text((4, 2), title, fill=(0, 0, 0), font=font)
    if col_labels:
        for j, s in enumerate(col_labels):
            x = left + pad + j * (tw + pad) + tw // 2 - int(font.getlength(s)) // 2
            d.text((x, top - 16), s, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (th + pad)
        if row_labels:
            d.text((4, y + th // 2 - 7), row_labels[i], fill=(0, 0, 0), font=font)
        tiles = to_uint8(torch.stack([t.float() for t in row]))  # (k, h, w, c)
        for j, tile in enumerate(tiles):
            tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            im = Image.fromarray(tile[..., 0] if c == 1 else tile).convert("RGB")
            img.paste(im, (left + pad + j * (tw + pad), y))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


def _ticks(lo: float, hi: float, log: bool) -> List[float]:
    """Tick values for an axis: 1-2-5 decades on a log axis (finer mantissas when the range is
    under a decade or two), round steps on a linear one."""
    if log:
        for mantissas in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
            out = []
            for e in range(int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi))) + 1):
                for m in mantissas:
                    v = m * 10.0**e
                    if lo * 0.999 <= v <= hi * 1.001:
                        out.append(v)
            if len(out) >= 4:
                return out
        return out if len(out) >= 2 else _ticks(lo, hi, False)
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-300) / 5))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= 6:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def line_plot(panels: List[Dict[str, Any]], out: str, *, xlabel: str, ylabel: str, xlog: bool, ylog: bool,
              width: int = 460, height: int = 360) -> None:
    """Side-by-side line plots (one per panel: ``title``, ``series`` = [(label, xs, ys)]) as a PNG."""
    from PIL import Image, ImageDraw

    from ddim_fast.data import atomic_write_bytes

    font = _font(12)
    ml, mr, mt, mb = 62, 12, 26, 44
    img = Image.new("RGB", (width * len(panels), height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for pi, panel in enumerate(panels):
        ox = pi * width
        series = panel["series"]
        xs_all = [x for _, xs, _ in series for x in xs]
        ys_all = [y for _, _, ys in series for y in ys]
        if not xs_all:
            continue
        x0, x1 = min(xs_all), max(xs_all)
        y0, y1 = min(ys_all), max(ys_all)
        if xlog:
            x0, x1 = x0 / 1.15, x1 * 1.15
        else:
            x0, x1 = min(0.0, x0), x1 * 1.05
        if ylog:
            y0, y1 = y0 / 1.3, y1 * 1.3
        else:
            y0, y1 = min(0.0, y0), y1 * 1.08 if y1 > 0 else 1.0
        if x1 <= x0:
            x1 = x0 + 1
        if y1 <= y0:
            y1 = y0 + 1
        fx = math.log10 if xlog else (lambda v: v)
        fy = math.log10 if ylog else (lambda v: v)
        L, R, T, B = ox + ml, ox + width - mr, mt, height - mb

        def px(v):
            return L + (fx(v) - fx(x0)) / (fx(x1) - fx(x0)) * (R - L)

        def py(v):
            return B - (fy(v) - fy(y0)) / (fy(y1) - fy(y0)) * (B - T)

        d.rectangle([L, T, R, B], outline=(0, 0, 0))
        for v in _ticks(x0, x1, xlog):
            X = px(v)
            d.line([X, B, X, B + 4], fill=(0, 0, 0))
            d.line([X, T, X, B], fill=(232, 232, 232))
            s = _tick_label(v)
            d.text((X - font.getlength(s) / 2, B + 6), s, fill=(0, 0, 0), font=font)
        for v in _ticks(y0, y1, ylog):
            Y = py(v)
            d.line([L - 4, Y, L, Y], fill=(0, 0, 0))
            d.line([L, Y, R, Y], fill=(232, 232, 232))
            s = _tick_label(v)
            d.text((L - 6 - font.getlength(s), Y - 7), s, fill=(0, 0, 0), font=font)
        d.rectangle([L, T, R, B], outline=(0, 0, 0))
        d.text((ox + (width - font.getlength(panel.get("title", ""))) / 2, 6), panel.get("title", ""), fill=(0, 0, 0), font=font)
        d.text((ox + (width - font.getlength(xlabel)) / 2, height - 18), xlabel, fill=(0, 0, 0), font=font)
        if pi == 0:
            d.text((ox + 4, 6), ylabel, fill=(80, 80, 80), font=font)
        lx = R - 30 - max((font.getlength(lbl) for lbl, _, _ in series), default=0)
        for si, (label, xs, ys) in enumerate(series):
            col = _COLORS[si % len(_COLORS)]
            pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for X, Y in pts:
                d.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=col)
            ly = T + 6 + 15 * si
            d.line([lx, ly + 7, lx + 18, ly + 7], fill=col, width=2)
            d.text((lx + 22, ly), label, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _int_list(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _eta_list(text: str) -> Tuple[Union[float, str], ...]:
    return tuple(parse_eta(v) for v in text.replace(" ", "").split(",") if v)


def _str_list(text: str) -> Tuple[str, ...]:
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint (training folder, .json or .safetensors); default: the embedded model")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)


def _setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    return _load(args.ckpt, device=args.device, weights=args.weights)


def npz_scores(path: str, batch_size: int = 5000, subset_size: Optional[int] = None) -> Dict[str, Any]:
    """Frechet distance (digit-classifier features, vs all 1,797 digits) and label distribution of
    the images of a uint8 ``.npz`` (what ``sample --npz`` writes), in batches of ``batch_size``.

    ``subset_size``: also the Frechet distance of each disjoint run of that many consecutive
    images, with their mean and standard deviation: the measure's own spread at that sample count.
    """
    from ddim_fast import metrics
    from ddim_fast.data import load_npz

    x, _ = load_npz(path)
    if tuple(x.shape[1:]) != (1, 16, 16):
        raise ValueError(f"npz: the digit classifier scores 1x16x16 digits, {path} holds {tuple(x.shape[1:])} images")
    ref = metrics.reference_statistics()
    mu, sigma = metrics.feature_statistics(x, batch_size=batch_size)
    out = {"npz": path, "n": int(x.shape[0]), "fd": metrics.frechet_distance(mu, sigma, *ref),
           "labels": metrics.label_distribution(x)}
    if subset_size is not None:
        if not 2 <= subset_size <= x.shape[0] // 2:
            raise ValueError(f"subset_size: expected 2 .. n/2 = {x.shape[0] // 2} images, got {subset_size}")
        fds = [metrics.frechet_distance(*metrics.feature_statistics(x[i : i + subset_size], batch_size=batch_size), *ref)
               for i in range(0, x.shape[0] - subset_size + 1, subset_size)]
        out["subsets"] = {"size": subset_size, "fd": fds, "mean": float(np.mean(fds)), "sd": float(np.std(fds, ddof=1))}
    return out


def _cmd_eval(args) -> int:
    if args.which == "fd":
        if not args.npz:
            raise SystemExit("ddim-fast eval fd: --npz FILE is required")
        print(json.dumps(npz_scores(args.npz, subset_size=args.subset_size)))
        return 0
    if args.n is None:
        args.n = {"table1": 500, "table2": 100, "timing": 16, "solvers": 1000}[args.which]
    model, schedule, desc = _setup(args)
    kw = dict(out_dir=args.out_dir, description=desc)
    if args.which == "table1":
        table1(model, schedule, n=args.n, seed=args.seed, spread_seed=None if args.spread_seed < 0 else args.spread_seed,
               spread_steps=args.spread_steps, steps=args.steps or TABLE1_STEPS, etas=args.etas, skips=args.skips,
               batch_size=args.batch, fingerprint=desc["fingerprint"], max_minutes=args.max_minutes, fresh=args.fresh, **kw)
        print(os.path.join(args.out_dir, "table1.md"))
    elif args.which == "solvers":
        seeds = (args.seed,) if args.spread_seed < 0 else (args.seed, args.spread_seed)
        solvers_table(model, schedule, n=args.n, seeds=seeds, batch_size=args.batch, fingerprint=desc["fingerprint"],
                      max_minutes=args.max_minutes, fresh=args.fresh, **kw)
        print(os.path.join(args.out_dir, "solvers.md"))
    elif args.which == "table2":
        table2(model, schedule, n=args.n, steps=args.steps or TABLE2_STEPS, batch_size=args.batch,
               fingerprint=desc["fingerprint"], max_minutes=args.max_minutes, fresh=args.fresh, **kw)
        print(os.path.join(args.out_dir, "table2.md"))
    else:
        timing(model, schedule, steps=args.steps or TIMING_STEPS, n=args.n, repeats=args.repeats, **kw)
        print(os.path.join(args.out_dir, "timing.md"))
    return 0


def _cmd_figure(args) -> int:
    model, schedule, _ = _setup(args)
    out = args.out or os.path.join(DEFAULT_OUT_DIR, f"figure_{args.which}.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.which == "consistency":
        figure_consistency(model, schedule, out, rows=args.n or 8, steps=args.steps or TABLE1_STEPS, seed=args.seed)
    elif args.which == "interpolate":
        figure_interpolate(model, schedule, out, pairs=args.n or 4, steps=(args.steps or (50,))[0], seed=args.seed,
                           ddpm_t=args.ddpm_t)
    else:
        figure_sequence(model, schedule, out, n=args.n or 4, steps=(args.steps or (50,))[0], seed=args.seed)
    print(out)
    return 0


def _cmd_sample_sharded(args) -> int:
    """``sample --npz``: sharded over torchrun ranks and batches, resumable; a grid of the first images."""
    from ddim_fast.data import NPZ_KEY, save_grid

    if args.n < 1:
        raise SystemExit(f"ddim-fast sample: --n must be a positive number of images, got {args.n}")
    out_png = getattr(args, "out", None)
    if out_png and not out_png.lower().endswith(".png"):
        raise SystemExit(f"ddim-fast sample: --out must name a .png file, got {out_png!r}")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    rank, world, local_rank = _dist_env()
    device = args.device
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{local_rank}"
    model, schedule, desc = _load(args.ckpt, device=device, weights=getattr(args, "weights", "ema"))
    eta = parse_eta(args.eta)
    res = sample_npz(model, schedule, args.n, args.npz, steps=args.steps, eta=eta, skip=args.skip,
                     solver=getattr(args, "solver", "ddim"), seed=args.seed, batch_size=args.batch_size,
                     shard_size=args.shard_size, device=device, backend=getattr(args, "backend", "auto"),
                     precision=getattr(args, "precision", "auto"), fingerprint=desc["fingerprint"],
                     keep_shards=args.keep_shards)
    if rank == 0:
        if out_png:
            with np.load(args.npz, allow_pickle=False) as f:
                first = f[NPZ_KEY][: min(args.n, 256)]
            x = torch.from_numpy(first).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            save_grid(x, out_png, nrow=getattr(args, "nrow", None), scale=getattr(args, "scale", None))
        print(f"wrote {args.npz} ({args.n} images, {world} process(es), {res['computed_shards']} shard(s) computed here, "
              f"{res['skipped_shards']} reused, {res['seconds']:.1f} s)" + (f" and {out_png} (first {min(args.n, 256)})" if out_png else ""))
    return 0


def _add_shard_options(p: argparse.ArgumentParser) -> None:
    have = set(p._option_string_actions)
    if "--num-samples" not in have:
        # torchrun's own parser rejects "--n" after the script as an ambiguous prefix of its
        # --nnodes/--nproc-per-node/... (Python 3.11 argparse), so give --n a long spelling.
        p.add_argument("--num-samples", dest="n", type=int, default=argparse.SUPPRESS,
                       help="same as --n (use this one under torchrun)")
    if "--batch-size" not in have:
        p.add_argument("--batch-size", type=int, default=256, help="images per model call with --npz (default 256)")
    if "--shard-size" not in have:
        p.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard file with --npz (default 1000)")
    if "--keep-shards" not in have:
        p.add_argument("--keep-shards", action="store_true", help="keep <npz>.shards/ after the final .npz is written")
    if "--threads" not in have:
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for each process")


def register(subparsers) -> None:
    """Add ``eval`` and ``figure`` to a ``ddim-fast`` subparsers object, and route ``sample --npz``
    through ``sample_npz`` (sharded, resumable). If a ``sample`` subcommand exists, its parser
    gains ``--batch-size/--shard-size/--keep-shards/--threads`` and its function is wrapped so
    that runs without ``--npz`` are unchanged; otherwise a ``sample`` subcommand is added."""
    e = subparsers.add_parser("eval", help="the paper's tables on the embedded model: table1 | table2 | timing | solvers",
                              description="Table 1 (FD vs S x eta), Table 2 (reconstruction MSE vs S), Figure 4 (time vs S), "
                              "solvers (multistep at S vs DDIM at 5 S).")
    e.add_argument("which", choices=("table1", "table2", "timing", "solvers", "fd"))
    e.add_argument("--npz", default=None, help="fd: a uint8 image .npz (e.g. from `sample --npz`) to score against the digits")
    e.add_argument("--subset-size", type=int, default=None,
                   help="fd: also score disjoint subsets of this many images (the measure's spread at that n)")
    _common(e)
    e.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the .md/.png/.json go (default {DEFAULT_OUT_DIR})")
    e.add_argument("--n", type=int, default=None, help="samples per cell (table1: 500), test digits (table2: 100), batch (timing: 16)")
    e.add_argument("--steps", type=_int_list, default=None, help="comma-separated S values (default: the paper's)")
    e.add_argument("--etas", type=_eta_list, default=TABLE1_ETAS, help="table1: comma-separated etas (default 0,0.2,0.5,1,ddpm_large)")
    e.add_argument("--skips", type=_str_list, default=TABLE1_SKIPS, help="table1: tau selections (default uniform,quad)")
    e.add_argument("--spread-seed", type=int, default=1, help="table1: second seed for the spread (-1: none)")
    e.add_argument("--spread-steps", type=_int_list, default=(10, 20, 50, 100), help="table1: S values run with the second seed")
    e.add_argument("--batch", type=int, default=250, help="images per model call (default 250)")
    e.add_argument("--max-minutes", type=float, default=None, help="start no new cell after this long (results so far are kept)")
    e.add_argument("--fresh", action="store_true", help="discard cached cells of this table")
    e.add_argument("--repeats", type=int, default=1, help="timing: best of this many runs")
    e.set_defaults(func=_cmd_eval)

    f = subparsers.add_parser("figure", help="PNG grids: consistency | interpolate | sequence",
                              description="Figures of Sections 5.2-5.3 and the seed report (DDPM interpolation, sequences).")
    f.add_argument("which", choices=("consistency", "interpolate", "sequence"))
    _common(f)
    f.add_argument("--out", default=None, help="PNG path (default docs/results/figure_<which>.png)")
    f.add_argument("--n", type=int, default=None, help="rows (consistency 8), pairs (interpolate 4), samples (sequence 4)")
    f.add_argument("--steps", type=_int_list, default=None, help="consistency: S values (10,20,50,100,1000); others: S (50)")
    f.add_argument("--ddpm-t", type=_int_list, default=(100, 250), help="interpolate: DDPM interpolation timesteps")
    f.set_defaults(func=_cmd_figure)

    s = subparsers.choices.get("sample") if hasattr(subparsers, "choices") else None
    if s is None:
        s = subparsers.add_parser("sample", help="sample to a uint8 .npz, sharded over torchrun ranks, resumable")
        _common(s)
        s.add_argument("--steps", type=int, default=50)
        s.add_argument("--eta", default="0")
        s.add_argument("--skip", default="uniform")
        s.add_argument("--solver", default="ddim", choices=("ddim", "dpmpp_2m", "dpmpp_3m"))
        s.add_argument("--n", type=int, default=64)
        s.add_argument("--npz", required=True)
        s.add_argument("--out", default=None, help="also a PNG grid of the first images")
        s.add_argument("--nrow", type=int, default=None)
        s.add_argument("--scale", type=int, default=None)
        s.add_argument("--backend", default="auto")
        _add_shard_options(s)
        s.set_defaults(func=_cmd_sample_sharded)
        return
    _add_shard_options(s)
    original = s.get_default("func")
    if original is None or getattr(original, "_ddim_sharded", False):
        return

    def dispatch(args, _original=original):
        return _cmd_sample_sharded(args) if getattr(args, "npz", None) else _original(args)

    dispatch._ddim_sharded = True
    s.set_defaults(func=dispatch)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ddim_fast.experiments eval|figure|sample ...`` (the same commands as ``ddim-fast``)."""
    p = argparse.ArgumentParser(prog="python -m ddim_fast.experiments")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
