"""ddim_fast.sharded: sharded, resumable .npz sampling. The images do not depend on how the work
is split, a killed run resumes to the same bytes, damaged shards are recomputed, and no file
that is not this run's output is replaced without force=True. (The torchrun run of 2 processes
against 1 is in test_cli.py, through the command line.)"""

import contextlib
import json
import os

import numpy as np
import pytest
import torch

from _utils import TinyConvModel
from ddim_fast import NoiseSchedule
from ddim_fast.data import NPZ_KEY
from ddim_fast.sharded import sample_npz

SCHEDULE = NoiseSchedule.linear(1000)
SHAPE = (3, 8, 8)
N, STEPS = 10, 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def _counting(model, stop_after=None):
    """Counts the images ``model`` is called on (``seen[0]``); past ``stop_after`` images the
    next call raises KeyboardInterrupt, as when a run is killed in the middle."""
    seen = [0]

    def hook(module, args):
        if stop_after is not None and seen[0] >= stop_after:
            raise KeyboardInterrupt
        seen[0] += args[0].shape[0]

    handle = model.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyConvModel().eval()


def _run(model, out, **kw):
    opts = dict(shape=SHAPE, steps=STEPS, batch_size=3, shard_size=3, fingerprint="tiny", precision="fp32", log=None)
    return sample_npz(model, SCHEDULE, N, str(out), **{**opts, **kw})


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_images_do_not_depend_on_batch_and_shard_size(model, tmp_path):
    outs = []
    for bs, shard in ((2, 3), (5, 4), (10, 100)):
        path = tmp_path / f"b{bs}.npz"
        _run(model, path, batch_size=bs, shard_size=shard)
        with np.load(path, allow_pickle=False) as f:
            outs.append(f[NPZ_KEY])
            assert json.loads(str(f["meta"]))["n"] == N
    assert outs[0].dtype == np.uint8 and outs[0].shape == (N, 8, 8, 3)
    assert outs[0].std() > 0
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)
    assert sorted(os.listdir(tmp_path)) == ["b10.npz", "b2.npz", "b5.npz"]  # shard folders removed


def _damage(path, how):
    blob = _bytes(path)
    if how == "missing":
        os.unlink(path)
    elif how == "truncated":
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])
    elif how == "bit-flipped":
        flipped = bytearray(blob)
        flipped[len(blob) // 2] ^= 0x10
        with open(path, "wb") as f:
            f.write(bytes(flipped))
    else:  # a valid shard of the right shape and dtype with other images
        with np.load(path) as f:
            arr = f[NPZ_KEY]
        np.savez(path, **{NPZ_KEY: (255 - arr).astype(np.uint8)})


@pytest.mark.parametrize("how", ["missing", "truncated", "bit-flipped", "wrong contents"])
def test_killed_run_resumed_over_a_damaged_shard_is_byte_identical(model, tmp_path, how):
    full = tmp_path / "full.npz"
    _run(model, full)
    out = tmp_path / "x.npz"
    with _counting(model, stop_after=2 * 3 * STEPS), pytest.raises(KeyboardInterrupt):  # dies in the 3rd of 4 shards
        _run(model, out)
    shard_dir = str(out) + ".shards"
    first = os.path.join(shard_dir, "shard-000000000-000000003.npz")
    assert not out.exists() and os.path.isfile(first) and os.path.isfile(os.path.join(shard_dir, "shard-000000003-000000006.npz"))
    manifest = json.loads(open(os.path.join(shard_dir, "manifest.json")).read())
    assert set(manifest["shards"]) == {"shard-000000000-000000003.npz", "shard-000000003-000000006.npz"}
    _damage(first, how)
    with _counting(model) as seen:
        res = _run(model, out)
    # the damaged shard and the two never written are computed; the intact one is reused
    assert res["computed_shards"] == 3 and res["skipped_shards"] == 1
    assert seen[0] == (3 + 3 + 1) * STEPS
    assert _bytes(out) == _bytes(full)
    assert not os.path.exists(shard_dir)


def test_a_finished_output_is_reused_and_other_files_are_not_replaced(model, tmp_path):
    out = tmp_path / "x.npz"
    _run(model, out)
    done = _bytes(out)
    with _counting(model) as seen:
        assert _run(model, out)["complete"]
    assert seen[0] == 0
    with pytest.raises(ValueError, match=r"x\.npz.*already exists.*--force"):  # another run's output (seed 1)
        _run(model, out, seed=1)
    assert _bytes(out) == done
    mine = tmp_path / "notes.npz"
    mine.write_text("my notes, not images")
    with pytest.raises(ValueError, match=r"notes\.npz.*not this run's finished output.*--force"):
        _run(model, mine)
    assert mine.read_text() == "my notes, not images"
    _run(model, mine, force=True)
    assert _bytes(mine) == done
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        _run(model, folder, force=True)


def test_shards_of_other_settings_are_refused_unless_forced(model, tmp_path):
    out = tmp_path / "x.npz"
    _run(model, out, keep_shards=True)
    full = _bytes(out)
    os.unlink(out)
    with pytest.raises(ValueError, match="different settings.*--force"):
        _run(model, out, eta=1.0)
    with _counting(model) as seen:
        _run(model, out, eta=1.0, force=True)  # the stale shards are discarded, not mixed in
    assert seen[0] == N * STEPS and _bytes(out) != full


@pytest.mark.parametrize("name,value", [("n", 0), ("batch_size", 0), ("shard_size", 2.5), ("n", True)])
def test_bad_sizes_are_refused(model, tmp_path, name, value):
    kw = {"batch_size": 3, "shard_size": 3, name: value}
    n = kw.pop("n", N)
    with pytest.raises(ValueError, match=name):
        sample_npz(model, SCHEDULE, n, str(tmp_path / "x.npz"), shape=SHAPE, log=None, **kw)
