"""Sampling at scale: a resumable, sharded ``.npz`` of uint8 images, identical for any split.

    torchrun --nproc_per_node W -m ddim_fast.cli sample --num-samples 50000 --npz out.npz

Sample i is a pure function of (seed, i) (DESIGN.md's noise contract, ``batch_offset`` = the
global index), so the images do not depend on how the work is split. The unit of work is a
shard of ``shard_size`` consecutive indices; shards are dealt round-robin to the torchrun
ranks (gloo on CPUs), each written atomically as ``<npz>.shards/shard-<start>-<stop>.npz``.
``<npz>.shards/manifest.json`` holds the run's settings and the SHA-256 of every finished
shard; a restarted run reuses a shard only when its bytes match that checksum, and recomputes
one that is missing, truncated, bit-flipped or replaced. Rank 0 then concatenates the shards
into the final ``.npz`` (uint8 NHWC under ``arr_0``, plus a ``meta`` JSON string), written
atomically, and removes the shard folder.

An existing file at the ``.npz`` path is reused when it is this run's finished output, and
otherwise refused unless ``force=True`` (``--force``): a user's file is never replaced without
consent.

Byte-identity holds for any number of processes (the same shard is computed the same way);
across batch sizes it holds as far as the model's own kernels give batch-independent results
(true of GroupNorm/conv UNets in float32 here, not guaranteed by every BLAS).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import zipfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["sample_npz", "sample_batched", "dist_env"]

# What a damaged .npz raises on reading: a truncated or bit-flipped zip, a missing key, a bad header.
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dist_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (one process without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def sample_batched(sampler, n: int, shape: Sequence[int], seed: int, batch_size: int, offset: int = 0,
                   device=None) -> torch.Tensor:
    """Samples offset .. offset + n - 1 of ``seed`` (batch_offset = global index), on the CPU."""
    out = []
    for b in range(0, n, batch_size):
        bs = min(batch_size, n - b)
        out.append(sampler.sample(shape=(bs, *shape), seed=seed, batch_offset=offset + b, device=device).float().cpu())
    return torch.cat(out)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _sha256_file(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _atomic_json(path: str, obj: Any) -> None:
    from ddim_fast.data import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finished_output(path: str, meta: Dict[str, Any], shape_nhwc: Tuple[int, ...]) -> Optional[bool]:
    """True: ``path`` is this run's finished output (its meta matches and its images read back
    whole: zip CRCs are checked on reading); False: some other file; None: nothing there."""
    from ddim_fast.data import NPZ_KEY

    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f.files or json.loads(str(f["meta"])) != meta:
                return False
            return f[NPZ_KEY].shape == shape_nhwc
    except _NPZ_ERRORS:
        return False


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path`` (POSIX flock): ranks update the one manifest in turn."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): only one process writes there
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record_shard(manifest: str, name: str, sha256: str) -> None:
    with _locked(manifest + ".lock"):
        data = _read_json(manifest) or {}
        data.setdefault("shards", {})[name] = sha256
        _atomic_json(manifest, data)


def _open_shard_dir(shard_dir: str, settings: Dict[str, Any], force: bool) -> None:
    """Rank 0: create ``shard_dir`` with a manifest of ``settings``, or check that an existing
    one was written for the same settings (``force``: discard one that was not)."""
    manifest = os.path.join(shard_dir, "manifest.json")
    if os.path.lexists(shard_dir) and not os.path.isdir(shard_dir):
        raise ValueError(f"npz: {shard_dir!r} (where the shards go) exists and is not a folder; move it away")
    old = _read_json(manifest) if os.path.isdir(shard_dir) else None
    if old is not None and {k: v for k, v in old.items() if k != "shards"} != settings:
        if not force:
            raise ValueError(
                f"{shard_dir} holds shards of different settings ({ {k: v for k, v in old.items() if k != 'shards'} }); "
                "delete it, choose another --npz path, or pass --force to discard them"
            )
        shutil.rmtree(shard_dir)
        old = None
    os.makedirs(shard_dir, exist_ok=True)
    if old is None:
        _atomic_json(manifest, {**settings, "shards": {}})


def sample_npz(
    model: Callable,
    schedule,
    n: int,
    out: str,
    *,
    shape: Optional[Sequence[int]] = None,
    steps: int = 50,
    eta: Union[float, str] = 0.0,
    skip: Union[str, Sequence[int]] = "uniform",
    solver: str = "ddim",
    seed: int = 0,
    batch_size: int = 256,
    shard_size: int = 1000,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    precision: str = "auto",
    fingerprint: Optional[str] = None,
    keep_shards: bool = False,
    force: bool = False,
    sampler_options: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = _log,
) -> Dict[str, Any]:
    """Sample ``n`` images into ``out`` (uint8 (N, H, W, C) under ``arr_0``), sharded over the
    torchrun ranks of this job (one process without torchrun) and over batches; resumable.

    Returns a summary (on every rank); only rank 0 writes ``out``. Shards of an earlier run with
    other settings are refused rather than mixed in, and so is an existing ``out`` that is not
    this run's output; ``force=True`` discards both. ``sampler_options``: more ``FusedSampler``
    arguments (e.g. ``compile=True``) that do not change the images.
    """
    from ddim_fast import FusedSampler
    from ddim_fast.data import NPZ_KEY, atomic_write_bytes, to_uint8
    from ddim_fast.nn import model_fingerprint

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n!r}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if shape is None:
        cfg = getattr(model, "config", None) or {}
        shape = (cfg.get("in_channels", 1), cfg.get("resolution", 16), cfg.get("resolution", 16))
    shape = tuple(int(s) for s in shape)
    rank, world, _ = dist_env()
    settings = {
        "model": fingerprint or model_fingerprint(model), "shape_chw": list(shape), "steps": int(steps), "eta": eta,
        "skip": skip if isinstance(skip, str) else [int(t) for t in skip], "solver": solver, "seed": int(seed),
        "shard_size": int(shard_size), "precision": precision,
        "T": int(schedule.T), "alphas_cumprod_sha256": hashlib.sha256(schedule.alphas_cumprod.numpy().tobytes()).hexdigest()[:16],
    }
    model_tau = (sampler_options or {}).get("model_timesteps")
    if model_tau is not None:  # other images: a run with them never resumes one without
        settings["model_timesteps"] = [int(t) for t in model_tau]
    meta_final = {**settings, "n": int(n), "layout": "uint8 (N, H, W, C)", "index": f"{NPZ_KEY}[i] is sample i of (seed, i)"}
    out = os.fspath(out)
    t0 = time.perf_counter()
    existing = _finished_output(out, meta_final, (n, shape[1], shape[2], shape[0]))  # every rank sees the same
    if existing:
        if log and rank == 0:
            log(f"{out} is already complete ({n} images, same settings): nothing to do")
        return {"n": n, "computed_shards": 0, "skipped_shards": 0, "seconds": 0.0, "out": out, "rank": rank, "world": world,
                "complete": True}
    if existing is False and os.path.isdir(out):
        raise ValueError(f"npz: {out!r} already exists and is a folder; choose another --npz path")
    if existing is False and not force:
        raise ValueError(f"npz: {out!r} already exists and is a file that is not this run's finished output; "
                         "pass --force to replace it, or choose another --npz path")

    shard_dir = out + ".shards"
    manifest = os.path.join(shard_dir, "manifest.json")
    distributed = world > 1
    own_group = False
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            # A rank that finishes its shards early waits at the barrier: allow for long runs.
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))
            own_group = True
    try:
        if rank == 0:
            _open_shard_dir(shard_dir, settings, force)
        if distributed:
            dist.barrier()
        recorded = (_read_json(manifest) or {}).get("shards", {})
        # compile="auto" by default here: a long run is where compiling was measured to pay off
        # (ddim_fast.compile.MEASURED); the sampler learns how many model calls this rank expects.
        options = {"compile": "auto", **(sampler_options or {})}
        sampler = FusedSampler(model, schedule=schedule, steps=steps, eta=eta, skip=skip, solver=solver, backend=backend,
                               precision=precision, **options)
        my_images = sum(min(n, s + shard_size) - s for s in range(rank * shard_size, n, world * shard_size))
        sampler._expected_calls = sampler.num_steps * max(1, math.ceil(my_images / batch_size))
        shards = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
        names = [f"shard-{start:09d}-{stop:09d}.npz" for start, stop in shards]
        computed = skipped = 0
        for j in range(rank, len(shards), world):
            (start, stop), path = shards[j], os.path.join(shard_dir, names[j])
            got = _sha256_file(path)
            if got is not None and got == recorded.get(names[j]):
                skipped += 1
                continue
            if got is not None and log:
                log(f"rank {rank}/{world}: {names[j]} does not match its recorded SHA-256: recomputing it")
            t_shard = time.perf_counter()
            with torch.no_grad():
                x = sample_batched(sampler, stop - start, shape, seed, batch_size, offset=start, device=device)
            blob = _npz_bytes(**{NPZ_KEY: to_uint8(x)})
            atomic_write_bytes(path, blob)
            _record_shard(manifest, names[j], hashlib.sha256(blob).hexdigest())
            computed += 1
            if log:
                log(f"rank {rank}/{world}: shard {start}..{stop} in {time.perf_counter() - t_shard:.1f} s")
        if distributed:
            dist.barrier()
        if rank == 0:
            recorded = (_read_json(manifest) or {}).get("shards", {})
            parts = []
            for name in names:
                path = os.path.join(shard_dir, name)
                with open(path, "rb") as f:
                    blob = f.read()
                if hashlib.sha256(blob).hexdigest() != recorded.get(name):  # changed after it was written or checked
                    raise ValueError(f"npz: shard {path!r} changed while the run was going; run the command again to recompute it")
                with np.load(io.BytesIO(blob), allow_pickle=False) as f:
                    parts.append(f[NPZ_KEY])
            atomic_write_bytes(out, _npz_bytes(**{NPZ_KEY: np.concatenate(parts)}, meta=np.array(json.dumps(meta_final))))
            if not keep_shards:
                shutil.rmtree(shard_dir, ignore_errors=True)
        if distributed:
            dist.barrier()
    finally:
        if own_group:
            dist.destroy_process_group()
    return {"n": n, "computed_shards": computed, "skipped_shards": skipped, "seconds": time.perf_counter() - t0,
            "out": out, "rank": rank, "world": world, "complete": False}
