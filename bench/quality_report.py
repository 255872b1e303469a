"""Render docs/results/quality.md from the cells of bench/quality_cells.py (mixtures) and
bench/quality_digits.py (digits Frechet distance).

    python bench/quality_report.py --mixtures docs/results/quality_mixtures.json \
        --digits docs/results/quality_digits.json --out docs/results/quality.md
"""

from __future__ import annotations

import argparse
import json
import math
import os

STEPS = (5, 6, 8, 10, 20)
STD = {"sharp": 0.05, "medium": 0.15, "broad": 0.4}
D = 8
TARGETS = {5: (20, 2.0), 6: (20, 1.5), 8: (20, 1.0), 10: (50, 1.2)}  # S: (DDIM S, allowed ratio)


def score(mix, v):
    """Per-mode FD relative to the mode's variance (sum_i w_i FD_i / (D s_i^2)) plus the mode-share error."""
    return v["fd"] / (D * STD[mix] ** 2) + v["tv"]


_DIFFUSERS_NAMES = {"dpm2": "DPMSolverMultistep 2M", "dpm3": "DPMSolverMultistep 3M", "unipc2": "UniPCMultistep 2",
                    "unipc3": "UniPCMultistep 3", "deis2": "DEISMultistep 2", "deis3": "DEISMultistep 3"}  # fmt: skip


_SPACING_NAMES = {"tuned_log": "tuned (log loss)", "tuned_log_shift": "tuned (log loss, last call shifted)"}  # quality_cells' TUNINGS


def pretty(cfg):
    """'ours|ipndm|quad' -> 'ipndm, quad'; 'diffusers|dpm2|karras' -> 'diffusers DPMSolverMultistep 2M, karras'."""
    who, name, spacing = cfg.split("|")
    if who == "ours":
        return f"{name}, {_SPACING_NAMES.get(spacing, spacing)}"
    return f"diffusers {_DIFFUSERS_NAMES.get(name, name)}, {spacing}"


def _cfg(key):
    parts = key.split("|")
    return "|".join(parts[1:-2]), int(parts[-2][1:])


def mixture_tables(cells, n):
    mixes = [m for m in STD if f"{m}|data|n{n}" in cells]
    by = {}  # (mix, cfg, S) -> cell
    for k, v in cells.items():
        if k.endswith(f"|n{n}") and "|data|" not in k and "fd" in v:
            cfg, S = _cfg(k)
            by[k.split("|")[0], cfg, S] = v
    cfgs = sorted({c for (_, c, _) in by}, key=lambda c: (c.startswith("diffusers"), c))
    lines = []
    lines.append(f"Closed-form Gaussian mixtures (`reference.GaussianMixtureEps`, K = 6 modes in D = 8, per-mode std "
                 f"sharp 0.05 / medium 0.15 / broad 0.4, linear schedule T = 1000), n = {n:,} samples per cell, every cell "
                 "from the same x_T. Score = sum_i w_i FD_i / (D s_i^2) + sum_i |share_i - w_i| (per-mode Frechet distance "
                 "to the exact mode, relative to its variance, plus the mode-share error; lower is better). "
                 "In brackets: RMS distance to the converged ODE solution from the same x_T (3M on all 1000 timesteps).")
    lines.append("")
    for mix in mixes:
        floor = score(mix, cells[f"{mix}|data|n{n}"])
        d20, d50 = by.get((mix, "ours|ddim|quad", 20)), by.get((mix, "ours|ddim|quad", 50))
        lines.append(f"### {mix} (std {STD[mix]}): floor (true samples) {floor:.3f}; DDIM quad S = 20 "
                     f"{score(mix, d20):.3f}, S = 50 {score(mix, d50):.3f}" if d20 and d50 else f"### {mix}")
        lines.append("")
        lines.append("| config | " + " | ".join(f"S = {S}" for S in STEPS) + " |")
        lines.append("|---|" + "---|" * len(STEPS))
        for c in cfgs:
            vals = []
            for S in STEPS:
                v = by.get((mix, c, S))
                vals.append(f"{score(mix, v):.3f} ({v['ode']:.3f})" if v else "")
            if any(vals):
                lines.append(f"| {pretty(c)} | " + " | ".join(vals) + " |")
        lines.append("")
    return lines, by, mixes


