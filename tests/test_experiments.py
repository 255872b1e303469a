"""ddim_fast.experiments: the paper's trends on a closed-form model, tables that resume from
their cached cells (a killed run resumes to the uninterrupted result), the time budget, the
figures, and the optional matplotlib plots."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fast import NoiseSchedule, experiments
from ddim_fast.reference import GaussianMixtureEps

SCHEDULE = NoiseSchedule.linear(1000)
D_SIDE = 8  # closed-form data: 1 x 8 x 8 = 64 dimensions


@pytest.fixture(autouse=True)
def _one_thread():
    """The machines are 2 shared cores: a second OpenMP thread waiting on a busy core made tiny
    sampling runs 10-50x slower (measured 4 s vs 0.13 s), so these tests use one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flat(x):
    return x.reshape(x.shape[0], -1)


@pytest.fixture(scope="module")
def gaussian_model():
    """x_0 ~ N(mu, 0.1^2 I) in 64 dimensions and its exact eps model: any error is the sampler's."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(1, D_SIDE * D_SIDE, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return GaussianMixtureEps(SCHEDULE.alphas_cumprod, means, 0.1)


class _Counting(torch.nn.Module):
    """Wraps a model and counts the images it was called on; with ``stop_after`` images, raises
    KeyboardInterrupt at the next call (a run killed in the middle of a cell)."""

    def __init__(self, inner, stop_after=None):
        super().__init__()
        self.inner, self.stop_after, self.images = inner, stop_after, 0

    def forward(self, x, t):
        if self.stop_after is not None and self.images >= self.stop_after:
            raise KeyboardInterrupt
        self.images += x.shape[0]
        return self.inner(x, t)


def _tiny_checkpoint(folder) -> str:
    """A 2-level UNet with random (non-zero) weights written as a sampling checkpoint."""
    from ddim_fast.nn.unet import UNet
    from ddim_fast.train import write_checkpoint

    torch.manual_seed(0)
    m = UNet(in_channels=1, resolution=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = os.path.join(str(folder), "tiny.json")
    write_checkpoint(path, {f"ema/{k}": v for k, v in m.state_dict().items()},
                     {"model": m.config, "schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
                      "contents": ["ema"]})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ddim_fast.train import load_model

    path = _tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    model, schedule = load_model(path)
    return path, model, schedule


# ---------------------------------------------------------------------------------------------
# the paper's trends, on the closed-form model
# ---------------------------------------------------------------------------------------------
def test_table1_trend_ddim_beats_ddpm_at_small_S(gaussian_model, tmp_path):
    """Table 1's main claim: at few steps eta = 0 has the lower FD, and more steps help both."""
    mu, cov = gaussian_model.data_moments()
    data = experiments.table1(
        gaussian_model, SCHEDULE, n=1000, steps=(10, 100), etas=(0.0, 1.0), skips=("uniform",), spread_seed=1,
        spread_steps=(10,), extractor=_flat, reference=(mu.numpy(), cov.numpy()), shape=(1, D_SIDE, D_SIDE),
        out_dir=str(tmp_path), fingerprint="gaussian", log=None,
    )
    fd = {(c["S"], c["eta"], c["seed"]): c["fd"] for c in data["cells"].values()}
    for seed in (0, 1):
        assert fd[(10, 0.0, seed)] < 0.9 * fd[(10, 1.0, seed)], fd
    assert fd[(100, 0.0, 0)] < fd[(10, 0.0, 0)] and fd[(100, 1.0, 0)] < fd[(10, 1.0, 0)], fd
    spread = abs(fd[(10, 0.0, 0)] - fd[(10, 0.0, 1)])
    assert fd[(10, 1.0, 0)] - fd[(10, 0.0, 0)] > 3 * spread, "the difference must exceed the seed spread"
    md = (tmp_path / "table1.md").read_text()
    assert "Spread" in md and "| 0 |" in md


def test_table2_trend_reconstruction_error_falls_with_S(gaussian_model, tmp_path):
    x0 = gaussian_model.sample_data(64, generator=torch.Generator().manual_seed(1)).float().reshape(64, 1, D_SIDE, D_SIDE)
    data = experiments.table2(gaussian_model, SCHEDULE, steps=(5, 10, 20, 50), images=x0, out_dir=str(tmp_path),
                              fingerprint="gaussian", log=None)
    mse = [data["cells"][f"uniform|S={S}|n=64"]["mse"] for S in (5, 10, 20, 50)]
    assert all(b < a for a, b in zip(mse, mse[1:])), mse
    assert "paper (CIFAR-10)" in (tmp_path / "table2.md").read_text()


