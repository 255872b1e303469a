"""The `ddim-fast` command: sample (embedded model and training checkpoints), train, export."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fast.cli import build_parser, main
from ddim_fast.data import load_npz
from ddim_fast.train import ASSET_PATH

needs_asset = pytest.mark.skipif(
    not os.path.isfile(ASSET_PATH),
    reason=f"the embedded model {ASSET_PATH} is not in place yet (it is exported from runs/digits when training ends)",
)

TRAIN = [
    "train", "--data", "digits", "--image-size", "8", "--steps", "3", "--batch", "16", "--ch", "8", "--ch-mult", "1,2",
    "--num-res-blocks", "1", "--attn", "4", "--num-groups", "4", "--sample-every", "1000", "--no-progress",
    "--lr", "2e-3", "--warmup", "1", "--threads", "1",
]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@needs_asset
def test_sample_embedded_model_writes_the_requested_grid(tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "x.npz"
    rc = main(["sample", "--steps", "10", "--eta", "0", "--n", "6", "--nrow", "3", "--scale", "1", "--seed", "0",
               "--out", str(png), "--npz", str(npz)])
    assert rc == 0
    assert Image.open(png).size == (3 * 17 + 1, 2 * 17 + 1)  # 3 x 2 tiles of 16 px, 1 px apart
    x, _ = load_npz(str(npz))
    assert x.shape == (6, 1, 16, 16)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "x.npz"]


@needs_asset
def test_console_script_default_grid(tmp_path):
    exe = shutil.which("ddim-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "ddim_fast.cli"]
    png = tmp_path / "grid.png"
    proc = subprocess.run([*cmd, "sample", "--steps", "5", "--n", "16", "--out", str(png)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout
    assert Image.open(png).size == (4 * 65 + 1, 4 * 65 + 1)  # 4x4 grid, 16 px tiles enlarged 4x by default


def test_sample_from_a_training_run(run_dir, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    common = ["sample", "--ckpt", str(run_dir), "--steps", "5", "--n", "3", "--seed", "7"]
    assert main([*common, "--out", str(tmp_path / "a.png"), "--npz", str(a)]) == 0
    assert main([*common, "--out", str(tmp_path / "b.png"), "--npz", str(b), "--weights", "model"]) == 0
    assert main([*common, "--out", str(tmp_path / "c.png"), "--eta", "1", "--skip", "quad"]) == 0
    assert main([*common, "--out", str(tmp_path / "d.png"), "--skip", "0,300,600,900"]) == 0
    xa, xb = load_npz(str(a))[0], load_npz(str(b))[0]
    assert xa.shape == (3, 1, 8, 8) and not torch.equal(xa, xb)  # EMA and raw weights differ
    assert main([*common, "--out", str(tmp_path / "a2.png"), "--npz", str(tmp_path / "a2.npz")]) == 0
    np.testing.assert_array_equal(np.load(a)["arr_0"], np.load(tmp_path / "a2.npz")["arr_0"])  # same seed


def test_sample_with_a_multistep_solver(run_dir, tmp_path, capsys):
    """--solver reaches FusedSampler (the images equal the API's), for the grid and the sharded --npz path."""
    from ddim_fast import FusedSampler
    from ddim_fast.data import to_uint8
    from ddim_fast.train import load_model

    common = ["sample", "--ckpt", str(run_dir), "--steps", "6", "--n", "3", "--seed", "5", "--precision", "fp32"]
    for solver in ("dpmpp_2m", "dpmpp_3m"):
        npz = tmp_path / f"{solver}.npz"
        assert main([*common, "--solver", solver, "--skip", "logsnr", "--out", str(tmp_path / "g.png"), "--npz", str(npz)]) == 0
        assert solver in capsys.readouterr().out
        model, schedule = load_model(str(run_dir))
        sampler = FusedSampler(model, schedule=schedule, steps=6, skip="logsnr", solver=solver, precision="fp32")
        expected = to_uint8(sampler.sample(shape=(3, 1, 8, 8), seed=5).clamp(-1, 1))
        np.testing.assert_array_equal(np.load(npz)["arr_0"], expected)
    assert main([*common, "--solver", "dpmpp_2m", "--eta", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert "eta: the multistep solver" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--solver", "euler", "--out", str(tmp_path / "g.png")])


def test_export_then_sample(run_dir, tmp_path, capsys):
    dst = tmp_path / "m" / "model.json"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(dst), "--fp16"]) == 0
    assert sorted(os.listdir(dst.parent)) == ["model.json", "model.safetensors"]
    assert main(["sample", "--ckpt", str(dst), "--steps", "4", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0


def test_errors_are_clear(run_dir, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--eta expects"):
        main(["sample", "--ckpt", str(run_dir), "--eta", "big", "--out", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit, match="--out must name a .png"):
        main(["sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "g.jpg")])
    with pytest.raises(SystemExit, match="--lr cannot change on --resume"):
        main(["train", "--out", str(run_dir), "--resume", "--lr", "1"])
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--ch-mult", "1,x"])


def test_train_resume_through_the_cli(run_dir):
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "4", "--no-progress"]) == 0
    from ddim_fast.train import read_checkpoint

    assert read_checkpoint(str(run_dir))[0]["step"] == 4


def test_help_lists_the_subcommands():
    text = build_parser().format_help()
    for cmd in ("sample", "train", "export"):
        assert cmd in text