def verdicts(by, mixes):
    lines = ["## Targets (score vs DDIM quad; ratio = best / DDIM)", ""]
    lines.append("| S | vs | mixture | best ours | ratio | best diffusers | ratio | target | met |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for S, (ref_S, allowed) in TARGETS.items():
        for mix in mixes:
            ref = by.get((mix, "ours|ddim|quad", ref_S))
            rows = [(score(mix, v), c) for (m, c, s), v in by.items() if m == mix and s == S]
            ours = min([r for r in rows if r[1].startswith("ours")], default=None)
            theirs = min([r for r in rows if r[1].startswith("diffusers")], default=None)
            if not (ref and ours and theirs):
                continue
            r_ref = score(mix, ref)
            met = ours[0] <= allowed * r_ref and ours[0] <= theirs[0]
            lines.append(f"| {S} | DDIM S={ref_S} | {mix} | {pretty(ours[1])} {ours[0]:.3f} | {ours[0] / r_ref:.2f} | {pretty(theirs[1])} "
                         f"{theirs[0]:.3f} | {theirs[0] / r_ref:.2f} | <= {allowed}x and <= diffusers | {'yes' if met else 'no'} |")
    lines.append("")
    for mix in mixes:  # how far the deterministic proxy (ODE distance) ranks cells like the distribution score
        pairs = [(score(m, v), v["ode"]) for (m, c, S), v in by.items() if m == mix]
        if len(pairs) > 2:
            import numpy as np

            a, b = (np.argsort(np.argsort(np.asarray(x))) for x in zip(*pairs))
            rho = float(np.corrcoef(a, b)[0, 1])
            lines.append(f"- {mix}: Spearman rank correlation between the score and the ODE-distance proxy over its "
                         f"{len(pairs)} cells: {rho:.2f}")
    lines.append("")
    lines.append("Recommended per S (geometric mean over the mixtures of score / DDIM quad S = 20's score, lowest first):")
    lines.append("")
    for S in STEPS:
        cands = {}
        for (m, c, s), v in by.items():
            if s == S and c.startswith("ours") and by.get((m, "ours|ddim|quad", 20)):
                cands.setdefault(c, []).append(math.log(score(m, v) / score(m, by[m, "ours|ddim|quad", 20])))
        ranked = sorted((math.exp(sum(v) / len(v)), c) for c, v in cands.items() if len(v) == len(mixes))
        if ranked:
            lines.append(f"- S = {S}: " + "; ".join(f"{pretty(c)} {g:.2f}" for g, c in ranked[:4]))
    lines.append("")
    return lines


def readme_table(by, mixes, digits):
    """One line per configuration: the geometric mean over the mixtures of score / DDIM quad S = 20's
    score, and the digits FD where measured ("-" where not), for S = 5, 6, 8, 10, 20."""
    dig = {}
    for k, v in (digits or {}).items():
        if "fd" in v:
            cfg, S = _cfg("x|" + k)
            dig[cfg, S] = v["fd"]
    gm = {}
    for (m, c, S), v in by.items():
        ref = by.get((m, "ours|ddim|quad", 20))
        if ref:
            gm.setdefault((c, S), []).append(math.log(score(m, v) / score(m, ref)))
    cfgs = sorted({c for c, _ in gm}, key=lambda c: (c.startswith("diffusers"), c))
    lines = ["| config | " + " | ".join(f"S = {S}" for S in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for c in cfgs:
        if c.endswith("|uniform"):
            continue
        cells = []
        for S in STEPS:
            v = gm.get((c, S))
            g = f"{math.exp(sum(v) / len(v)):.2f}" if v and len(v) == len(mixes) else "-"
            cells.append(g + (f" / {dig[c, S]:.2f}" if (c, S) in dig else ""))
        lines.append(f"| {pretty(c)} | " + " | ".join(cells) + " |")
    return lines


def digits_table(cells):
    ns = sorted({int(k.rsplit("|n", 1)[1]) for k in cells})
    lines = []
    for n in ns:
        by = {}
        for k, v in cells.items():
            if k.endswith(f"|n{n}") and "fd" in v:
                cfg, S = _cfg("x|" + k)
                by[cfg, S] = v
        cfgs = sorted({c for c, _ in by}, key=lambda c: (c.startswith("diffusers"), c))
        lines.append(f"Digits: Frechet distance in the digit classifier's features (`ddim_fast.metrics`), n = {n:,} "
                     "samples per cell from the embedded model, all cells from the same x_T (seed 0), fp32.")
        d20, d50 = by.get(("ours|ddim|quad", 20)), by.get(("ours|ddim|quad", 50))
        if d20 and d50:
            lines.append(f"DDIM quad: S = 20 {d20['fd']:.2f}, S = 50 {d50['fd']:.2f}.")
        lines.append("")
        cols = [S for S in STEPS if any(s == S for _, s in by)]
        lines.append("| config | " + " | ".join(f"S = {S}" for S in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for c in cfgs:
            lines.append(f"| {pretty(c)} | " + " | ".join(f"{by[c, S]['fd']:.2f}" if (c, S) in by else "" for S in cols) + " |")
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--mixtures", default="docs/results/quality_mixtures.json")
    p.add_argument("--digits", default="docs/results/quality_digits.json")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--time-to-quality", default="docs/results/time_to_quality.json")
    p.add_argument("--notes", default="docs/results/quality_notes.md", help="hand-written sections inserted after the targets")
    p.add_argument("--digits-notes", default="docs/results/quality_digits_notes.md", help="hand-written, after the digits table")
    p.add_argument("--out", default="docs/results/quality.md")
    args = p.parse_args(argv)
    out = ["# Fewer model calls at the same quality (issue 15)", "",
           "Commands: `OMP_NUM_THREADS=1 nice python bench/quality_cells.py --n 20000` (mixtures; `--retune` re-tunes "
           "the tuned cells after a tuner change), `OMP_NUM_THREADS=1 nice python bench/quality_digits.py --n 500 --batch 500 "
           "--steps 5,6,8,10` (digits), then `python bench/quality_report.py`.",
           ""]  # fmt: skip
    cells = json.load(open(args.mixtures))
    lines, by, mixes = mixture_tables(cells, args.n)
    digits = json.load(open(args.digits)) if os.path.exists(args.digits) else None
    out += verdicts(by, mixes)
    if os.path.exists(args.notes):  # the hand-written findings, kept across regenerations
        out += open(args.notes).read().rstrip("\n").split("\n") + [""]
    out += ["## README table", "",
            "Mixture score / DDIM quad S = 20's score (geometric mean over the three mixtures; < 1 is better than "
            "DDIM at S = 20), then the digits Frechet distance where measured (n in the digits section).", ""]
    out += readme_table(by, mixes, digits) + [""]
    out += ["## Mixtures", ""] + lines
    if digits:
        out += ["## Digits", ""] + digits_table(digits)
    if os.path.exists(args.digits_notes):  # the hand-written n = 10,000 digits cells
        out += open(args.digits_notes).read().rstrip("\n").split("\n") + [""]
    if os.path.exists(args.time_to_quality):
        out += ["## Time to DDIM S = 50's quality (bench/test_bench_time_to_quality.py)", "",
                f"`pytest bench/test_bench_time_to_quality.py --benchmark-only --benchmark-json {args.time_to_quality}`: "
                "the smallest S at which each method's RMS distance to the converged ODE solution (same x_T, digits UNet) "
                "reaches DDIM's at S = 50, then each timed at its S, interleaved in the same run (fp32, eager, "
                "median of 5 rounds; ratio = median over rounds of diffusers' best / ours' best).", "",
                "| DDIM reference | target RMS | method: S needed, median ms | best ours vs best diffusers | vs DDIM S = 50 |",
                "|---|---|---|---|---|"]  # fmt: skip
        for b in json.load(open(args.time_to_quality))["benchmarks"]:
            e = b["extra_info"]
            methods = ", ".join(f"{k} {e['steps_needed'][k]} / {v * 1e3:.0f}" for k, v in e["median_s"].items())
            out.append(f"| {b['name'].split('[')[-1].rstrip(']')} | {e['target_rms']:.4f} | {methods} | "
                       f"{e['best_ours']} vs {e['best_diffusers']}: {e['speedup_vs_best_diffusers']:.2f}x | "
                       f"{e['speedup_vs_ddim50']:.2f}x |")
        out.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
