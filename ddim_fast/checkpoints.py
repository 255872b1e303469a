"""Checkpoint files: safetensors + JSON, no pickle, and every checkpoint read as untrusted input.

Checkpoints (no pickle anywhere)
--------------------------------
``<out>/checkpoint-<step>.safetensors`` holds the tensors (``model/*``, ``ema/*`` and the Adam
state flattened as ``optim/<param index>/<name>``); ``<out>/checkpoint.json`` holds the model
config, the schedule, the data normalisation, the training config, the step, the optimizer's
param groups, and the file name and SHA-256 of the weights. Both are written through a
temporary file and ``os.replace``; the JSON is written last and names the weights it belongs
to, so a kill at any moment leaves the previous complete checkpoint. Loading checks the hash,
so a truncated or edited weights file is a clear error rather than garbage.

A checkpoint read from disk is untrusted input: its ``weights`` entry must be the plain name of
a ``.safetensors`` file in the JSON's own folder (no ``/``, no ``..``, no absolute path, no
symbolic link that leads out of the folder), its model config is bounded (``nn.unet.LIMITS``)
and built on the meta device first, and the tensor names, shapes and dtypes declared in the
safetensors header are checked against that config before a byte of weights is read or a real
layer allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, BinaryIO, Dict, Optional, Tuple

import torch

from ddim_fast.data import atomic_write_bytes
from ddim_fast.nn.unet import UNet
from ddim_fast.schedule import NoiseSchedule

__all__ = ["CheckpointError", "load_model", "read_checkpoint", "write_checkpoint", "export_model", "schedule_from_config",
           "ASSET_PATH", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "ddim_fast.checkpoint"
CHECKPOINT_VERSION = 1
ASSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.json")
_WEIGHTS_FILE = re.compile(r"checkpoint-\d{8,}\.safetensors")
# Schedules longer than this are refused: 1e6 float64 betas are 8 MB, a T from a hand-edited
# file must not allocate without bound (the DDPM / DDIM papers use T = 1000).
MAX_T = 1_000_000


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, edited or does not match its config."""


def schedule_from_config(d: Dict[str, Any]) -> NoiseSchedule:
    """The NoiseSchedule a checkpoint's ``schedule`` entry describes: ``{"kind": "linear" |
    "cosine" | "scaled_linear", ...their arguments}`` or ``{"kind": "betas", "betas": [...]}``."""
    if not isinstance(d, dict) or "kind" not in d:
        raise CheckpointError(f"schedule: expected a dict with a 'kind', got {d!r}")
    d = dict(d)
    kind = d.pop("kind")
    makers = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine, "scaled_linear": NoiseSchedule.scaled_linear}
    if kind == "betas":
        if "betas" not in d:
            raise CheckpointError("schedule: kind 'betas' needs the key 'betas' (a list of T floats in (0, 1)), which is missing")
        betas = d.pop("betas")
        if d:
            raise CheckpointError(f"schedule: unknown key(s) {sorted(d)} for kind 'betas'; expected only 'betas'")
        if not isinstance(betas, list) or not 1 <= len(betas) <= MAX_T or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas
        ):
            raise CheckpointError(f"schedule: 'betas' must be a list of 1 to {MAX_T} numbers in (0, 1)")
        try:
            return NoiseSchedule.from_betas(betas)
        except ValueError as e:
            raise CheckpointError(f"schedule: {e}") from e
    if kind not in makers:
        raise CheckpointError(f"schedule: unknown kind {kind!r}; expected one of {sorted(makers) + ['betas']}")
    T = d.get("T", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise CheckpointError(f"schedule: 'T' must be an integer in [1, {MAX_T}], got {T!r}")
    try:
        return makers[kind](**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"schedule: bad arguments for {kind!r}: {e}") from e


# --------------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(json_path: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], weights_name: Optional[str] = None) -> None:
    """Write ``tensors`` (safetensors) then ``meta`` (JSON naming them), each atomically.

    ``weights_name`` defaults to the JSON's stem + ``.safetensors``; the weights go next to the JSON.
    """
    from safetensors.torch import save

    folder = os.path.dirname(os.path.abspath(json_path))
    if weights_name is None:
        weights_name = os.path.splitext(os.path.basename(json_path))[0] + ".safetensors"
    _check_weights_name(weights_name, "write_checkpoint")
    blob = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    atomic_write_bytes(os.path.join(folder, weights_name), blob)
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "weights": weights_name, "sha256": _sha256(blob)}
    atomic_write_bytes(json_path, (json.dumps(meta, indent=1) + "\n").encode())