def test_tables_resume_from_their_cell_cache(gaussian_model, tmp_path):
    """A second run with the same settings samples nothing; a wider run only the new cells."""
    mu, cov = gaussian_model.data_moments()
    counting = _Counting(gaussian_model)
    kw = dict(n=50, etas=(0.0,), skips=("uniform",), spread_seed=None, extractor=_flat, reference=(mu.numpy(), cov.numpy()),
              shape=(1, D_SIDE, D_SIDE), out_dir=str(tmp_path), fingerprint="gaussian", log=None)
    experiments.table1(counting, SCHEDULE, steps=(5,), **kw)
    assert counting.images == 50 * 5
    experiments.table1(counting, SCHEDULE, steps=(5,), **kw)
    assert counting.images == 50 * 5
    experiments.table1(counting, SCHEDULE, steps=(5, 10), **kw)
    assert counting.images == 50 * 5 + 50 * 10
    cells = json.loads((tmp_path / "table1_cells.json").read_text())
    assert cells["model"] == "gaussian" and len(cells["cells"]) == 2
    with pytest.raises(ValueError, match="another model.*--fresh"):
        experiments.table1(counting, SCHEDULE, steps=(5,), **{**kw, "fingerprint": "other"})


def test_solvers_table_multistep_beats_ddim_at_equal_steps(gaussian_model, tmp_path):
    """The solvers table on the closed-form model: at S = 10 the multistep solvers (log-SNR steps)
    are closer to the data than DDIM at S = 10, in both seeds; the Markdown states each verdict."""
    mu, cov = gaussian_model.data_moments()
    cells = (("dpmpp_3m", "logsnr", 10), ("dpmpp_2m", "logsnr", 10), ("ddim", "uniform", 10), ("ddim", "uniform", 50))
    data = experiments.solvers_table(
        gaussian_model, SCHEDULE, n=1000, seeds=(0, 1), cells=cells, extractor=_flat, reference=(mu.numpy(), cov.numpy()),
        shape=(1, D_SIDE, D_SIDE), out_dir=str(tmp_path), fingerprint="gaussian", log=None,
    )
    fd = {(c["solver"], c["S"], c["seed"]): c["fd"] for c in data["cells"].values()}
    assert len(fd) == 8
    for seed in (0, 1):
        assert fd[("dpmpp_2m", 10, seed)] < fd[("ddim", 10, seed)] and fd[("dpmpp_3m", 10, seed)] < fd[("ddim", 10, seed)], fd
    md = (tmp_path / "solvers.md").read_text()
    assert "| dpmpp_3m (logsnr) | 10 |" in md and "- S = 10: best multistep solver dpmpp_" in md and "vs DDIM at S = 50" in md
    counting = _Counting(gaussian_model)
    again = experiments.solvers_table(  # resumes: nothing recomputed
        counting, SCHEDULE, n=1000, seeds=(0, 1), cells=cells, extractor=_flat, reference=(mu.numpy(), cov.numpy()),
        shape=(1, D_SIDE, D_SIDE), out_dir=str(tmp_path), fingerprint="gaussian", log=None,
    )
    assert again["cells"] == data["cells"] and counting.images == 0


def _without_seconds(cells):
    return {k: {f: v for f, v in c.items() if f != "seconds"} for k, c in cells.items()}


def test_a_killed_table_run_resumes_to_the_uninterrupted_result(gaussian_model, tmp_path):
    """Killed in its third cell, a Table 1 run keeps the two finished cells; the resumed run
    computes only the rest, and its cells and Markdown equal those of a run never interrupted."""
    mu, cov = gaussian_model.data_moments()
    kw = dict(n=40, steps=(2, 4, 5), etas=(0.0,), skips=("uniform",), spread_seed=1, spread_steps=(2,), extractor=_flat,
              reference=(mu.numpy(), cov.numpy()), shape=(1, D_SIDE, D_SIDE), fingerprint="gaussian", log=None)
    whole = experiments.table1(gaussian_model, SCHEDULE, out_dir=str(tmp_path / "whole"), **kw)
    assert len(whole["cells"]) == 4  # S = 2 with both seeds, S = 4 and 5 with seed 0
    killed = _Counting(gaussian_model, stop_after=40 * (2 + 2))  # cheapest first: S = 2 twice, then S = 4 dies
    with pytest.raises(KeyboardInterrupt):
        experiments.table1(killed, SCHEDULE, out_dir=str(tmp_path / "run"), **kw)
    cached = json.loads((tmp_path / "run" / "table1_cells.json").read_text())["cells"]
    assert sorted(c["S"] for c in cached.values()) == [2, 2]
    resumed = _Counting(gaussian_model)
    data = experiments.table1(resumed, SCHEDULE, out_dir=str(tmp_path / "run"), **kw)
    assert resumed.images == 40 * (4 + 5)
    assert _without_seconds(data["cells"]) == _without_seconds(whole["cells"])
    assert (tmp_path / "run" / "table1.md").read_text() == (tmp_path / "whole" / "table1.md").read_text()


