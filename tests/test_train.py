"""L_simple training: loss goes down, checkpoints round-trip, resume is exact, corrupt files fail
clearly (never through pickle), and 2-process torchrun equals 1 process."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ddim_fast import checkpoints
from ddim_fast import train as train_mod
from ddim_fast.data import load_digits
from ddim_fast.schedule import NoiseSchedule
from ddim_fast.train import BOOKKEEPING, CheckpointError, TrainConfig, export_model, load_model, read_checkpoint, train

TINY = dict(
    data="digits", image_size=8, batch=16, lr=2e-3, warmup=2, ch=8, ch_mult=(1, 2), num_res_blocks=1,
    attn_resolutions=(4,), dropout=0.1, num_groups=4, ckpt_every=3, sample_every=1000, log_every=2,
    sample_steps=4, num_samples=4, progress=False,
)


def tiny_cfg(out, **kw):
    return TrainConfig(out=str(out), **{**TINY, **kw})


def fixed_batch_loss(model, n=256):
    """L_simple of ``model`` on a fixed batch of 8x8 digits, t and eps (independent of training)."""
    x0 = load_digits(8)[0][:n]
    g = torch.Generator().manual_seed(1234)
    t = torch.randint(0, 1000, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = NoiseSchedule.linear(1000).add_noise(x0, eps, t)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.eval()(x_t, t), eps).item()


def file_tensors(out):
    return read_checkpoint(str(out))[1]


def test_a_few_steps_reduce_the_loss(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=40, dropout=0.0, ckpt_every=40))
    start = train_mod.model_from_train_config(tiny_cfg(out), 1, 8)  # conv_out is zero: predicts eps = 0
    before = fixed_batch_loss(start)
    after = fixed_batch_loss(load_model(str(out), weights="model")[0])
    assert before == pytest.approx(1.0, abs=0.1)
    assert after < 0.6 * before, f"loss {before:.3f} -> {after:.3f} after 40 steps"
    meta = read_checkpoint(str(out))[0]
    assert meta["step"] == 40 and meta["final"] is True
    assert os.path.isfile(out / "samples" / "step_00000040.png")
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(2, 41, 2)) and lines[-1]["loss"] < lines[0]["loss"]


def test_checkpoint_round_trip(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=3))
    meta, tensors = read_checkpoint(str(out))
    assert meta["step"] == 3 and meta["contents"] == ["model", "ema", "optimizer"]
    assert meta["schedule"] == {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert meta["data"]["normalization"]["range"] == [-1.0, 1.0]
    assert sorted(os.listdir(out)) == ["checkpoint-00000003.safetensors", "checkpoint.json", "metrics.jsonl", "samples"]
    for which in ("model", "ema"):
        model, schedule = load_model(str(out), weights=which)
        assert not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, tensors[f"{which}/{k}"]), k
    torch.testing.assert_close(schedule.alphas_cumprod, NoiseSchedule.linear(1000).alphas_cumprod, rtol=0, atol=0)
    # The same checkpoint through each way of naming it.
    for name in ("checkpoint.json", "checkpoint-00000003.safetensors"):
        assert read_checkpoint(str(out / name))[0]["step"] == 3
    # The optimizer state survives flattening into safetensors.
    model = train_mod.model_from_train_config(tiny_cfg(out), 1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_mod._unflatten_optimizer(opt, tensors, meta["optimizer"])
    flat, info = train_mod._flatten_optimizer(opt)
    assert set(flat) == {k for k in tensors if k.startswith("optim/")}
    assert all(torch.equal(flat[k], tensors[k]) for k in flat)
    assert info["param_groups"] == meta["optimizer"]["param_groups"]


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    train(tiny_cfg(tmp_path / "a", steps=7))

    def kill_after_5(step, loss):
        if step == 5:
            raise Killed  # dies between steps 5 and 6: the last checkpoint is step 3

    with pytest.raises(Killed):
        train(tiny_cfg(tmp_path / "b", steps=7), callback=kill_after_5)
    assert read_checkpoint(str(tmp_path / "b"))[0]["step"] == 3
    summary = train(tiny_cfg(tmp_path / "b", steps=7), resume=True)
    assert summary["steps"] == 7
    a, b = file_tensors(tmp_path / "a"), file_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed run differs in {differ[:5]}"
    # metrics.jsonl: the lines written after the step-3 checkpoint (step 4) are not repeated.
    steps = lambda d: [json.loads(line)["step"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert steps(tmp_path / "b") == steps(tmp_path / "a") == [2, 4, 6, 7]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (what "untouched" is checked against)."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, folder)] = open(p, "rb").read()
    return files


def test_resume_can_extend_but_not_change_the_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    train(TrainConfig.from_checkpoint(str(out), steps=4), resume=True)
    meta = read_checkpoint(str(out))[0]
    assert meta["step"] == 4 and meta["train"]["lr"] == 2e-3 and meta["train"]["steps"] == 4
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(tiny_cfg(tmp_path / "empty", steps=2), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        TrainConfig.from_checkpoint(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "change",
    [dict(lr=1.0), dict(batch=8), dict(ch=16), dict(image_size=16), dict(seed=1), dict(ema_decay=0.9), dict(flip=True)],
)
def test_resume_refuses_a_changed_setting_and_names_it(tmp_path, change):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    before = snapshot(out)
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"^{name}: cannot change on resume \(the run in .* has"):
        TrainConfig.from_checkpoint(str(out), steps=3, **change)
    with pytest.raises(ValueError, match=rf"^{name}: cannot change on resume"):  # the API's full config, too
        train(tiny_cfg(out, steps=3, **change), resume=True)
    assert snapshot(out) == before
    # Naming a fixed setting with the run's own value is not a change.
    same = {name: TINY.get(name, getattr(TrainConfig(), name))}
    assert TrainConfig.from_checkpoint(str(out), **same).to_json() == read_checkpoint(str(out))[0]["train"] | {"out": str(out)}
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['colour'\]"):
        TrainConfig.from_checkpoint(str(out), colour=1)


def test_resume_keeps_the_runs_own_settings(tmp_path):
    """ckpt_every, log_every, steps... come back from the checkpoint, not from TrainConfig's defaults."""
    from ddim_fast.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2, ckpt_every=1, log_every=1))
    cfg = TrainConfig.from_checkpoint(str(out))
    saved = read_checkpoint(str(out))[0]["train"]
    assert cfg.to_json() == {**saved, "out": str(out)}
    assert (cfg.steps, cfg.ckpt_every, cfg.log_every) == (2, 1, 1)
    assert (1, 1) != (BOOKKEEPING["ckpt_every"], BOOKKEEPING["log_every"])  # so the test can tell them apart
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    meta = read_checkpoint(str(out))[0]
    assert meta["step"] == 3 and meta["train"]["ckpt_every"] == 1 and meta["train"]["log_every"] == 1
    # The API: a TrainConfig that leaves the bookkeeping unset (None) gets the run's values too.
    identity = {k: v for k, v in TINY.items() if k not in BOOKKEEPING}
    assert train(TrainConfig(out=str(out), **identity), resume=True)["already_finished"] is True  # steps: the run's 3
    train(TrainConfig(out=str(out), steps=4, **identity), resume=True)
    assert read_checkpoint(str(out))[0]["train"] == {**meta["train"], "steps": 4}
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]  # log_every 1 kept
    # An option given on the command line does change a resumable setting.
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--log-every", "2", "--no-progress"]) == 0
    assert read_checkpoint(str(out))[0]["train"]["log_every"] == 2
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 6]


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys):
    from ddim_fast.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    before = snapshot(out)
    # No --steps: the run's own target (2), not TrainConfig's default 10000.
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "already finished at step 2" in captured.err and "--steps" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["already_finished"] is True
    summary = train(TrainConfig.from_checkpoint(str(out)), resume=True)
    assert summary["already_finished"] is True and summary["steps"] == 2
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"steps: the run in .* is already at step 2; expected steps >= 2"):
        train(TrainConfig.from_checkpoint(str(out), steps=1), resume=True)
    assert snapshot(out) == before


