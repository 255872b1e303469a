"""L_simple training: loss goes down, checkpoints round-trip, resume is exact, corrupt files fail
clearly (never through pickle), and 2-process torchrun equals 1 process."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ddim_fast import train as train_mod
from ddim_fast.data import load_digits
from ddim_fast.schedule import NoiseSchedule
from ddim_fast.train import CheckpointError, TrainConfig, export_model, load_model, read_checkpoint, train

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


def test_resume_can_extend_but_not_change_the_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2))
    # lr differs here, but resume takes the run's identity from the checkpoint.
    train(tiny_cfg(out, steps=4, lr=1.0), resume=True)
    meta = read_checkpoint(str(out))[0]
    assert meta["step"] == 4 and meta["train"]["lr"] == 2e-3 and meta["train"]["steps"] == 4
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(tiny_cfg(tmp_path / "empty", steps=2), resume=True)


def test_a_failed_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=3))
    real = train_mod.atomic_write_bytes
    calls = []

    def fail_on_json(path, data):
        calls.append(path)
        if path.endswith(".json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(train_mod, "atomic_write_bytes", fail_on_json)
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
    ],
)
def test_hand_edited_json(ckpt, edit, match):
    _edit_json(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(str(ckpt))


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


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        train(tiny_cfg(tmp_path, steps=0))
    with pytest.raises(ValueError, match="batch: 4096 is larger than the data set"):
        train(tiny_cfg(tmp_path, batch=4096, steps=1))
    with pytest.raises(ValueError, match="ema_decay"):
        train(tiny_cfg(tmp_path, ema_decay=1.0))


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
