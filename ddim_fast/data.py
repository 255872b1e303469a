"""Training images as float32 tensors (N, C, H, W) in [-1, 1], loaded whole into memory.

Sources (no downloads):

- ``"digits"``: scikit-learn's handwritten digits (1,797 8x8 images, grey levels 0..16, white
  strokes on black). They are upsampled to 16x16 by bilinear interpolation (values stay in
  [0, 16], so the [-1, 1] range is exact). Why 16x16 and bilinear: the DDPM UNet halves the
  size at each level, so 8x8 leaves room for only two levels (8 -> 4 -> 2) and no attention
  resolution worth the name; 16x16 allows the (1, 2, 2) layout with attention at 8x8, and at
  ~1.6M parameters a training step of batch 64 takes ~0.3 s on 2 CPU cores (32x32 would cost
  4x). Bilinear rather than nearest upsampling gives smooth strokes instead of 2x2 blocks,
  which the model would otherwise have to learn to reproduce exactly. Zero-padding to 16x16
  was rejected: three quarters of every image would be constant background.
- a folder of PNG / JPEG images (sorted by file name; all must share one size unless
  ``image_size`` is given, in which case each is resized with bicubic filtering);
- a ``.npz`` holding one uint8 array of shape (N, H, W), (N, H, W, C) or (N, C, H, W)
  with C in {1, 3} (the layout ``ddim-fast sample --npz`` writes is (N, H, W, C)).

Every loader returns ``(images, info)``: ``info`` is the JSON-serialisable description of the
data and of the normalisation (``pixel = (x + 1) / 2 * 255``) that checkpoints record.
"""

from __future__ import annotations

import errno
import numbers
import os
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "to_uint8",
    "make_grid",
    "save_grid",
    "save_npz",
    "NPZ_KEY",
    "atomic_write_bytes",
    "IMAGE_EXTENSIONS",
]

# The array key of sample .npz files: "arr_0", as np.savez names a positional array and as the FID
# evaluators of guided-diffusion / ADM (np.load(path)["arr_0"]) expect.
NPZ_KEY = "arr_0"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

Info = Dict[str, Any]

# The largest grid make_grid builds: 2**28 pixels is 768 MiB as RGB uint8 (a 64-image grid of
# 16x16 digits at the default scale is 520x520 = 2**18); beyond that a typo in scale or nrow
# would try to allocate terabytes.
MAX_GRID_PIXELS = 2**28


def _check_size(name: str, value, lo: int = 1) -> int:
    """A positive integer; 8.5 or "8" is refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


def _normalization() -> Dict[str, Any]:
    return {"range": [-1.0, 1.0], "to_uint8": "round((x + 1) / 2 * 255)"}


def load_dataset(spec: str, image_size: Optional[int] = None) -> Tuple[torch.Tensor, Info]:
    """``"digits"``, a folder of images, or a ``.npz`` file -> (images in [-1, 1], info)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"data: expected 'digits', an image folder or a .npz file, got {spec!r}")
    spec = str(spec)
    if image_size is not None:
        image_size = _check_size("image_size", image_size)
    if spec == "digits":
        return load_digits(image_size=16 if image_size is None else image_size)
    if os.path.isdir(spec):
        return load_image_folder(spec, image_size=image_size)
    if spec.lower().endswith(".npz"):
        return load_npz(spec, image_size=image_size)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data: {spec!r} is not 'digits' and no such file or folder exists")
    raise ValueError(f"data: {spec!r} is neither 'digits', a folder of images, nor a .npz file")


def load_digits(image_size: int = 16) -> Tuple[torch.Tensor, Info]:
    """scikit-learn's 8x8 digits, upsampled (bilinear) to ``image_size``, in [-1, 1], shape (1797, 1, S, S)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 8:
        raise ValueError(f"image_size: expected an integer >= 8 for the digits, got {image_size!r}")
    image_size = int(image_size)
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("data 'digits' needs scikit-learn: pip install scikit-learn") from e
    x = torch.from_numpy(_sk_digits().images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
    info = {
        "source": "digits",
        "description": "sklearn.datasets.load_digits, 17 grey levels, bilinear 8x8 -> "
        f"{image_size}x{image_size}",
        "num_images": int(x.shape[0]),
        "channels": 1,
        "image_size": [image_size, image_size],
        "normalization": _normalization(),
    }
    return x, info


def _from_uint8(arr: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(127.5).sub_(1.0)


def load_image_folder(path: str, image_size: Optional[int] = None) -> Tuple[torch.Tensor, Info]:
    """All PNG/JPEG files directly inside ``path``; grey if every image is grey, else RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise FileNotFoundError(f"data: image folder {path!r} does not exist")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"data: folder {path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    if image_size is not None:
        image_size = _check_size("image_size", image_size)
    images = []
    for name in names:
        file = os.path.join(path, name)
        try:
            with Image.open(file) as im:
                im.load()
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "F") or (
                    im.mode == "P" and all(r == g == b for r, g, b in _palette_rgb(im))
                )
                im = im.convert("L" if grey else "RGB")
                if image_size is not None and im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"data: cannot read image file {file!r}: {e}") from e
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        first = images[0].shape[:2]
        bad = next(n for n, im in zip(names, images) if im.shape[:2] != first)
        raise ValueError(
            f"data: images in {path!r} differ in size ({names[0]!r} is {first[1]}x{first[0]}, "
            f"{bad!r} is not); pass image_size to resize them"
        )
    channels = 3 if any(im.ndim == 3 for im in images) else 1
    arr = np.stack([np.repeat(im[..., None], 3, -1) if (channels == 3 and im.ndim == 2) else im.reshape(*im.shape[:2], -1) for im in images])
    x = _from_uint8(arr.transpose(0, 3, 1, 2))
    info = {
        "source": "folder",
        "path": os.path.abspath(path),
        "num_images": int(x.shape[0]),
        "channels": channels,
        "image_size": list(x.shape[-2:]),
        "normalization": _normalization(),
    }
    return x, info


