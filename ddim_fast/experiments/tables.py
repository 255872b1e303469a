"""The paper's tables as resumable runs: Table 1 (Frechet distance vs S and eta), Table 2
(encode -> decode error vs S), Figure 4 (time per sample vs S), the multistep solvers against
DDIM at 5x the steps, and the score of a sampled ``.npz``.

Each table is a list of cells run by ``driver.run_cells`` (cached, within a time budget) and
rendered by ``render``. ``sampler_options`` (e.g. ``{"compile": True}``) go to every
``FusedSampler`` and do not change what a cell measures.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ddim_fast.experiments import render
from ddim_fast.experiments.driver import Cache, image_shape, log as _log, make_sampler, quantize, run_cells
from ddim_fast.experiments.paper import (DEFAULT_OUT_DIR, SOLVER_CELLS, TABLE1_ETAS, TABLE1_SKIPS, TABLE1_SPREAD_STEPS,
                                         TABLE1_STEPS, TABLE2_STEPS, TIMING_STEPS)
from ddim_fast.nn import model_fingerprint
from ddim_fast.sharded import sample_batched

__all__ = ["table1", "solvers_table", "table2", "timing", "npz_scores", "FDTable"]

Log = Optional[Callable[[str], None]]


class FDTable:
    """A Frechet-distance table being filled: its cell cache, how its images are drawn and
    scored. The keyword options of ``table1`` and ``solvers_table`` are this one's:

    ``batch_size`` images per model call; ``out_dir`` for the cache, Markdown and plot;
    ``fingerprint`` of the model that keys the cache (default: its weights' hash);
    ``description`` of the model, stored with the cells; ``max_minutes``: no cell starts after
    that long; ``fresh``: discard the cached cells; ``extractor`` / ``reference`` (mu, sigma):
    another feature space and reference set than the digit classifier's and the 1,797 digits;
    ``shape`` (C, H, W) when the model has no config; ``sampler_options`` for every
    ``FusedSampler`` (e.g. ``{"compile": True}``); ``log``, one line per cell (None: quiet).
    """

    def __init__(self, model, schedule, table: str, n: int, *, batch_size: int = 250, out_dir: str = DEFAULT_OUT_DIR,
                 fingerprint: Optional[str] = None, description: Optional[Dict[str, Any]] = None,
                 max_minutes: Optional[float] = None, fresh: bool = False, extractor: Optional[Callable] = None,
                 reference: Optional[Tuple[np.ndarray, np.ndarray]] = None, shape: Optional[Sequence[int]] = None,
                 sampler_options: Optional[Dict[str, Any]] = None, log: Log = _log):
        from ddim_fast import metrics

        os.makedirs(out_dir, exist_ok=True)
        self.model, self.schedule, self.table, self.n = model, schedule, table, n
        self.batch_size, self.out_dir, self.max_minutes, self.log = batch_size, out_dir, max_minutes, log
        self.extractor, self.reference, self.sampler_options = extractor, reference, sampler_options
        self.description = description or {}
        self.features = "digit classifier" if extractor is None else repr(extractor)
        self.cache = Cache(os.path.join(out_dir, f"{table}_cells.json"), fingerprint or model_fingerprint(model), fresh=fresh)
        self.shape = tuple(shape) if shape is not None else image_shape(model)
        self.ref = reference if reference is not None else metrics.reference_statistics(extractor)

    def fd(self, seed: int, labels: bool, **sampler_kw) -> Dict[str, Any]:
        """Frechet distance of samples 0..n-1 of ``seed`` (as saved uint8 images hold them), and
        with ``labels`` the digit classifier's label distribution of them."""
        from ddim_fast import metrics

        sampler = make_sampler(self.model, self.schedule, self.sampler_options, **sampler_kw)
        x = quantize(sample_batched(sampler, self.n, self.shape, seed, self.batch_size))
        cell = {"fd": metrics.frechet_distance(*metrics.feature_statistics(x, self.extractor), *self.ref)}
        if labels:
            cell["labels"] = metrics.label_distribution(x)
        return cell

    def run(self, cells, **extra) -> None:
        run_cells(self.table, cells, self.cache, max_minutes=self.max_minutes, log=self.log, describe=_describe_fd,
                  model_desc=self.description, **extra)


def _describe_fd(key: str, cell: Dict[str, Any]) -> str:
    return f"FD {cell['fd']:.3f} ({cell['seconds']:.0f} s)"


def table1(
    model,
    schedule,
    *,
    n: int = 500,
    seed: int = 0,
    spread_seed: Optional[int] = 1,
    spread_steps: Sequence[int] = TABLE1_SPREAD_STEPS,
    steps: Sequence[int] = TABLE1_STEPS,
    etas: Sequence[Union[float, str]] = TABLE1_ETAS,
    skips: Sequence[str] = TABLE1_SKIPS,
    **options,
) -> Dict[str, Any]:
    """Fill (resuming) the Table 1 cells, then write table1.md / table1.png / table1_cells.json.

    Every cell draws samples 0..n-1 of the same ``seed``: the same x_T in every cell (common
    random numbers), so differences between cells are less noisy than one cell's spread. The
    second seed (``spread_seed``) is run for S in ``spread_steps`` and gives the spread that the
    table reports. Cells run cheapest first. ``options``: those of ``FDTable`` (out_dir,
    max_minutes, extractor, reference, ...).
    """
    from ddim_fast import FusedSampler, metrics

    t = FDTable(model, schedule, "table1", n, **options)
    plan = []
    for sd in [seed] + ([spread_seed] if spread_seed is not None else []):
        for skip in skips:
            for S in steps:
                if sd != seed and S not in spread_steps:
                    continue
                n_steps = len(FusedSampler(model, schedule=schedule, steps=S, skip=skip).timesteps)
                plan += [(sd != seed, n_steps, skip, S, eta, sd) for eta in etas]
    # Cheapest first; at equal cost the main seed first, then eta = 0, 1, sigma-hat before the
    # intermediate etas (so a time-boxed run fills the paper's three key rows of the S = 1000 column).
    prio = {0.0: 0, 1.0: 1, "ddpm_large": 2}
    plan.sort(key=lambda p: (p[1], p[0], prio.get(p[4], 3)))

    def cell(n_steps, skip, S, eta, sd):
        c = t.fd(sd, t.extractor is None, steps=S, eta=eta, skip=skip)
        return {"skip": skip, "S": S, "steps_run": n_steps, "eta": eta, "n": n, "seed": sd, **c}

    extra = {"n": n, "seed": seed, "spread_seed": spread_seed, "extractor": t.features}
    t.run([(render.table1_key(p[2], p[3], p[4], n, p[5]), lambda p=p: cell(*p[1:])) for p in plan], **extra)
    # the real-data floor at this n: n digits drawn from the reference set itself
    floor_key = f"real|n={n}|seed={seed}"
    if floor_key not in t.cache.cells and t.reference is None:
        x_real, _ = metrics._digits()
        idx = np.random.default_rng(seed).choice(len(x_real), size=min(n, len(x_real)), replace=False)
        mu, sigma = metrics.feature_statistics(x_real[torch.as_tensor(idx)], t.extractor)
        t.cache.put(floor_key, {"fd": metrics.frechet_distance(mu, sigma, *t.ref), "n": int(len(idx))},
                    model_desc=t.description, **extra)
    render.table1(t.cache.data, t.out_dir, n=n, seed=seed, spread_seed=spread_seed, steps=steps, etas=etas, skips=skips,
                  log=t.log)
    return t.cache.data


def solvers_table(
    model,
    schedule,
    *,
    n: int = 1000,
    seeds: Sequence[int] = (0, 1),
    cells: Sequence[Tuple[str, str, int]] = SOLVER_CELLS,
    **options,
) -> Dict[str, Any]:
    """Frechet distance of each (solver, skip, S) cell for every seed (resuming), then solvers.md.

    As in Table 1, a seed's cells all start from the same x_T (samples 0..n-1 of that seed), so
    the comparison within a seed column is paired; the columns give the seed-to-seed spread.
    ``options``: those of ``FDTable``.
    """
    t = FDTable(model, schedule, "solvers", n, **options)
    plan = sorted(((S, sd, solver, skip) for sd in seeds for solver, skip, S in cells), key=lambda p: (p[1], p[0]))

    def cell(S, sd, solver, skip):
        return {"solver": solver, "skip": skip, "S": S, "n": n, "seed": sd, **t.fd(sd, False, steps=S, skip=skip, solver=solver)}

    t.run([(render.solver_key(solver, skip, S, n, sd), lambda p=(S, sd, solver, skip): cell(*p)) for S, sd, solver, skip in plan],
          n=n, seeds=list(seeds), features=t.features)
    render.solvers(t.cache.data, t.out_dir, n=n, seeds=seeds, cells=cells)
    return t.cache.data


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
    sampler_options: Optional[Dict[str, Any]] = None,
    log: Log = _log,
) -> Dict[str, Any]:
    """Encode the first ``n`` digits of the classifier's held-out split with S DDIM steps, decode
    with the same S, and record the per-dimension MSE in [0, 1] units (the paper's Table 2)."""
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    cache = Cache(os.path.join(out_dir, "table2_cells.json"), fingerprint or model_fingerprint(model), fresh=fresh)
    if images is None:
        x_all, _ = metrics._digits()
        test_idx = metrics.classifier_info()["split"]["test_indices"]
        images = x_all[torch.as_tensor(test_idx[:n])]
    n = int(images.shape[0])

    def cell(S):
        sampler = make_sampler(model, schedule, sampler_options, steps=S, eta=0.0, skip=skip)
        errs = []
        for b in range(0, n, batch_size):
            x0 = images[b : b + batch_size]
            x_rec = sampler.decode(sampler.encode(x0)).float().cpu().clamp(-1, 1)
            errs.append(metrics.reconstruction_mse(x_rec, x0, reduction="none"))
        e = torch.cat(errs)
        return {"S": S, "skip": skip, "n": n, "mse": float(e.mean()), "sem": float(e.std() / math.sqrt(n)) if n > 1 else 0.0}

    todo = [(render.table2_key(skip, S, n), lambda S=S: cell(S)) for S in sorted(steps)]
    run_cells("table2", todo, cache, max_minutes=max_minutes, log=log, skip=skip, model_desc=description or {},
              describe=lambda key, c: f"MSE {c['mse']:.5f} +- {c['sem']:.5f} ({c['seconds']:.0f} s)")
    render.table2(cache.data, out_dir, n=n, steps=steps, skip=skip, log=log)
    return cache.data


