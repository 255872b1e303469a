"""ddim_fast.experiments: the paper's trends on a closed-form model, resumable tables, figures,
and sharded sampling (torchrun with 2 processes == 1 process, byte for byte)."""

import argparse
import json
import os
import subprocess
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
    """Wraps a model and counts the images it was called on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x, t):
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
    assert Image.open(tmp_path / "table1.png").size[0] > 400


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
    with pytest.raises(SystemExit, match="another model"):
        experiments.table1(counting, SCHEDULE, steps=(5,), **{**kw, "fingerprint": "other"})


def test_solvers_table_multistep_beats_ddim_at_equal_steps(gaussian_model, tmp_path):
    """Issue 8's table on the closed-form model: at S = 10 the multistep solvers (log-SNR steps)
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
    again = experiments.solvers_table(  # resumes: nothing recomputed
        gaussian_model, SCHEDULE, n=1000, seeds=(0, 1), cells=cells, extractor=_flat, reference=(mu.numpy(), cov.numpy()),
        shape=(1, D_SIDE, D_SIDE), out_dir=str(tmp_path), fingerprint="gaussian", max_minutes=0.0, log=None,
    )
    assert again["cells"] == data["cells"]


def test_table1_time_budget_stops_before_new_cells(gaussian_model, tmp_path):
    mu, cov = gaussian_model.data_moments()
    data = experiments.table1(gaussian_model, SCHEDULE, n=20, steps=(5, 10), etas=(0.0,), skips=("uniform",),
                              spread_seed=None, extractor=_flat, reference=(mu.numpy(), cov.numpy()), shape=(1, 8, 8),
                              out_dir=str(tmp_path), fingerprint="g", max_minutes=0.0, log=None)
    assert len(data["cells"]) <= 1
    assert "—" in (tmp_path / "table1.md").read_text()


# ---------------------------------------------------------------------------------------------
# sharded sampling
# ---------------------------------------------------------------------------------------------
def test_sharded_sampling_is_independent_of_batch_and_shard_size(tiny, tmp_path):
    _, model, schedule = tiny
    outs = []
    for bs, shard in ((2, 3), (5, 4), (10, 100)):
        path = tmp_path / f"b{bs}.npz"
        experiments.sample_npz(model, schedule, 10, str(path), steps=5, batch_size=bs, shard_size=shard, log=None)
        with np.load(path, allow_pickle=False) as f:
            outs.append(f["arr_0"])
            assert json.loads(str(f["meta"]))["n"] == 10
    assert outs[0].dtype == np.uint8 and outs[0].shape == (10, 8, 8, 1)
    for o in outs[1:]:
        assert np.array_equal(outs[0], o)
    assert sorted(os.listdir(tmp_path)) == ["b10.npz", "b2.npz", "b5.npz"]  # shard folders removed


def test_sharded_sampling_resumes_without_redoing_finished_shards(tiny, tmp_path):
    _, model, schedule = tiny
    counting = _Counting(model)
    counting.config = model.config
    out = str(tmp_path / "x.npz")
    kw = dict(steps=4, batch_size=2, shard_size=3, fingerprint="tiny", log=None)
    experiments.sample_npz(counting, schedule, 10, out, keep_shards=True, **kw)
    assert counting.images == 10 * 4
    with np.load(out) as f:
        full = f["arr_0"]
    # a run killed after some shards: the final file and one shard are missing
    os.unlink(out)
    os.unlink(os.path.join(out + ".shards", "shard-000000003-000000006.npz"))
    counting.images = 0
    res = experiments.sample_npz(counting, schedule, 10, out, **kw)
    assert counting.images == 3 * 4 and res["computed_shards"] == 1 and res["skipped_shards"] == 3
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], full)
    assert not os.path.exists(out + ".shards")
    counting.images = 0
    assert experiments.sample_npz(counting, schedule, 10, out, **kw)["complete"] and counting.images == 0


def test_sharded_sampling_refuses_to_mix_settings(tiny, tmp_path):
    _, model, schedule = tiny
    out = str(tmp_path / "x.npz")
    experiments.sample_npz(model, schedule, 4, out, steps=3, shard_size=2, keep_shards=True, fingerprint="tiny", log=None)
    os.unlink(out)
    with pytest.raises(ValueError, match="different settings"):
        experiments.sample_npz(model, schedule, 4, out, steps=3, shard_size=2, eta=1.0, fingerprint="tiny", log=None)


def test_torchrun_two_processes_equal_one_process_byte_for_byte(tiny, tmp_path):
    ckpt, _, _ = tiny
    args = ["sample", "--ckpt", ckpt, "--num-samples", "10", "--steps", "5", "--eta", "1", "--batch-size", "2",
            "--shard-size", "3"]
    one = tmp_path / "one.npz"
    assert experiments.main([*args, "--npz", str(one)]) == 0
    two = tmp_path / "two.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddim_fast.experiments",
         *args, "--npz", str(two), "--out", str(tmp_path / "two.png")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2" in proc.stderr and "rank 0/2" in proc.stderr
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (10, 8, 8, 1)
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
    assert Image.open(tmp_path / "two.png").size[0] > 8


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


def test_register_extends_an_existing_sample_command():
    calls = []
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("sample")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--npz", default=None)
    s.set_defaults(func=lambda a: calls.append("original") or 0)
    experiments.register(sub)
    args = p.parse_args(["sample", "--num-samples", "7"])
    assert args.n == 7 and args.batch_size == 256 and args.shard_size == 1000
    args.func(args)
    assert calls == ["original"]
    assert p.parse_args(["sample"]).n == 64
    args = p.parse_args(["eval", "table1", "--etas", "0,ddpm_large", "--steps", "10,20"])
    assert args.etas == (0.0, "ddpm_large") and args.steps == (10, 20)
    assert p.parse_args(["figure", "interpolate"]).ddpm_t == (100, 250)


def test_ddim_fast_cli_routes_npz_through_sharded_sampling_and_has_eval_and_figure(tiny, tmp_path):
    from ddim_fast.cli import build_parser, main

    ckpt, _, _ = tiny
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"sample", "eval", "figure"} <= set(choices)
    npz, png = tmp_path / "x.npz", tmp_path / "grid.png"
    assert main(["sample", "--ckpt", ckpt, "--n", "5", "--steps", "3", "--shard-size", "2", "--nrow", "5", "--scale", "1",
                 "--out", str(png), "--npz", str(npz), "--threads", "1"]) == 0
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 8, 8, 1) and "meta" in f.files
    assert Image.open(png).size == (5 * 9 + 1, 9 + 1)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "x.npz"]
    fig = tmp_path / "seq.png"
    assert main(["figure", "sequence", "--ckpt", ckpt, "--n", "1", "--steps", "4", "--out", str(fig), "--threads", "1"]) == 0
    assert fig.exists()


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