def test_training_into_an_existing_run_is_refused(tmp_path, capsys):
    from ddim_fast.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    (out / "my_notes.txt").write_text("not ours")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"already holds a training run \(checkpoint-00000002.safetensors, checkpoint.json, "
                                         r"metrics.jsonl, samples\); pass --resume .* --fresh"):
        train(tiny_cfg(out, steps=3))
    assert main(["train", "--out", str(out), "--steps", "3", "--data", "digits", "--image-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--fresh" in err and "Traceback" not in err
    assert snapshot(out) == before
    # A run killed before its first checkpoint left only metrics: still a run, still refused.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 2}\n')
    with pytest.raises(ValueError, match=r"already holds a training run \(metrics.jsonl\)"):
        train(tiny_cfg(killed, steps=3))
    assert (killed / "metrics.jsonl").read_text() == '{"step": 2}\n'
    # An --out that is a file is an error naming it; an empty folder or one with other files is fine.
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out: .*file' is a file; expected a folder"):
        train(tiny_cfg(tmp_path / "file", steps=1))
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.md").write_text("mine")
    train(tiny_cfg(other, steps=1))
    assert (other / "readme.md").read_text() == "mine"


def test_fresh_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    (out / "my_notes.txt").write_text("not ours")
    before = snapshot(out)
    with pytest.raises(ValueError, match="fresh: cannot be combined with resume"):
        train(tiny_cfg(out, steps=3), resume=True, fresh=True)
    # A fresh run that cannot start (bad data, bad device) has moved nothing.
    with pytest.raises(FileNotFoundError, match="data: .*no such file or folder"):
        train(tiny_cfg(out, steps=3, data=str(tmp_path / "nope")), fresh=True)
    with pytest.raises(ValueError, match="device: expected auto, cpu, cuda or cuda:N, got 'xyz'"):
        train(tiny_cfg(out, steps=3, device="xyz"), fresh=True)
    assert snapshot(out) == before
    summary = train(tiny_cfg(out, steps=3, seed=1), fresh=True)
    prev = summary["previous_run"]
    assert os.path.dirname(prev) == str(out) and os.path.basename(prev).startswith("previous-")
    # Every old file is there, byte for byte: the run files under previous-*/, the rest untouched.
    moved = {os.path.relpath(os.path.join(prev, k), out): v for k, v in snapshot(prev).items()}
    assert {**moved, "my_notes.txt": (out / "my_notes.txt").read_bytes()} == {
        (os.path.join(os.path.basename(prev), k) if k != "my_notes.txt" else k): v for k, v in before.items()
    }
    assert read_checkpoint(prev)[0]["step"] == 2 and load_model(prev)[0] is not None  # still a loadable run
    assert read_checkpoint(str(out))[0]["step"] == 3
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2, 3]  # not appended to


def test_resume_never_deletes_a_weights_file_it_did_not_name(tmp_path):
    """A checkpoint.json may name any plain file in its folder; the run deletes only checkpoint-<step> files."""
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    w = _weights(out)
    mine = out / "my_weights.safetensors"
    mine.write_bytes(w.read_bytes())
    _edit_json(out, lambda m: m.update(weights=mine.name))
    w.unlink()
    train(TrainConfig.from_checkpoint(str(out), steps=3, ckpt_every=1), resume=True)
    assert mine.is_file() and read_checkpoint(str(out))[0]["weights"] == "checkpoint-00000003.safetensors"


def test_a_failed_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=3))
    real = checkpoints.atomic_write_bytes
    calls = []

    def fail_on_json(path, data):
        calls.append(path)
        if path.endswith(".json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(checkpoints, "atomic_write_bytes", fail_on_json)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_cfg(out, steps=6), resume=True)
    monkeypatch.undo()
    assert read_checkpoint(str(out))[0]["step"] == 3  # still loads, hash still matches
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=1, ckpt_every=1))
    return out