def timing(
    model,
    schedule,
    *,
    steps: Sequence[int] = TIMING_STEPS,
    n: int = 16,
    repeats: int = 1,
    out_dir: str = DEFAULT_OUT_DIR,
    description: Optional[Dict[str, Any]] = None,
    max_minutes: Optional[float] = None,
    sampler_options: Optional[Dict[str, Any]] = None,
    log: Log = _log,
) -> Dict[str, Any]:
    """Seconds per sample of ``sample(shape=(n, ...))`` for each S (eta = 0), with a linear fit.

    Times are never cached (they hold only for the machine's state of this run)."""
    from ddim_fast import metrics

    os.makedirs(out_dir, exist_ok=True)
    shape = (n, *image_shape(model))
    cache = Cache(None, "timing")

    def cell(S):
        sampler = make_sampler(model, schedule, sampler_options, steps=S, eta=0.0)
        return {"S": S, "seconds_per_sample": metrics.seconds_per_sample(sampler, shape, repeats=repeats)}

    run_cells("timing", [(f"S={S}", lambda S=S: cell(S)) for S in steps], cache, max_minutes=max_minutes, log=log,
              describe=lambda key, c: f"{c['seconds_per_sample'] * 1e3:.1f} ms per sample")
    rows = [{"S": c["S"], "seconds_per_sample": c["seconds_per_sample"]} for c in cache.cells.values()]
    if not rows:
        raise ValueError(f"max_minutes: the time budget of {max_minutes} min ended before the first S was timed")
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
    render.timing(result, list(pred), out_dir, log=log)
    return result


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
