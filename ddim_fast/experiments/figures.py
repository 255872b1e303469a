"""The paper's figures: PNG grids of samples (Pillow) and the tables' line plots (matplotlib).

    figure_consistency   Section 5.2 / Fig. 5: same x_T per row, one column per S
    figure_interpolate   Section 5.3 / Fig. 6: slerp of latents (DDIM), lerp of x_t (DDPM)
    figure_sequence      x_t and the x0-prediction along one trajectory

Grids of samples are drawn with Pillow (a dependency). Line plots need matplotlib, an
optional extra (``pip install -e ".[plots]"``); without it ``line_plot`` raises
``MissingExtraError`` naming that command.
"""

from __future__ import annotations

import io
import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ddim_fast.experiments.driver import image_shape as _shape
from ddim_fast.experiments.paper import TABLE1_STEPS

__all__ = ["figure_consistency", "figure_interpolate", "figure_sequence", "labeled_grid", "line_plot", "MissingExtraError"]

PLOTS_EXTRA = 'pip install -e ".[plots]"'


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the command that installs it."""


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


# grids of image tiles (Pillow)
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


def _matplotlib_figure(width_in: float, height_in: float):
    """A matplotlib Figure with the Agg canvas (no pyplot: no global state, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        raise MissingExtraError(f"line plots need matplotlib, an optional extra: {PLOTS_EXTRA} (or pip install matplotlib)") from e
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    # Plain tick labels ("30", not "3 x 10^1"); on a log axis that spans under two decades the
    # minor ticks at 2 and 5 get labels too, else a short axis would show one number.
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    two_five = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else "")
    return fig, plain, two_five


def line_plot(panels: List[Dict[str, Any]], out: str, *, xlabel: str, ylabel: str, xlog: bool, ylog: bool,
              width: int = 460, height: int = 360) -> None:
    """Side-by-side line plots (one per panel: ``title``, ``series`` = [(label, xs, ys)]) as a PNG
    of ``width`` x ``height`` pixels per panel, written atomically. Needs matplotlib."""
    from ddim_fast.data import atomic_write_bytes

    fig, plain, two_five = _matplotlib_figure(width * len(panels) / 100, height / 100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for label, xs, ys in panel["series"]:
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=label)
        ax.set_xscale("log" if xlog else "linear")
        ax.set_yscale("log" if ylog else "linear")
        for axis, log, (lo, hi) in ((ax.xaxis, xlog, ax.get_xlim()), (ax.yaxis, ylog, ax.get_ylim())):
            axis.set_major_formatter(plain)
            if log and 0 < lo < hi < 100 * lo:
                axis.set_minor_formatter(two_five)
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", color="0.9")
        if panel["series"]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