def test_time_budget_starts_no_cell_after_it(gaussian_model, tmp_path, monkeypatch):
    """With a clock that advances one minute per reading, a 2.5-minute budget lets exactly the
    cells that start before it run (the first reading sets the deadline); the rest show as '—'."""
    from ddim_fast.experiments import driver

    minutes = iter(range(1000))
    monkeypatch.setattr(driver, "_clock", lambda: 60.0 * next(minutes))
    mu, cov = gaussian_model.data_moments()
    data = experiments.table1(gaussian_model, SCHEDULE, n=20, steps=(2, 3, 4, 5), etas=(0.0,), skips=("uniform",),
                              spread_seed=None, extractor=_flat, reference=(mu.numpy(), cov.numpy()), shape=(1, 8, 8),
                              out_dir=str(tmp_path), fingerprint="g", max_minutes=2.5, log=None)
    assert sorted(c["S"] for k, c in data["cells"].items() if not k.startswith("real")) == [2, 3]
    assert "| 0 | " in (tmp_path / "table1.md").read_text() and "—" in (tmp_path / "table1.md").read_text()


# ---------------------------------------------------------------------------------------------
# figures, timing, command line
# ---------------------------------------------------------------------------------------------
def test_figures_are_written(tiny, tmp_path):
    _, model, schedule = tiny
    p1 = experiments.figure_consistency(model, schedule, str(tmp_path / "c.png"), rows=2, steps=(2, 5), scale=2)
    p2 = experiments.figure_interpolate(model, schedule, str(tmp_path / "i.png"), pairs=1, num=3, steps=4, ddpm_t=(10,), scale=2)
    p3 = experiments.figure_sequence(model, schedule, str(tmp_path / "s.png"), n=1, steps=5, cols=3, scale=2)
    sizes = [Image.open(p).size for p in (p1, p2, p3)]
    assert all(w > 16 and h > 16 for w, h in sizes), sizes
    # consistency: 2 columns of 16 px tiles (+ padding); interpolate: 2 rows of 3 tiles
    assert sizes[0][0] == 2 * (16 + 2) + 2


def test_timing_fits_a_line(tiny, tmp_path):
    _, model, schedule = tiny
    res = experiments.timing(model, schedule, steps=(2, 8), n=2, out_dir=str(tmp_path), log=None)
    assert [r["S"] for r in res["rows"]] == [2, 8] and res["slope_s_per_step_per_sample"] > 0
    assert (tmp_path / "timing.md").exists() and (tmp_path / "timing.png").exists()


def test_line_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    panels = [{"title": "a", "series": [("x", [10, 100], [3.0, 1.0]), ("y", [10, 100], [5.0, 2.0])]},
              {"title": "b", "series": [("x", [10, 1000], [4.0, 0.5])]}]
    out = tmp_path / "p.png"
    experiments.line_plot(panels, str(out), xlabel="S", ylabel="FD", xlog=True, ylog=True)
    img = Image.open(out)
    assert img.size == (2 * 460, 360)
    colours = {tuple(px) for px in np.asarray(img.convert("RGB")).reshape(-1, 3)[::7]}
    assert len(colours) > 10  # axes, text, two coloured series: not a blank canvas


def test_tables_without_matplotlib_write_markdown_and_name_the_extra(gaussian_model, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as when not installed
    with pytest.raises(experiments.MissingExtraError, match=r'pip install -e "\.\[plots\]"'):
        experiments.line_plot([{"title": "", "series": []}], str(tmp_path / "p.png"), xlabel="", ylabel="", xlog=False, ylog=False)
    x0 = gaussian_model.sample_data(4, generator=torch.Generator().manual_seed(1)).float().reshape(4, 1, D_SIDE, D_SIDE)
    lines = []
    experiments.table2(gaussian_model, SCHEDULE, steps=(2,), images=x0, out_dir=str(tmp_path), fingerprint="g", log=lines.append)
    assert (tmp_path / "table2.md").exists() and not (tmp_path / "table2.png").exists()
    assert any("table2.png not drawn" in m and ".[plots]" in m for m in lines), lines


def test_eval_fd_scores_an_npz(tmp_path, capsys):
    """`ddim-fast eval fd --npz` scores a uint8 .npz (sample --npz's format): real digits score near
    the real-data floor, a blurred copy of them much worse; other image sizes are refused."""
    from ddim_fast import metrics
    from ddim_fast.cli import main
    from ddim_fast.data import to_uint8

    x, _ = metrics._digits()
    real, blurred = tmp_path / "real.npz", tmp_path / "blurred.npz"
    np.savez(real, images=to_uint8(x))
    np.savez(blurred, images=to_uint8(torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)))
    assert main(["eval", "fd", "--npz", str(real)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == len(x) and got["fd"] < 0.05 and got["labels"]["coverage"] == 10
    assert experiments.npz_scores(str(blurred))["fd"] > 10 * max(got["fd"], 0.1)
    assert main(["eval", "fd", "--npz", str(real), "--subset-size", "500"]) == 0
    sub = json.loads(capsys.readouterr().out)["subsets"]
    assert len(sub["fd"]) == len(x) // 500 and sub["sd"] > 0 and min(sub["fd"]) > got["fd"]  # smaller n: more bias
    with pytest.raises(ValueError, match="subset_size"):
        experiments.npz_scores(str(real), subset_size=len(x))
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["eval", "fd", "--npz", str(small)]) == 2
    assert "1x16x16" in capsys.readouterr().err
