"""Markdown (and line plots) of the tables, rendered from their cached cells.

Each renderer writes ``<out_dir>/<table>.md`` atomically and returns its text; the plot beside
it (``<table>.png``) needs matplotlib, and without it the Markdown is still written and one
line says how to get the plots.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ddim_fast.experiments.driver import atomic_json, atomic_text, eta_name
from ddim_fast.experiments.paper import PAPER_TABLE2, SOLVER_CELLS, TABLE1_ETAS, TABLE1_SKIPS, TABLE1_STEPS, TABLE2_STEPS

__all__ = ["table1", "solvers", "table2", "timing", "table1_key", "solver_key", "table2_key"]

Log = Optional[Callable[[str], None]]


def table1_key(skip: str, S: int, eta, n: int, seed: int) -> str:
    return f"{skip}|S={S}|eta={eta_name(eta)}|n={n}|seed={seed}"


def solver_key(solver: str, skip: str, S: int, n: int, seed: int) -> str:
    return f"{solver}|{skip}|S={S}|n={n}|seed={seed}"


def table2_key(skip: str, S: int, n: int) -> str:
    return f"{skip}|S={S}|n={n}"


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _plot(panels: List[Dict[str, Any]], out: str, log: Log, **kw) -> None:
    """``figures.line_plot``, or one line of ``log`` when matplotlib is missing."""
    from ddim_fast.experiments.figures import MissingExtraError, line_plot

    try:
        line_plot(panels, out, **kw)
    except MissingExtraError as e:
        if log:
            log(f"{out} not drawn: {e}")


def table1(data: Dict[str, Any], out_dir: str, *, n: int, seed: int, spread_seed: Optional[int],
           steps=TABLE1_STEPS, etas=TABLE1_ETAS, skips=TABLE1_SKIPS, log: Log = None) -> str:
    """table1.md (ours, the spread, mode coverage, the paper's) and table1.png from the cached cells."""
    cells = data["cells"]

    def get(skip, S, eta, sd):
        c = cells.get(table1_key(skip, S, eta, n, sd))
        return None if c is None else c["fd"]

    lines = [f"Frechet distance in the digit classifier's 64-d feature space (lower is better), {n} samples per cell "
             f"(seed {seed}) against all 1,797 digits. Model: `{data.get('model')}`.", ""]
    floor = cells.get(f"real|n={n}|seed={seed}")
    header = "| eta \\ S | " + " | ".join(str(S) for S in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    for skip in skips:
        lines += [f"**tau = \"{skip}\"**", "", header, rule]
        for eta in etas:
            lines.append(f"| {eta_name(eta) if eta != 'ddpm_large' else 'sigma-hat (ddpm_large)'} | "
                         + " | ".join(_fmt(get(skip, S, eta, seed)) for S in steps) + " |")
        lines.append("")
    if floor is not None and floor["n"] < n:
        lines += [f"Real-data floor: none at this n (the reference set has only {floor['n']} digits).", ""]
    elif floor is not None:
        lines += [f"Real-data floor: {floor['n']} real digits (a subset of the reference set) score {floor['fd']:.2f}; "
                  "this is mostly the estimator's finite-sample bias at this n.", ""]
    if spread_seed is not None:
        lines += _table1_spread(get, seed, spread_seed, steps, etas, skips, header, rule)
    cov = [c for c in cells.values() if "labels" in c and c["seed"] == seed and c["n"] == n]
    if cov:
        lines += ["**Mode coverage** (classifier's predicted labels of the samples: classes with at least half "
                  "their uniform share / 10, total-variation distance to uniform, mean confidence)", "",
                  "| tau | S | eta | coverage | TV to uniform | confidence | label counts 0..9 |", "|---|---|---|---|---|---|---|"]
        for c in sorted(cov, key=lambda c: (c["skip"], c["S"], str(c["eta"]))):
            if c["eta"] in (0.0, 1.0, "ddpm_large") and c["S"] in (10, 100, 1000):
                lb = c["labels"]
                lines.append(f"| {c['skip']} | {c['S']} | {eta_name(c['eta'])} | {lb['coverage']}/10 | {lb['tv_uniform']:.3f} | "
                             f"{lb['confidence']:.3f} | {' '.join(str(k) for k in lb['counts'])} |")
        lines.append("")
    text = "\n".join(lines)
    atomic_text(os.path.join(out_dir, "table1.md"), text)
    panels = []
    for skip in skips:
        series = []
        for eta in etas:
            pts = [(S, get(skip, S, eta, seed)) for S in steps]
            pts = [(S, v) for S, v in pts if v is not None and v > 0]
            if pts:
                series.append((f"eta={eta_name(eta)}" if eta != "ddpm_large" else "sigma-hat", [p[0] for p in pts], [p[1] for p in pts]))
        panels.append({"title": f'tau = "{skip}", n = {n}', "series": series})
    if any(p["series"] for p in panels):
        _plot(panels, os.path.join(out_dir, "table1.png"), log, xlabel="S (sampling steps)", ylabel="Frechet distance",
              xlog=True, ylog=True)
    return text


def _table1_spread(get, seed, spread_seed, steps, etas, skips, header, rule) -> List[str]:
    """The seed-to-seed spread of each cell and the paired differences FD(eta) - FD(eta_0)."""
    diffs = []
    lines = [f"**Spread: |FD(seed {seed}) - FD(seed {spread_seed})|** (same n; cells computed with both seeds)", "",
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
                lines.append(f"| {skip}, {eta_name(eta)} | " + " | ".join(row) + " |")
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
        lines += ["", f"**Paired differences FD(eta) - FD(eta={eta_name(base)})**, seed {seed} / seed {spread_seed} "
                  f"(same x_T within a seed); the sign agrees in {agree} of {len(prow)}:", "",
                  "| tau | S | " + " | ".join(eta_name(e) for e in etas[1:]) + " |", "|---|---|" + "---|" * (len(etas) - 1)]
        for skip in skips:
            for S in steps:
                cells_ = {p[2]: p for p in prow if p[0] == skip and p[1] == S}
                if cells_:
                    lines.append(f"| {skip} | {S} | " + " | ".join(
                        "" if e not in cells_ else f"{cells_[e][3]:+.1f} / {cells_[e][4]:+.1f}" for e in etas[1:]) + " |")
    lines.append("")
    return lines


def solvers(data: Dict[str, Any], out_dir: str, *, n: int, seeds: Sequence[int], cells=SOLVER_CELLS) -> str:
    """solvers.md: one row per (solver, skip, S), one FD column per seed, and each target's verdict."""
    got = data["cells"]

    def fd(solver, skip, S, sd):
        c = got.get(solver_key(solver, skip, S, n, sd))
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
        scored = []
        for solver, skip in [(solver, skip) for solver, skip, S_ in cells if S_ == S and solver != "ddim"]:
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
    atomic_text(os.path.join(out_dir, "solvers.md"), text)
    return text


def table2(data: Dict[str, Any], out_dir: str, *, n: int, steps=TABLE2_STEPS, skip: str = "uniform", log: Log = None) -> str:
    cells = data["cells"]
    got = {S: cells.get(table2_key(skip, S, n)) for S in steps}
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
    atomic_text(os.path.join(out_dir, "table2.md"), text)
    ours = [(S, got[S]["mse"]) for S in steps if got[S] is not None and got[S]["mse"] > 0]
    if ours:
        series = [("ours (digits)", [p[0] for p in ours], [p[1] for p in ours]),
                  ("paper (CIFAR-10)", [S for S in steps if S in PAPER_TABLE2], [PAPER_TABLE2[S] for S in steps if S in PAPER_TABLE2])]
        _plot([{"title": "reconstruction error vs S", "series": series}], os.path.join(out_dir, "table2.png"), log,
              xlabel="S (encode and decode steps)", ylabel="MSE per dimension", xlog=True, ylog=True)
    return text


def timing(result: Dict[str, Any], fit: Sequence[float], out_dir: str, log: Log = None) -> str:
    """timing.json, timing.md and timing.png of ``tables.timing``'s result (``fit``: the line at each S)."""
    atomic_json(os.path.join(out_dir, "timing.json"), result)
    rows, env = result["rows"], result["env"]
    slope, intercept, r2, load = result["slope_s_per_step_per_sample"], result["intercept_s"], result["r2"], env["loadavg_1min_at_end"]
    lines = [f"Seconds per sample (batch of {env['batch']}, eta = 0, {env['threads']} CPU threads, 1-min load average "
             f"{load if load is None else round(load, 2)} on {env['cpu_count']} cores shared with other jobs).", "",
             "| S | " + " | ".join(str(r["S"]) for r in rows) + " |", "|---|" + "---|" * len(rows),
             "| s / sample | " + " | ".join(f"{r['seconds_per_sample']:.4f}" for r in rows) + " |", "",
             f"Linear fit: {slope * 1e3:.3f} ms per step per sample {intercept * 1e3:+.2f} ms, R^2 = {r2:.4f}.", ""]
    text = "\n".join(lines)
    atomic_text(os.path.join(out_dir, "timing.md"), text)
    xs = [float(r["S"]) for r in rows]
    _plot([{"title": f"time per sample vs S (R^2 = {r2:.3f})",
            "series": [("measured", xs, [r["seconds_per_sample"] for r in rows]), ("linear fit", xs, [float(v) for v in fit])]}],
          os.path.join(out_dir, "timing.png"), log, xlabel="S (sampling steps)", ylabel="seconds per sample", xlog=False, ylog=False)
    return text