def _resolve_checkpoint_json(path: Optional[str]) -> str:
    if path is None:
        return ASSET_PATH
    path = os.fspath(path)
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoint.json")
        if not os.path.isfile(cand):
            raise CheckpointError(f"ckpt: folder {path!r} holds no checkpoint.json (is it a training --out folder?)")
        return cand
    if path.endswith(".safetensors"):
        stem = path[: -len(".safetensors")] + ".json"
        if os.path.isfile(stem):
            return stem
        cand = os.path.join(os.path.dirname(path) or ".", "checkpoint.json")
        if os.path.isfile(cand):
            return cand
        raise CheckpointError(f"ckpt: no JSON config next to {path!r} (looked for {stem!r} and {cand!r})")
    if not os.path.isfile(path):
        raise CheckpointError(f"ckpt: {path!r} does not exist")
    return path


def _read_meta(json_path: str) -> Dict[str, Any]:
    """A checkpoint JSON, parsed and checked for its format, version and required entries."""
    try:
        with open(json_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint config {json_path!r} is not valid JSON (truncated or edited?): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint config {json_path!r} is not a {CHECKPOINT_FORMAT} file")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint config {json_path!r} has version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
    for key in ("weights", "sha256", "model", "schedule"):
        if key not in meta:
            raise CheckpointError(f"checkpoint config {json_path!r} lacks the entry {key!r}")
    return meta


def _check_weights_name(name: Any, where: str) -> str:
    """A plain ``*.safetensors`` file name: no folder part, no ``..``, not absolute."""
    if (
        not isinstance(name, str)
        or not name.endswith(".safetensors")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or os.path.basename(name) != name
    ):
        raise CheckpointError(
            f"{where}: 'weights' must be the plain name of a .safetensors file in the checkpoint's own folder "
            f"(no '/', no '..', not absolute), got {name!r}"
        )
    return name


def _weights_path(json_path: str, meta: Dict[str, Any]) -> str:
    """The weights file a checkpoint JSON names, which must lie inside the JSON's folder.

    Every check here is on the name and on the link itself, never on what it points to, so the
    errors reveal nothing about files outside the folder (not whether they exist, nor their size).
    """
    name = _check_weights_name(meta["weights"], f"checkpoint config {json_path!r}")
    folder = os.path.realpath(os.path.dirname(os.path.abspath(json_path)))
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if os.path.commonpath([folder, real]) != folder:
        raise CheckpointError(
            f"checkpoint config {json_path!r}: 'weights' {name!r} is a symbolic link that leads outside the "
            "checkpoint's folder; the weights must live inside it"
        )
    if not os.path.isfile(real):
        raise CheckpointError(f"checkpoint weights {name!r} named by {json_path!r} do not exist (or are not a file)")
    return real


# dtypes a weights file may declare (the safetensors header's names); all load as float32.
_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_header(weights: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, without reading the tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint weights {weights!r} are not a valid safetensors file: the file is truncated, corrupt or "
            f"was edited ({e})"
        ) from e


def _check_fit(shapes: Dict[str, Tuple[int, ...]], header, prefix: str, what: str) -> None:
    """The header's ``prefix*`` tensors have exactly the names and shapes of the model's state dict."""
    got = {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
    missing = sorted(set(shapes) - set(got))
    unexpected = sorted(set(got) - set(shapes))
    wrong = [f"{k}: {got[k][1]} vs {v}" for k, v in shapes.items() if k in got and got[k][1] != v]
    dtypes = sorted({d for k, (d, _) in got.items() if d not in _WEIGHT_DTYPES})
    if missing or unexpected or wrong or dtypes:
        raise CheckpointError(
            f"{what}: the weights do not fit the model config"
            + (f"; missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
            + (f"; unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "")
            + (f"; wrong shapes (file vs config) {wrong[:3]}" if wrong else "")
            + (f"; dtypes {dtypes} (expected one of {list(_WEIGHT_DTYPES)})" if dtypes else "")
        )


def _model_shapes(config: Any, where: str) -> Dict[str, Tuple[int, ...]]:
    try:
        return UNet.state_shapes(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint config {where!r}: bad model config: {e}") from e


def _read_tensors(json_path: str, meta: Dict[str, Any], weights: BinaryIO, verify: bool) -> Dict[str, torch.Tensor]:
    """The tensors of the weights file that ``_open_checkpoint`` opened (read from its open handle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights.seek(0)
    blob = weights.read()
    if verify and _sha256(blob) != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint weights {weights.name!r} do not match the SHA-256 recorded in {json_path!r} "
            f"({len(blob)} bytes): the file is truncated, corrupt or was edited"
        )
    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {weights.name!r} are not a valid safetensors file: {e}") from e


# A training run writes a new checkpoint-<step>.safetensors, then the JSON that names it, then
# removes the old weights: a reader between its JSON read and its open of the weights finds them
# gone. It then reads the JSON again and, if that changed, the checkpoint it names now.
_RACE_RETRIES = 3


def _open_checkpoint(path: Optional[str]) -> Tuple[str, Dict[str, Any], BinaryIO, Dict[str, Tuple[str, Tuple[int, ...]]]]:
    """(json path, meta, the weights file opened for reading, its header): all checked, no tensor
    data read. The caller closes the file (``with``). What is read from it is the file the JSON
    named, even if a training run replaces the checkpoint meanwhile."""
    json_path = _resolve_checkpoint_json(path)
    if path is None and not os.path.isfile(json_path):
        raise CheckpointError(f"the embedded model {json_path!r} is missing from this installation")
    for attempt in range(_RACE_RETRIES + 1):
        meta = _read_meta(json_path)
        f = None
        try:
            weights = _weights_path(json_path, meta)
            f = open(weights, "rb")
            return json_path, meta, f, _read_header(weights)
        except (CheckpointError, OSError):
            if f is not None:
                f.close()
            if attempt == _RACE_RETRIES or not os.path.isfile(json_path) or _read_meta(json_path) == meta:
                raise
            # a newer checkpoint replaced this one meanwhile: read that one
        except BaseException:
            if f is not None:
                f.close()
            raise
    raise AssertionError("unreachable")


def read_checkpoint(path: Optional[str] = None, *, verify: bool = True) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(meta, tensors) of a checkpoint: a training folder, its ``.json`` or its ``.safetensors``;
    None = the embedded digits model. Never unpickles; checks the SHA-256 the JSON records."""
    json_path, meta, weights, _ = _open_checkpoint(path)
    with weights:
        tensors = _read_tensors(json_path, meta, weights, verify)
    meta["_json_path"] = json_path
    return meta, tensors


def _sub(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{what}: the weights do not fit the model config"
            + (f"; missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
            + (f"; unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "")
            + (f"; wrong shapes {wrong[:3]}" if wrong else "")
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_model(path: Optional[str] = None, *, device="cpu", weights: str = "ema") -> Tuple[UNet, NoiseSchedule]:
    """(model in eval mode, schedule) from a checkpoint; ``path=None`` is the embedded digits model
    in ``ddim_fast/assets/``. ``weights="ema"`` (default, the sampling weights) or ``"model"``.

    The schedule, the model config (on the meta device) and the safetensors header are checked
    before the weights are read, so a hand-edited config fails in milliseconds, not after
    allocating the model it describes."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
    json_path, meta, weights_file, header = _open_checkpoint(path)
    with weights_file:
        schedule = schedule_from_config(meta["schedule"])
        shapes = _model_shapes(meta["model"], json_path)
        if not any(k.startswith(weights + "/") for k in header):
            raise CheckpointError(f"checkpoint {json_path!r} holds no {weights!r} weights (it has {meta.get('contents')})")
        _check_fit(shapes, header, weights + "/", f"checkpoint {json_path!r} ({weights})")
        tensors = _read_tensors(json_path, meta, weights_file, verify=True)
    model = UNet.from_config(meta["model"])
    _load_weights(model, _sub(tensors, weights + "/"), f"checkpoint {json_path!r} ({weights})")
    return model.to(device).eval(), schedule


def export_model(ckpt: str, json_out: str, dtype: torch.dtype = torch.float32, extra: Optional[Dict[str, Any]] = None,
                 *, overwrite: bool = False) -> None:
    """Write the EMA weights (only) of a training checkpoint as a small sampling checkpoint:
    ``json_out`` (a ``.json``) and the ``.safetensors`` of the same stem next to it. Existing
    files there are refused unless ``overwrite=True`` (never the source checkpoint's own)."""
    json_out = os.fspath(json_out)
    if not json_out.endswith(".json"):
        raise ValueError(f"out: expected a path ending in .json (the weights go next to it), got {json_out!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype: expected a floating-point dtype for the weights, got {dtype!r}")
    meta, tensors = read_checkpoint(ckpt)
    weights_out = json_out[: -len(".json")] + ".safetensors"
    src = {os.path.realpath(meta["_json_path"]), os.path.realpath(os.path.join(os.path.dirname(meta["_json_path"]), meta["weights"]))}
    for target in (json_out, weights_out):
        if os.path.realpath(target) in src:
            raise ValueError(f"out: {json_out!r} would overwrite the checkpoint being exported ({target!r})")
        if os.path.isdir(target):
            raise ValueError(f"out: {target!r} is a folder; expected a path for a new file")
        if os.path.lexists(target) and not overwrite:
            raise ValueError(f"out: {target!r} already exists; remove it, choose another path, or pass overwrite=True")
    ema = {k: v.to(dtype) for k, v in tensors.items() if k.startswith("ema/")}
    if not ema:
        raise CheckpointError(f"checkpoint {meta['_json_path']!r} holds no EMA weights")
    keep = {k: meta[k] for k in ("model", "schedule", "data", "step", "train", "loss", "elapsed_s") if k in meta}
    keep.update(contents=["ema"], dtype=str(dtype).replace("torch.", ""), **(extra or {}))
    write_checkpoint(json_out, ema, keep)
