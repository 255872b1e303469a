"""The `ddim-fast` command: sample (embedded model, training checkpoints, sharded --npz under
torchrun), tune, train, export, eval, figure; bad input exits 2 with one message, no traceback."""

import json
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
    assert "eta: the solver 'dpmpp_2m' is deterministic" in _error(capsys)
    with pytest.raises(SystemExit):
        main([*common, "--solver", "euler", "--out", str(tmp_path / "g.png")])


def test_solver_choices_are_the_librarys():
    from ddim_fast.solvers import SOLVERS

    assert {"ddim", "dpmpp_2m", "dpmpp_3m"} <= set(SOLVERS)
    for solver in SOLVERS:
        assert build_parser().parse_args(["sample", "--solver", solver]).solver == solver
        assert build_parser().parse_args(["tune", "--steps", "4", "--out", "s.json", "--solver", solver]).solver == solver


def test_export_then_sample(run_dir, tmp_path, capsys):
    dst = tmp_path / "m" / "model.json"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(dst), "--fp16"]) == 0
    assert sorted(os.listdir(dst.parent)) == ["model.json", "model.safetensors"]
    assert main(["sample", "--ckpt", str(dst), "--steps", "4", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0


def _error(capsys, command="sample"):
    """The error line a failed command ends with (after any progress log lines): no traceback."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"ddim-fast {command}: error: ") and "Traceback" not in err, err
    return last


def test_errors_are_clear(run_dir, tmp_path, capsys):
    png = str(tmp_path / "g.png")
    assert main(["sample", "--ckpt", str(tmp_path / "nope"), "--out", png]) == 2
    assert "does not exist" in _error(capsys)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(run_dir), "--eta", "big", "--out", png])
    assert e.value.code == 2 and 'argument --eta: expected a float >= 0 or "ddpm_large"' in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "g.jpg")]) == 2
    assert "--out must name a .png file" in _error(capsys)
    assert main(["train", "--out", str(run_dir), "--resume", "--lr", "1"]) == 2
    assert "lr" in _error(capsys, "train")
    for argv in (["frobnicate"], ["train", "--out", str(tmp_path), "--ch-mult", "1,x"], ["sample", "--n", "0"],
                 ["sample", "--threads", "-1"], ["sample", "--scale", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert "error: argument" in capsys.readouterr().err or argv == ["frobnicate"]


def test_device_errors_are_messages(run_dir, tmp_path, capsys):
    png = str(tmp_path / "g.png")
    for command in (["sample", "--ckpt", str(run_dir), "--out", png], ["figure", "sequence", "--out", png],
                    ["eval", "timing", "--out-dir", str(tmp_path)], ["tune", "--steps", "3", "--out", str(tmp_path / "s.json")]):
        assert main([*command, "--device", "xyz"]) == 2
        assert "--device: expected cpu, cuda or cuda:N, got 'xyz'" in _error(capsys, command[0])
    if not torch.cuda.is_available():
        assert main(["sample", "--ckpt", str(run_dir), "--out", png, "--device", "cuda"]) == 2
        assert "no cuda device is available on this machine" in _error(capsys)
        assert main([*TRAIN, "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
        assert "--device cuda" in _error(capsys, "train")
    assert not os.path.exists(png)


def test_output_errors_name_the_path_the_user_gave(run_dir, tmp_path, capsys):
    common = ["sample", "--ckpt", str(run_dir), "--steps", "2", "--n", "2"]
    folder = tmp_path / "a.png"
    folder.mkdir()
    assert main([*common, "--out", str(folder)]) == 2
    assert f"--out: {str(folder)!r} is a folder" in _error(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for option in ("--out", "--npz"):
        path = str(blocker / "x.png")
        argv = [*common, "--out", path] if option == "--out" else [*common, "--out", str(tmp_path / "g.png"), "--npz", path]
        assert main(argv) == 2
        err = _error(capsys)
        assert f"{option}: cannot write {path!r}" in err and ".tmp" not in err
    assert main(["eval", "table2", "--out-dir", str(blocker / "d")]) == 2
    assert "--out-dir: cannot write" in _error(capsys, "eval")


def test_write_failures_name_the_path_not_a_temp_file(run_dir, tmp_path, capsys, monkeypatch):
    """An OSError while writing (a full disk, a read-only mount) names --out, not the temp file."""
    from ddim_fast import data

    def full_disk(path, blob):
        raise OSError(28, "No space left on device", os.path.join(os.path.dirname(path), ".x.tmp-1"))

    monkeypatch.setattr(data, "atomic_write_bytes", full_disk)
    out = str(tmp_path / "g.png")
    assert main(["sample", "--ckpt", str(run_dir), "--steps", "2", "--n", "2", "--out", out]) == 2
    err = _error(capsys)
    assert f"--out: cannot write {out!r}: No space left on device" in err and ".tmp" not in err


def test_a_grid_too_large_is_refused_before_sampling(run_dir, tmp_path, capsys):
    common = ["sample", "--ckpt", str(run_dir), "--steps", "2", "--out", str(tmp_path / "g.png")]
    assert main([*common, "--scale", "100000"]) == 2
    assert "--scale/--nrow: a grid of 64 images" in _error(capsys) and not (tmp_path / "g.png").exists()
    assert main([*common, "--n", "2", "--nrow", "100000000"]) == 2
    assert "over the limit" in _error(capsys)
    assert main([*common, "--n", "2", "--scale", "100"]) == 0  # 8 px at 100x: 1.6 M pixels


def test_library_errors_are_messages_with_status_2(run_dir, tmp_path, capsys, monkeypatch):
    """A FloatingPointError (NaN in the trajectory) or ValueError raised inside the library."""
    import ddim_fast

    for error in (FloatingPointError("the model returned NaN at step 3"), ValueError("shape: expected 4 sizes")):
        def fail(self, *args, error=error, **kw):
            raise error

        monkeypatch.setattr(ddim_fast.FusedSampler, "sample", fail)
        assert main(["sample", "--ckpt", str(run_dir), "--steps", "2", "--n", "1", "--out", str(tmp_path / "g.png")]) == 2
        assert _error(capsys) == f"ddim-fast sample: error: {error}"


def test_a_checkpoint_schedule_without_betas_is_a_message(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    meta = json.loads((bad / "checkpoint.json").read_text())
    meta["schedule"] = {"kind": "betas"}
    (bad / "checkpoint.json").write_text(json.dumps(meta))
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    assert "betas" in _error(capsys)


def test_train_resume_through_the_cli(run_dir):
    assert main(["train", "--out", str(run_dir), "--resume", "--steps", "4", "--no-progress"]) == 0
    from ddim_fast.train import read_checkpoint

    assert read_checkpoint(str(run_dir))[0]["step"] == 4


def test_help_lists_the_subcommands():
    text = build_parser().format_help()
    for cmd in ("sample", "tune", "train", "export", "eval", "figure"):
        assert cmd in text


def test_one_step_and_single_timestep_trajectories(run_dir, tmp_path, capsys):
    """S = 1 (defect 1): the one step lands on alpha = 1 and returns the x0-prediction."""
    common = ["sample", "--ckpt", str(run_dir), "--n", "2", "--out", str(tmp_path / "g.png")]
    assert main([*common, "--steps", "1"]) == 0
    assert "1 steps" in capsys.readouterr().out
    assert main([*common, "--skip", "500", "--npz", str(tmp_path / "one.npz")]) == 0
    assert np.load(tmp_path / "one.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_npz_is_sharded_and_never_replaces_another_file(run_dir, tmp_path, capsys):
    npz, png = tmp_path / "x.npz", tmp_path / "grid.png"
    common = ["sample", "--ckpt", str(run_dir), "--n", "5", "--steps", "3", "--shard-size", "2", "--nrow", "5", "--scale", "1",
              "--out", str(png), "--threads", "1"]
    assert main([*common, "--npz", str(npz)]) == 0
    assert "3 shard(s) computed here, 0 reused" in capsys.readouterr().out
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 8, 8, 1) and "meta" in f.files
    assert Image.open(png).size == (5 * 9 + 1, 9 + 1)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "x.npz"]
    done = npz.read_bytes()
    assert main([*common, "--npz", str(npz)]) == 0  # the same run: reused as it is
    assert npz.read_bytes() == done
    assert main([*common, "--npz", str(npz), "--seed", "1"]) == 2  # another run's output
    assert f"npz: {str(npz)!r} already exists" in _error(capsys) and npz.read_bytes() == done
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main([*common, "--npz", str(notes)]) == 2
    err = _error(capsys)
    assert str(notes) in err and "--force" in err and notes.read_text() == "mine"
    assert main([*common, "--npz", str(notes), "--force"]) == 0
    assert notes.read_bytes() == done


def test_torchrun_two_processes_equal_one_process_byte_for_byte(run_dir, tmp_path):
    args = ["sample", "--ckpt", str(run_dir), "--num-samples", "10", "--steps", "5", "--eta", "1", "--batch-size", "2",
            "--shard-size", "3"]
    one = tmp_path / "one.npz"
    assert main([*args, "--npz", str(one), "--out", str(tmp_path / "one.png")]) == 0
    two = tmp_path / "two.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddim_fast.cli",
         *args, "--npz", str(two), "--out", str(tmp_path / "two.png")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2" in proc.stderr and "rank 0/2" in proc.stderr
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (10, 8, 8, 1)
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
    assert Image.open(tmp_path / "two.png").size == Image.open(tmp_path / "one.png").size


@pytest.fixture
def compile_flags(monkeypatch):
    """FusedSampler as the CLI builds it, recording its ``compile`` argument."""
    import ddim_fast

    flags, real = [], ddim_fast.FusedSampler

    class Recording(real):
        def __init__(self, *args, compile=False, **kw):
            flags.append(compile)
            super().__init__(*args, **kw)

    monkeypatch.setattr(ddim_fast, "FusedSampler", Recording)
    return flags


def test_compile_reaches_the_sampler(run_dir, tmp_path, compile_flags):
    common = ["sample", "--ckpt", str(run_dir), "--steps", "2", "--n", "2", "--out", str(tmp_path / "g.png")]
    assert main([*common, "--compile"]) == 0
    assert main([*common, "--compile", "--npz", str(tmp_path / "x.npz")]) == 0
    assert compile_flags == [True, True]
    assert main([*common]) == 0
    assert main(["eval", "timing", "--ckpt", str(run_dir), "--steps", "2", "--n", "1", "--out-dir", str(tmp_path / "t"),
                 "--compile"]) == 0
    assert compile_flags == [True, True, False, True]


def test_tune_then_sample_with_the_tuned_timesteps(run_dir, tmp_path, capsys, monkeypatch):
    """`tune` runs tune_timesteps on the checkpoint's model (replaced here by a stub: the search
    itself is tested in test_tune.py), saves the file, refuses to overwrite it; `sample --skip
    FILE.json` samples with exactly those timesteps, and only for the solver they were tuned for."""
    from ddim_fast import FusedSampler, tune
    from ddim_fast.data import to_uint8
    from ddim_fast.train import load_model

    seen = {}

    def stub(model, steps, shape, schedule=None, solver="ipndm", seed=0, model_kwargs=None, **options):
        seen.update(steps=steps, shape=shape, solver=solver, seed=seed, T=schedule.T, loss=options.get("loss"))
        options["info"]["method"] = "stub"
        return torch.tensor([0, 150, 400, 777])

    monkeypatch.setattr(tune, "tune_timesteps", stub)
    out = tmp_path / "steps.json"
    argv = ["tune", "--ckpt", str(run_dir), "--steps", "4", "--solver", "dpmpp_2m", "--batch", "5", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "0,150,400,777" in capsys.readouterr().out
    assert seen == {"steps": 4, "shape": (5, 1, 8, 8), "solver": "dpmpp_2m", "seed": 3, "T": 1000, "loss": "rms"}
    record = json.loads(out.read_text())
    assert record["timesteps"] == [0, 150, 400, 777] and record["info"]["method"] == "stub" and record["info"]["batch"] == 5
    assert main(argv) == 2
    assert "already exists; pass --force" in _error(capsys, "tune")
    assert main([*argv, "--force", "--loss", "log"]) == 0 and seen["loss"] == "log"

    npz = tmp_path / "x.npz"
    common = ["sample", "--ckpt", str(run_dir), "--n", "2", "--seed", "1", "--precision", "fp32", "--out", str(tmp_path / "g.png")]
    assert main([*common, "--solver", "dpmpp_2m", "--steps", "4", "--skip", str(out), "--npz", str(npz)]) == 0
    model, schedule = load_model(str(run_dir))
    sampler = FusedSampler(model, schedule=schedule, skip=[0, 150, 400, 777], solver="dpmpp_2m", precision="fp32")
    np.testing.assert_array_equal(np.load(npz)["arr_0"], to_uint8(sampler.sample(shape=(2, 1, 8, 8), seed=1).clamp(-1, 1)))
    assert main([*common, "--solver", "ddim", "--skip", str(out)]) == 2
    assert "solver" in _error(capsys)
    assert main(["tune", "--steps", "4", "--out", str(tmp_path / "steps.txt")]) == 2
    assert "--out must name a .json file" in _error(capsys, "tune")


def test_tune_shift_last_then_sample_tells_the_model_the_tuned_timesteps(run_dir, tmp_path, capsys, monkeypatch):
    """`tune --shift-last` passes shift_last, writes the model's timesteps (format /2) and prints
    them; `sample --skip FILE.json` (grid and --npz) tells the model exactly those."""
    from ddim_fast import FusedSampler, tune
    from ddim_fast.data import to_uint8
    from ddim_fast.train import load_model

    seen = {}

    def stub(model, steps, shape, schedule=None, solver="ipndm", seed=0, model_kwargs=None, **options):
        seen["shift_last"] = options.get("shift_last")
        options["info"].update(method="stub", model_timesteps=[21, 150, 400, 777] if options.get("shift_last") else [0, 150, 400, 777])
        return torch.tensor([0, 150, 400, 777])

    monkeypatch.setattr(tune, "tune_timesteps", stub)
    out = tmp_path / "steps.json"
    assert main(["tune", "--ckpt", str(run_dir), "--steps", "4", "--solver", "unipc", "--shift-last", "--out", str(out)]) == 0
    assert seen["shift_last"] is True and "the model told 21,150,400,777" in capsys.readouterr().out
    assert json.loads(out.read_text())["model_timesteps"] == [21, 150, 400, 777]

    model, schedule = load_model(str(run_dir))
    told = []
    real = FusedSampler

    class Recording(real):
        def __init__(self, *args, **kwargs):
            told.append(kwargs.get("model_timesteps"))
            super().__init__(*args, **kwargs)

    import ddim_fast

    monkeypatch.setattr(ddim_fast, "FusedSampler", Recording)
    npz = tmp_path / "x.npz"
    common = ["sample", "--ckpt", str(run_dir), "--n", "2", "--seed", "1", "--precision", "fp32", "--solver", "unipc", "--steps",
              "4", "--skip", str(out), "--out", str(tmp_path / "g.png")]  # fmt: skip
    assert main(common) == 0 and main([*common, "--npz", str(npz)]) == 0
    assert told == [[21, 150, 400, 777]] * 2
    sampler = real(model, schedule=schedule, skip=[0, 150, 400, 777], solver="unipc", precision="fp32",
                   model_timesteps=[21, 150, 400, 777])  # fmt: skip
    np.testing.assert_array_equal(np.load(npz)["arr_0"], to_uint8(sampler.sample(shape=(2, 1, 8, 8), seed=1).clamp(-1, 1)))
    unshifted = real(model, schedule=schedule, skip=[0, 150, 400, 777], solver="unipc", precision="fp32")
    assert not torch.equal(sampler.sample(shape=(2, 1, 8, 8), seed=1), unshifted.sample(shape=(2, 1, 8, 8), seed=1))


def test_named_timestep_selections_reach_the_sampler(run_dir, tmp_path, capsys):
    for skip in ("karras", "logsnr", "trailing"):
        assert main(["sample", "--ckpt", str(run_dir), "--steps", "5", "--n", "1", "--skip", skip, "--solver", "dpmpp_2m",
                     "--out", str(tmp_path / "g.png")]) == 0
        assert "5 steps" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run_dir), "--steps", "5", "--n", "1", "--skip", "sideways", "--out",
                 str(tmp_path / "g.png")]) == 2
    assert "skip" in _error(capsys)