def _palette_rgb(im):
    pal = im.getpalette() or []
    return [tuple(pal[i : i + 3]) for i in range(0, len(pal) - 2, 3)]


def load_npz(path: str, key: Optional[str] = None, image_size: Optional[int] = None) -> Tuple[torch.Tensor, Info]:
    """A uint8 image array from a ``.npz`` (never unpickled): (N,H,W), (N,H,W,C) or (N,C,H,W)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: .npz file {path!r} does not exist")
    if image_size is not None:
        image_size = _check_size("image_size", image_size)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if key is None:
                for k in (NPZ_KEY, "images", "x"):
                    if k in keys:
                        key = k
                        break
                else:
                    if len(keys) != 1:
                        raise ValueError(f"expected one array or one named 'arr_0' or 'images', found {keys}")
                    key = keys[0]
            if key not in keys:
                raise ValueError(f"no array named {key!r}, found {keys}")
            arr = f[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"data: cannot read .npz file {path!r}: {e}") from e
    if arr.dtype != np.uint8:
        raise ValueError(f"data: array {key!r} in {path!r} must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif not (arr.ndim == 4 and arr.shape[1] in (1, 3)):
        raise ValueError(
            f"data: array {key!r} in {path!r} has shape {arr.shape}; expected (N, H, W), "
            "(N, H, W, C) or (N, C, H, W) with C in {1, 3}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"data: array {key!r} in {path!r} holds no images")
    x = _from_uint8(arr)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(-1.0, 1.0)
    info = {
        "source": "npz",
        "path": os.path.abspath(path),
        "key": key,
        "num_images": int(x.shape[0]),
        "channels": int(x.shape[1]),
        "image_size": list(x.shape[-2:]),
        "normalization": _normalization(),
    }
    return x, info


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), clamping out-of-range values."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x: torch.Tensor, nrow: Optional[int] = None, scale: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> one uint8 (rows, cols, C) grid, ``nrow`` tiles per row
    (default: a near-square grid), each tile enlarged ``scale`` times by pixel replication
    (default: to at least 64 pixels, so 16x16 digits are visible), ``pad`` grey pixels between tiles."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"images: expected (N, 1 or 3, H, W) with N >= 1, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    nrow = int(np.ceil(np.sqrt(n))) if nrow is None else _check_size("nrow", nrow)
    scale = max(1, 64 // max(h, w)) if scale is None else _check_size("scale", scale)
    if not isinstance(pad, numbers.Integral) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"pad: expected an integer >= 0, got {pad!r}")
    rows = -(-n // nrow)
    pixels = (rows * (h * scale + pad) + pad) * (nrow * (w * scale + pad) + pad)
    if pixels > MAX_GRID_PIXELS:
        raise ValueError(
            f"scale: a grid of {n} images of {h}x{w} at scale {scale}, {nrow} per row, would have {pixels} pixels; "
            f"expected at most {MAX_GRID_PIXELS} (a smaller scale, or fewer images)"
        )
    tiles = to_uint8(x)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw, c = tiles.shape[1:]
    ncol_rows = -(-n // nrow)
    grid = np.full((ncol_rows * (th + pad) + pad, nrow * (tw + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (th + pad), pad + q * (tw + pad)
        grid[y0 : y0 + th, x0 : x0 + tw] = tiles[i]
    return grid


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and os.replace, so a
    reader (or a kill at any moment) sees either the old file or the complete new one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected the path of a file to write", path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            # The temporary name is ours, not the user's: report the path they asked for.
            raise type(e)(e.errno, f"cannot write the file: {e.strerror}", path) from None
        raise


def save_grid(x: torch.Tensor, path: str, nrow: Optional[int] = None, scale: Optional[int] = None) -> np.ndarray:
    """Save ``make_grid(x, nrow, scale)`` as a PNG, atomically; returns the grid array."""
    import io

    from PIL import Image

    grid = make_grid(x, nrow=nrow, scale=scale)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return grid


def save_npz(x: torch.Tensor, path: str) -> None:
    """Save [-1, 1] images as uint8 (N, H, W, C) under ``arr_0`` (NPZ_KEY: what FID evaluators such
    as guided-diffusion's read; ``load_npz`` reads it), atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **{NPZ_KEY: to_uint8(x)})
    atomic_write_bytes(path, buf.getvalue())
