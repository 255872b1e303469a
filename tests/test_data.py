"""Data loaders (digits, image folders, .npz), grids, atomic writes."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fast.data import load_dataset, load_digits, load_image_folder, load_npz, make_grid, save_grid, save_npz, to_uint8


def test_digits_are_16x16_in_range():
    x, info = load_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert info["image_size"] == [16, 16] and info["normalization"]["range"] == [-1.0, 1.0]
    # Background (0 of 16) is exactly -1: corners of the upsampled digit are untouched by strokes.
    assert (x[:, :, 0, 0] == -1).float().mean() > 0.9
    x8, _ = load_dataset("digits", image_size=8)
    assert x8.shape == (1797, 1, 8, 8)
    assert set(((x8 + 1) / 2 * 16).round().unique().tolist()) <= set(range(17))


def test_digits_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        load_digits(image_size=4)


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_grey_and_rgb(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _png(tmp_path / "a.png", g)
    _png(tmp_path / "b.PNG", 255 - g)
    (tmp_path / "notes.txt").write_text("ignored")
    x, info = load_image_folder(str(tmp_path))
    assert x.shape == (2, 1, 8, 8) and info["channels"] == 1
    np.testing.assert_array_equal(to_uint8(x)[0, ..., 0], g)
    rgb = np.stack([g, g // 2, 255 - g], -1)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    x, info = load_dataset(str(tmp_path))
    assert x.shape == (3, 3, 8, 8) and info["channels"] == 3
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x)[0, ..., 1], g)  # grey images are repeated to RGB


def test_image_folder_resize_and_size_mismatch(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "b.png", np.zeros((10, 8), np.uint8))
    with pytest.raises(ValueError, match=r"differ in size.*'b.png'"):
        load_image_folder(str(tmp_path))
    x, _ = load_image_folder(str(tmp_path), image_size=4)
    assert x.shape == (2, 1, 4, 4)


def test_image_folder_bad_file_named(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        load_image_folder(str(tmp_path))


def test_image_folder_truncated_jpeg_named(tmp_path):
    buf = tmp_path / "full.jpg"
    Image.fromarray(np.random.randint(0, 255, (32, 32, 3), np.uint8)).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        load_image_folder(str(tmp_path))


def test_image_folder_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        load_image_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "shape, expect",
    [((5, 8, 8), (5, 1, 8, 8)), ((5, 8, 8, 3), (5, 3, 8, 8)), ((5, 3, 8, 8), (5, 3, 8, 8)), ((5, 8, 8, 1), (5, 1, 8, 8))],
)
def test_npz_layouts(tmp_path, shape, expect):
    arr = np.random.randint(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr)
    x, info = load_dataset(str(tmp_path / "d.npz"))
    assert x.shape == expect and info["key"] == "arr_0"
    assert x.min() >= -1 and x.max() <= 1


def test_npz_round_trip_with_save_npz(tmp_path):
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    save_npz(x, str(tmp_path / "s.npz"))
    y, info = load_npz(str(tmp_path / "s.npz"))
    assert info["key"] == "arr_0"  # what FID evaluators read
    torch.testing.assert_close(y, x, atol=1 / 127.5, rtol=0)
    y, _ = load_npz(str(tmp_path / "s.npz"), image_size=4)
    assert y.shape == (4, 3, 4, 4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: np.savez(p, np.zeros((2, 8, 8), np.float32)), "must be uint8"),
        (lambda p: np.savez(p, np.zeros((2, 5, 8, 8), np.uint8)), "has shape"),
        (lambda p: np.savez(p, a=np.zeros((2, 8, 8), np.uint8), b=np.zeros((2, 8, 8), np.uint8)), "expected one array"),
        (lambda p: np.savez(p, np.array([{"x": 1}], dtype=object)), "cannot read .npz"),  # pickled: refused
        (lambda p: open(p, "wb").write(b"PK\x03\x04garbage"), "cannot read .npz"),
    ],
)
def test_npz_bad_files_named(tmp_path, make, match):
    p = str(tmp_path / "bad.npz")
    make(p)
    with pytest.raises(ValueError, match=match) as e:
        load_npz(p)
    assert "bad.npz" in str(e.value)


def test_unknown_spec(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("1,2")
    with pytest.raises(ValueError, match="neither 'digits'"):
        load_dataset(str(f))


def test_grid_layout_and_atomic_save(tmp_path):
    x = torch.linspace(-1, 1, 5 * 16 * 16).reshape(5, 1, 16, 16)
    g = make_grid(x, nrow=3, scale=1)
    assert g.shape == (2 * 17 + 1, 3 * 17 + 1, 1)
    assert make_grid(x).shape == (2 * 65 + 1, 3 * 65 + 1, 1)  # default: square-ish grid, tiles >= 64 px
    path = tmp_path / "g.png"
    save_grid(x, str(path), nrow=3, scale=2)
    assert Image.open(path).size == (3 * 33 + 1, 2 * 33 + 1)
    assert os.listdir(tmp_path) == ["g.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="images: expected"):
        make_grid(torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nrow=2.5), r"nrow: expected an integer >= 1, got 2.5"),
        (dict(nrow=0), r"nrow: expected an integer >= 1, got 0"),
        (dict(scale=1.5), r"scale: expected an integer >= 1, got 1.5"),
        (dict(scale="2"), r"scale: expected an integer >= 1, got '2'"),
        (dict(pad=-1), r"pad: expected an integer >= 0"),
        (dict(scale=100000), r"scale: a grid of 5 images of 16x16 at scale 100000, 3 per row, would have \d+ pixels; "
                             r"expected at most 268435456"),
    ],
)
def test_grid_arguments_are_checked_not_truncated(kw, match, monkeypatch):
    x = torch.zeros(5, 1, 16, 16)
    monkeypatch.setattr("ddim_fast.data.to_uint8", lambda *_: pytest.fail("converted before the arguments were checked"))
    with pytest.raises(ValueError, match=match):
        make_grid(x, **{"nrow": 3, **kw})


@pytest.mark.parametrize("loader", ["digits", "folder", "npz"])
def test_non_integer_image_size_is_refused(tmp_path, loader):
    spec = {"digits": "digits", "folder": str(tmp_path), "npz": str(tmp_path / "x.npz")}[loader]
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"image_size: expected an integer >= \d+, got 8.5"):
        load_dataset(spec, image_size=8.5)


def test_atomic_write_errors_name_the_users_path(tmp_path):
    from ddim_fast.data import atomic_write_bytes

    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_bytes(str(tmp_path / "folder"), b"x")
    assert e.value.filename == str(tmp_path / "folder") and "is a folder" in str(e.value)
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "g.png"  # a parent that is a file: no temporary can be made there
    with pytest.raises(OSError) as e:
        atomic_write_bytes(str(target), b"x")
    assert e.value.filename == str(target) and ".tmp-" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"] and (tmp_path / "file").read_text() == "x"