def _weights(out):
    return out / json.load(open(out / "checkpoint.json"))["weights"]


def test_truncated_weights(ckpt):
    w = _weights(ckpt)
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001\.safetensors.*truncated, corrupt or was edited"):
        load_model(str(ckpt))


def test_edited_weights_byte(ckpt):
    w = _weights(ckpt)
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(str(ckpt))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(tiny_cfg(ckpt, steps=2), resume=True)


def _edit_json(out, fn):
    p = out / "checkpoint.json"
    meta = json.load(open(p))
    fn(meta)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["model"].update(ch=16), "do not fit the model config"),
        (lambda m: m["model"].update(num_groups=3), "bad model config: num_groups"),
        (lambda m: m["schedule"].update(kind="sqrt"), "unknown kind 'sqrt'"),
        (lambda m: m.update(weights="missing.safetensors"), "do not exist"),
        (lambda m: m.update(format="something"), "is not a ddim_fast.checkpoint"),
        (lambda m: m.pop("model"), "lacks the entry 'model'"),
        (lambda m: m.update(schedule={"kind": "betas"}), r"schedule: kind 'betas' needs the key 'betas'"),
        (lambda m: m.update(schedule={"kind": "betas", "betas": [0.1, 1.5]}), r"schedule: betas: expected every beta"),
        (lambda m: m.update(schedule={"kind": "betas", "betas": "0.1"}), r"schedule: 'betas' must be a list"),
        (lambda m: m.update(schedule={"kind": "linear", "T": 10**12}), r"schedule: 'T' must be an integer in \[1, 1000000\]"),
        (lambda m: m.update(schedule={"kind": "linear", "beta_end": 2.0}), r"schedule: bad arguments for 'linear'"),
        (lambda m: m["model"].update(ch_mult=[1, 2.5]), r"bad model config: ch_mult: expected"),
    ],
)
def test_hand_edited_json(ckpt, edit, match):
    _edit_json(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(str(ckpt))


def test_schedule_without_betas_through_the_cli(ckpt, tmp_path, capsys):
    from ddim_fast.cli import main

    _edit_json(ckpt, lambda m: m.update(schedule={"kind": "betas"}))
    assert main(["sample", "--ckpt", str(ckpt), "--steps", "2", "--n", "1", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "kind 'betas' needs the key 'betas'" in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@pytest.fixture
def no_allocation(monkeypatch):
    """Records the default device of every UNet construction, and fails any read of tensor data."""
    from ddim_fast.nn.unet import UNet

    devices = []
    real = UNet.__init__

    def init(self, *a, **k):
        devices.append(torch.empty(0).device.type)  # "meta" inside UNet.state_shapes
        real(self, *a, **k)

    def no_read(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(UNet, "__init__", init)
    monkeypatch.setattr(checkpoints, "_read_tensors", no_read)
    monkeypatch.setattr(train_mod, "_read_tensors", no_read)
    return devices


def _escape_message(ckpt, name, make_target):
    """The error for a checkpoint whose weights entry is ``name``, before and after its target exists."""
    _edit_json(ckpt, lambda m: m.update(weights=name))
    messages = []
    for exists in (False, True):
        if exists:
            make_target()
        for load in (load_model, read_checkpoint):
            with pytest.raises(CheckpointError) as e:
                load(str(ckpt))
            messages.append(str(e.value))
    return messages


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subfolder", "backslash", "not_safetensors", "nul"])
def test_weights_outside_the_folder_are_refused(ckpt, kind):
    outside = ckpt.parent / "outside.safetensors"
    blob = _weights(ckpt).read_bytes()  # a valid weights file: it must still not be loaded from there
    name = {
        "dotdot": "../outside.safetensors",
        "absolute": str(outside),
        "subfolder": "sub/../../outside.safetensors",
        "backslash": "..\\outside.safetensors",
        "not_safetensors": "../outside.bin",
        "nul": "outside.safetensors\0.txt",
    }[kind]
    messages = _escape_message(ckpt, name, lambda: outside.write_bytes(blob))
    assert all("'weights' must be the plain name of a .safetensors file in the checkpoint's own folder" in m for m in messages)
    # Nothing about the target: the same words whether it exists or not, and never its size.
    assert len(set(messages)) == 1 and str(len(blob)) not in messages[0]


def test_a_symlink_out_of_the_folder_is_refused(ckpt):
    outside = ckpt.parent / "outside.safetensors"
    w = _weights(ckpt)
    blob = w.read_bytes()
    (ckpt / "link.safetensors").symlink_to(os.path.join("..", outside.name))
    messages = _escape_message(ckpt, "link.safetensors", lambda: outside.write_bytes(blob))
    assert all("is a symbolic link that leads outside the checkpoint's folder" in m for m in messages)
    assert len(set(messages)) == 1 and str(len(blob)) not in messages[0] and str(outside) not in messages[0]
    with pytest.raises(CheckpointError, match="symbolic link that leads outside"):
        train(TrainConfig.from_checkpoint(str(ckpt), steps=2), resume=True)
    # A link that stays inside the folder is an ordinary file name.
    (ckpt / "inside.safetensors").symlink_to(w.name)
    _edit_json(ckpt, lambda m: m.update(weights="inside.safetensors"))
    assert load_model(str(ckpt))[0].config["ch"] == 8


def test_oversized_model_config_is_refused_before_allocation(ckpt, no_allocation):
    _edit_json(ckpt, lambda m: m["model"].update(ch=4096))
    with pytest.raises(CheckpointError, match=r"bad model config: ch: expected a positive integer up to 2048, got 4096"):
        load_model(str(ckpt))
    # Within the bounds but not what the file holds: the safetensors header says so, before any weights.
    _edit_json(ckpt, lambda m: m["model"].update(ch=512))
    with pytest.raises(CheckpointError, match=r"do not fit the model config; wrong shapes \(file vs config\) \['temb.0.weight: \(32, 8\) vs \(2048, 512\)"):
        load_model(str(ckpt))
    assert no_allocation and set(no_allocation) == {"meta"}


def test_oversized_train_config_is_refused_on_resume_before_allocation(ckpt, no_allocation):
    def grow(m):
        m["model"].update(ch=512)
        m["train"].update(ch=512)

    _edit_json(ckpt, grow)
    with pytest.raises(CheckpointError, match=r"\(model\): the weights do not fit the model config"):
        train(TrainConfig.from_checkpoint(str(ckpt), steps=2), resume=True)
    assert no_allocation and set(no_allocation) == {"meta"}


def test_write_checkpoint_takes_only_a_plain_weights_name(tmp_path):
    with pytest.raises(CheckpointError, match="'weights' must be the plain name"):
        train_mod.write_checkpoint(str(tmp_path / "c.json"), {"a": torch.zeros(1)}, {}, weights_name="../a.safetensors")
    assert not list(tmp_path.iterdir()) and not (tmp_path.parent / "a.safetensors").exists()


def test_truncated_json(ckpt):
    p = ckpt / "checkpoint.json"
    p.write_text(p.read_text()[:100])
    with pytest.raises(CheckpointError, match=r"checkpoint\.json' is not valid JSON"):
        load_model(str(ckpt))


def test_garbage_weights_with_matching_hash(ckpt):
    import hashlib

    w = _weights(ckpt)
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    _edit_json(ckpt, lambda m: m.update(sha256=hashlib.sha256(w.read_bytes()).hexdigest()))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(str(ckpt))


def test_loading_never_unpickles(ckpt, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)
    load_model(str(ckpt))
    train(tiny_cfg(ckpt, steps=2), resume=True)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint.json"):
        load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="weights: expected 'ema' or 'model'"):
        load_model(str(tmp_path), weights="best")


def test_export_ema_only(ckpt, tmp_path):
    dst = tmp_path / "export" / "small.json"
    export_model(str(ckpt), str(dst), dtype=torch.float16)
    meta, tensors = read_checkpoint(str(dst))
    assert meta["contents"] == ["ema"] and meta["dtype"] == "float16"
    assert all(k.startswith("ema/") and v.dtype == torch.float16 for k, v in tensors.items())
    model, _ = load_model(str(dst))
    ema, _ = load_model(str(ckpt))
    for (k, a), b in zip(model.state_dict().items(), ema.state_dict().values()):
        torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError, match="holds no 'model' weights"):
        load_model(str(dst), weights="model")
    # Existing files are the user's: refused unless overwrite=True, and never the source checkpoint.
    before = snapshot(dst.parent)
    with pytest.raises(ValueError, match=r"out: .*small.json' already exists; .* overwrite=True"):
        export_model(str(ckpt), str(dst))
    assert snapshot(dst.parent) == before
    export_model(str(ckpt), str(dst), overwrite=True)
    src = snapshot(ckpt)
    with pytest.raises(ValueError, match="would overwrite the checkpoint being exported"):
        export_model(str(ckpt), str(ckpt / "checkpoint.json"), overwrite=True)
    with pytest.raises(ValueError, match=r"out: expected a path ending in .json"):
        export_model(str(ckpt), str(tmp_path / "x.safetensors"))
    assert snapshot(ckpt) == src
    os.rename(dst, dst.parent / "checkpoint.json")
    os.rename(dst.parent / "small.safetensors", dst.parent / "small2.safetensors")
    _edit_json(dst.parent, lambda m: m.update(weights="small2.safetensors"))
    with pytest.raises(CheckpointError, match=r"is a sampling checkpoint \(contents \['ema'\]\); only a training run"):
        train(TrainConfig.from_checkpoint(str(dst.parent), steps=5), resume=True)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        train(tiny_cfg(tmp_path, steps=0))
    with pytest.raises(ValueError, match="batch: 4096 is larger than the data set"):
        train(tiny_cfg(tmp_path, batch=4096, steps=1))
    with pytest.raises(ValueError, match="ema_decay"):
        train(tiny_cfg(tmp_path, ema_decay=1.0))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(steps=2.5), r"steps: expected a positive integer, got 2.5"),
        (dict(batch="16"), r"batch: expected a positive integer, got '16'"),
        (dict(ch_mult=(1, 2.5)), r"ch_mult: expected a sequence of positive integers"),
        (dict(attn_resolutions=(4.0,)), r"attn_resolutions: expected a sequence of positive integers"),
        (dict(image_size=8.0), r"image_size: expected a positive integer, got 8.0"),
        (dict(lr=float("nan")), r"lr: expected a positive learning rate, got nan"),
        (dict(dropout=-0.1), r"dropout: expected a probability in \[0, 1\)"),
        (dict(flip="yes"), r"flip: expected True or False"),
        (dict(T=10**7), r"T: expected a positive integer up to 1000000"),
        (dict(seed=-1), r"seed: expected an integer >= 0"),
        (dict(threads=0), r"threads: expected a positive integer"),
    ],
)
def test_config_rejects_rather_than_converts(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train(tiny_cfg(tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_torchrun_two_processes_match_one(tmp_path):
    args = [
        "train", "--data", "digits", "--image-size", "8", "--steps", "4", "--batch", "16", "--lr", "1e-3",
        "--warmup", "1", "--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "4", "--dropout", "0",
        "--num-groups", "4", "--ckpt-every", "4", "--sample-every", "1000", "--log-every", "1", "--threads", "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(train_mod.__file__))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddim_fast.cli", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        from ddim_fast.cli import main

        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp_meta, ddp = read_checkpoint(str(tmp_path / "ddp"))
    one_meta, one = read_checkpoint(str(tmp_path / "one"))
    assert ddp_meta["world_size"] == 2 and one_meta["world_size"] == 1
    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    worst = max((ddp[k] - one[k]).abs().max().item() for k in one if k.startswith("model/"))
    assert worst < 1e-5, f"2-process weights differ from 1-process by up to {worst:.2e}"


def test_horizontal_flip_changes_the_batches(tmp_path):
    train(tiny_cfg(tmp_path / "plain", steps=2, dropout=0.0))
    train(tiny_cfg(tmp_path / "flip", steps=2, dropout=0.0, flip=True))
    a, b = file_tensors(tmp_path / "plain"), file_tensors(tmp_path / "flip")
    assert read_checkpoint(str(tmp_path / "flip"))[0]["train"]["flip"] is True
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model/"))


def _next_checkpoint(out):
    """What a training run does at its next checkpoint: new weights, then the JSON naming them,
    then the old weights removed. Returns the new tensors."""
    meta, tensors = read_checkpoint(str(out))
    tensors = {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}
    keep = {k: v for k, v in meta.items() if k not in ("format", "version", "weights", "sha256", "_json_path")}
    keep["step"] = meta["step"] + 1
    checkpoints.write_checkpoint(str(out / "checkpoint.json"), tensors, keep,
                                 weights_name=f"checkpoint-{keep['step']:08d}.safetensors")  # fmt: skip
    os.remove(out / meta["weights"])
    return tensors


def _ema(model):
    return {f"ema/{k}": v for k, v in model.state_dict().items()}


def test_loading_while_the_run_checkpoints_reads_the_newer_checkpoint(ckpt, monkeypatch):
    # the run writes its next checkpoint between the reader's JSON read and its open of the weights
    real, newer = checkpoints._read_meta, {}

    def read_meta(path):
        meta = real(path)
        if not newer:
            newer["started"] = True  # _next_checkpoint reads the checkpoint too
            newer.update(_next_checkpoint(ckpt))
            del newer["started"]
        return meta

    monkeypatch.setattr(checkpoints, "_read_meta", read_meta)
    model, _ = load_model(str(ckpt))
    assert newer and all(torch.equal(v, newer[k]) for k, v in _ema(model).items())
    assert read_checkpoint(str(ckpt))[0]["step"] == 2


def test_weights_removed_after_they_were_opened_are_still_read_whole(ckpt, monkeypatch):
    # the run removes the old weights after the reader opened them (between header and data reads)
    old = read_checkpoint(str(ckpt))[1]
    real, done = checkpoints._read_header, []

    def read_header(weights):
        header = real(weights)
        if not done:
            done.append("started")  # _next_checkpoint reads the checkpoint too
            done.append(_next_checkpoint(ckpt))
        return header

    monkeypatch.setattr(checkpoints, "_read_header", read_header)
    model, _ = load_model(str(ckpt))
    assert done and all(torch.equal(v, old[k]) for k, v in _ema(model).items())


def test_a_missing_weights_file_with_an_unchanged_json_is_still_an_error(ckpt):
    os.remove(_weights(ckpt))
    with pytest.raises(CheckpointError, match="do not exist"):
        load_model(str(ckpt))
