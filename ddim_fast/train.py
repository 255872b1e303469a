"""L_simple training of an epsilon-prediction UNet (Ho et al. 2020, Eq. 14), EMA, checkpoints.

One training step: x_0 from the data, t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps, loss = ||eps - eps_theta(x_t, t)||^2 (mean);
Adam with a linear learning-rate warm-up, gradient-norm clipping, then an EMA of the weights
(the EMA model is the one that samples).

Determinism, resume and data parallelism
----------------------------------------
Everything random in step ``s`` is a pure function of ``(seed, s)``: the data order of an epoch
comes from ``DistributedSampler(seed, epoch)``; t, eps and the flips of the *global* batch come
from a generator seeded with ``(seed, s)``, and each rank takes the rows of its own samples;
dropout draws from the global torch RNG, reseeded with ``(seed, s, rank)`` at every step. So a
checkpoint needs no RNG state beyond the seed and the step (a stateful generator would need
every rank's state), ``--resume`` continues bit for bit, and ``torchrun --nproc_per_node W``
with the same global batch sees the same samples, timesteps and noise as one process (without
dropout it gives the same weights up to float summation order; with dropout the masks differ).

Checkpoints: ``ddim_fast.checkpoints`` (safetensors + JSON, no pickle, read as untrusted input).

Runs are never overwritten
--------------------------
``train`` into a folder that already holds a run (``RUN_FILES``, ``checkpoint-*``) refuses
unless told: ``resume=True`` continues it, ``fresh=True`` first moves its files into
``<out>/previous-<UTC time>/`` (still loadable; nothing is deleted). A resumed run keeps every
setting of its checkpoint (``TrainConfig.from_checkpoint(out, **changes)``): only ``RESUMABLE``
fields may change, any other difference is an error naming it, and a run that already reached
its target does nothing and says so (``already_finished``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

# Re-exported: ddim_fast.train was their home; the private helpers read checkpoints for resume.
from ddim_fast.checkpoints import ASSET_PATH, CHECKPOINT_FORMAT, MAX_T, CheckpointError, export_model  # noqa: F401
from ddim_fast.checkpoints import load_model, read_checkpoint, schedule_from_config, write_checkpoint  # noqa: F401
from ddim_fast.checkpoints import _WEIGHTS_FILE, _check_fit, _load_weights, _model_shapes, _open_checkpoint
from ddim_fast.checkpoints import _read_meta, _read_tensors, _sub
from ddim_fast.data import atomic_write_bytes, load_dataset, save_grid
from ddim_fast.nn.unet import UNet
from ddim_fast.schedule import NoiseSchedule

# The file names a training run owns in its --out folder (what "a run is already there" means).
RUN_FILES = ("checkpoint.json", "metrics.jsonl", "samples")

__all__ = ["TrainConfig", "RESUMABLE", "BOOKKEEPING", "train", "load_model", "read_checkpoint", "write_checkpoint",
           "export_model", "CheckpointError", "schedule_from_config", "ASSET_PATH", "CHECKPOINT_FORMAT"]

# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    image_size: Optional[int] = None  # None: the data's own size (16 for the digits)
    steps: Optional[int] = None  # None: 10000 for a new run; on resume, the run's own target
    batch: int = 64  # global batch, split evenly over the ranks
    lr: float = 2e-4
    warmup: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    flip: bool = False  # random horizontal flips (off for digits: a mirrored 3 is not a digit)
    seed: int = 0
    # model
    ch: int = 32
    ch_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Optional[Tuple[int, ...]] = None  # None: half the image size
    dropout: float = 0.1
    num_groups: int = 8
    # schedule
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # bookkeeping
    # bookkeeping: None = BOOKKEEPING's default for a new run, the run's own value on resume
    ckpt_every: Optional[int] = None
    sample_every: Optional[int] = None
    log_every: Optional[int] = None
    sample_steps: Optional[int] = None
    num_samples: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = True

    def validate(self) -> None:
        """Every field's type and range; a wrong type is an error, never a silent conversion
        (``steps=2.5`` is refused, not truncated to 2)."""
        for name in ("steps", "batch", "ckpt_every", "sample_every", "log_every", "sample_steps", "num_samples",
                     "ch", "num_res_blocks", "num_groups"):
            _check_int(name, getattr(self, name), 1)
        _check_int("T", self.T, 1, MAX_T)
        _check_int("warmup", self.warmup, 0)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.image_size is not None:
            _check_int("image_size", self.image_size, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        for name in ("ch_mult", "attn_resolutions"):
            v = getattr(self, name)
            if v is None and name == "attn_resolutions":
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not all(
                isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in v
            ):
                raise ValueError(f"{name}: expected a sequence of positive integers, got {v!r}")
            setattr(self, name, tuple(int(m) for m in v))
        if not self.ch_mult:
            raise ValueError("ch_mult: expected at least one channel multiplier, got ()")
        _check_real("lr", self.lr, "a positive learning rate", lambda v: v > 0)
        _check_real("grad_clip", self.grad_clip, "a positive gradient-norm limit", lambda v: v > 0)
        _check_real("ema_decay", self.ema_decay, "a decay in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_real("dropout", self.dropout, "a probability in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_real("beta_start", self.beta_start, "a beta in (0, 1)", lambda v: 0.0 < v < 1.0)
        _check_real("beta_end", self.beta_end, "a beta in (0, 1)", lambda v: 0.0 < v < 1.0)
        for name in ("flip", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("data", "out", "device"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike) and name != "device":
                v = os.fspath(v)
                setattr(self, name, v)
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name}: expected a non-empty string, got {v!r}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps: {self.sample_steps} exceeds T = {self.T}")
        for f in dataclasses.fields(self):  # numpy integers and floats -> JSON-serialisable Python ones
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                setattr(self, f.name, int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                setattr(self, f.name, float(v))

    def changed(self, changes: Dict[str, Any], *, where: str) -> "TrainConfig":
        """A copy with ``changes`` applied, for a resumed run: a field outside ``RESUMABLE`` may be
        named only with the value the run already has (anything else is an error naming it)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"resume: unknown TrainConfig field(s) {unknown}; expected a subset of {sorted(names)}")
        new = dataclasses.replace(self, **changes)
        _check_resume_fixed(self, new, where)
        return new

    @classmethod
    def from_checkpoint(cls, out: str, **changes: Any) -> "TrainConfig":
        """The config of the run in ``out`` (its ``checkpoint.json``), with ``changes`` applied:
        what ``train(..., resume=True)`` needs. Unnamed fields keep the run's own values, so
        ``from_checkpoint(out)`` continues to the run's own ``steps`` with its own ``ckpt_every``..."""
        out = os.fspath(out)
        json_path = os.path.join(out, "checkpoint.json")
        if not os.path.isfile(json_path):
            raise CheckpointError(f"resume: no checkpoint at {json_path!r}")
        saved = cls.from_json(_read_meta(json_path).get("train"), where=json_path)
        saved.out = out
        return saved.changed(changes, where=json_path)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("ch_mult", "attn_resolutions"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any], *, where: str = "checkpoint") -> "TrainConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: 'train' must be a dict of TrainConfig fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{where}: train config: unknown field(s) {unknown}")
        d = dict(d)
        for k in ("ch_mult", "attn_resolutions"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        cfg = cls(**d)
        try:
            cfg.validate()
        except ValueError as e:
            raise CheckpointError(f"{where}: bad train config: {e}") from e
        return cfg


# The defaults of the fields a resume keeps from its run unless told otherwise (None in TrainConfig).
BOOKKEEPING = {"steps": 10000, "ckpt_every": 500, "sample_every": 1000, "log_every": 100, "sample_steps": 50, "num_samples": 64}


def _fill_bookkeeping(cfg: TrainConfig, saved: Optional[TrainConfig]) -> None:
    for name, default in BOOKKEEPING.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, default if saved is None else getattr(saved, name))


# What a resumed run may change: its length and its bookkeeping. Everything else (model, data,
# batch, optimizer, schedule, seed) defines the run: changing it would no longer continue the
# same run bit for bit, so it is an error rather than silently ignored or silently applied.
RESUMABLE = ("steps", "ckpt_every", "sample_every", "log_every", "sample_steps", "num_samples", "device", "threads",
             "progress", "out")


def _check_resume_fixed(saved: TrainConfig, cfg: TrainConfig, where: str) -> None:
    a, b = saved.to_json(), cfg.to_json()
    for name in a:
        if name not in RESUMABLE and a[name] != b[name]:
            raise ValueError(
                f"{name}: cannot change on resume (the run in {where!r} has {a[name]!r}, got {b[name]!r}); "
                f"only {', '.join(RESUMABLE[:-1])} may change; start a new run for another {name}"
            )


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        what = {0: "an integer >= 0", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
        raise ValueError(f"{name}: expected {what}{'' if hi is None else f' up to {hi}'}, got {value!r}")


def _check_real(name: str, value, what: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}: expected {what}, got {value!r}")


def schedule_config(cfg: TrainConfig) -> Dict[str, Any]:
    return {"kind": "linear", "T": cfg.T, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def model_from_train_config(cfg: TrainConfig, channels: int, size: int) -> UNet:
    attn = cfg.attn_resolutions
    if attn is None:
        attn = (size // 2,) if len(cfg.ch_mult) > 1 else ()
    return UNet(
        in_channels=channels,
        resolution=size,
        ch=cfg.ch,
        ch_mult=cfg.ch_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=attn,
        dropout=cfg.dropout,
        num_groups=cfg.num_groups,
    )


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _mix(*ints: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams per (seed, step, rank))."""
    h = hashlib.blake2b(",".join(str(int(i)) for i in ints).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps to ``cfg.lr``, then constant (the DDPM recipe)."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


def _ema_decay(cfg: TrainConfig, step: int) -> float:
    # The (1 + n) / (10 + n) ramp keeps early checkpoints usable: a fixed 0.999 would still be
    # ~37% the random initialisation after 1000 steps.
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{name}"] = v
            else:
                scalars[f"{idx}/{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"type": type(opt).__name__, "param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            idx, name = k[len("optim/") :].split("/", 1)
            state.setdefault(int(idx), {})[name] = v
    for k, v in info.get("scalars", {}).items():
        idx, name = k.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


@torch.no_grad()
def preview_samples(model: torch.nn.Module, schedule: NoiseSchedule, shape, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, Eq. 12) samples for the training-time grids, through the
    public ``FusedSampler`` (where no compiled backend can be built it falls back to the
    reference step with one warning, so a long run never fails on a kernel build).

    fp32 so that a grid does not depend on whether the CPU has bf16; no CUDA graph, because a
    new sampler is made for every grid and a capture would be paid once and replayed never.
    """
    from ddim_fast import FusedSampler

    sampler = FusedSampler(model, schedule=schedule, steps=steps, eta=0.0, precision="fp32", cuda_graph=False)
    return sampler.sample(shape=tuple(shape), seed=seed)


def _dist_info() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asks for CUDA, which this machine does not have; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _run_files(out: str) -> List[str]:
    """The entries of ``out`` that belong to a training run (empty if ``out`` does not exist)."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n in RUN_FILES or _WEIGHTS_FILE.fullmatch(n))


def _move_aside(out: str, names: List[str]) -> str:
    """Move the run files ``names`` of ``out`` into a new ``out/previous-<UTC time>/`` (renames
    inside one folder: nothing is copied, nothing deleted; the result is a loadable checkpoint)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for i in range(1000):
        dest = os.path.join(out, f"previous-{stamp}" + (f"-{i}" if i else ""))
        try:
            os.mkdir(dest)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a thousand fresh starts in one second
        raise FileExistsError(f"out: cannot find a free previous-{stamp}-N folder in {out!r}")
    # checkpoint.json last: until it moves, the folder still holds a complete checkpoint.
    for name in sorted(names, key=lambda n: n == "checkpoint.json"):
        os.rename(os.path.join(out, name), os.path.join(dest, name))
    return dest


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    fresh: bool = False,
    callback: Optional[Callable[[int, float], None]] = None,
) -> Dict[str, Any]:
    """Train a new run in ``cfg.out``, or with ``resume`` continue ``<cfg.out>/checkpoint.json``,
    to ``cfg.steps`` steps.

    - A new run refuses a folder that already holds one (``RUN_FILES``, ``checkpoint-*``): pass
      ``resume=True`` to continue it, or ``fresh=True`` to start over, which first moves the old
      run's files into ``<out>/previous-<UTC time>/`` (nothing is deleted).
    - ``resume=True``: ``cfg`` must be the run's own config except for the ``RESUMABLE`` fields;
      ``TrainConfig.from_checkpoint(out, **changes)`` builds it (unnamed fields keep the run's
      values), and a bookkeeping field left at None (``BOOKKEEPING``: steps, ckpt_every, ...)
      takes the run's own value, never the default. A run already at ``cfg.steps`` returns at
      once with ``already_finished: True`` and touches no file.

    Run it under ``torchrun --nproc_per_node W`` for W data-parallel processes. ``callback(step,
    loss)`` is called on every rank after each step (``step`` counts completed steps). Returns a
    summary (steps, final running loss, wall time, checkpoint path) on every rank.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if resume and fresh:
        raise ValueError("fresh: cannot be combined with resume (resume continues the run in out, fresh starts a new one)")
    cfg = dataclasses.replace(cfg)  # filled in and normalised below: not the caller's object
    if not isinstance(cfg.out, (str, os.PathLike)) or not os.fspath(cfg.out):
        raise ValueError(f"out: expected a folder path, got {cfg.out!r}")
    cfg.out = os.fspath(cfg.out)
    rank, world, local_rank = _dist_info()
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"out: {cfg.out!r} is a file; expected a folder for the run")
    json_path = os.path.join(cfg.out, "checkpoint.json")
    meta: Optional[Dict[str, Any]] = None
    tensors: Dict[str, torch.Tensor] = {}
    moved = None
    if resume:
        if not os.path.isfile(json_path):
            raise CheckpointError(f"resume: no checkpoint at {json_path!r}")
        json_path, meta, weights_file, header = _open_checkpoint(json_path)
        with weights_file:  # closed on every way out of this block
            if "optimizer" not in meta or not any(k.startswith("optim/") for k in header):
                raise CheckpointError(
                    f"resume: {json_path!r} is a sampling checkpoint (contents {meta.get('contents')}); only a training "
                    "run's checkpoint (model, ema and optimizer state) can be resumed"
                )
            saved = TrainConfig.from_json(meta.get("train"), where=json_path)
            _fill_bookkeeping(cfg, saved)
            cfg.validate()
            _check_resume_fixed(saved, cfg, json_path)
            shapes = _model_shapes(meta["model"], json_path)
            for prefix in ("model/", "ema/"):
                _check_fit(shapes, header, prefix, f"checkpoint {json_path!r} ({prefix[:-1]})")
            step = meta.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise CheckpointError(f"checkpoint config {json_path!r}: 'step' must be an integer >= 0, got {step!r}")
            if cfg.steps < step:
                raise ValueError(f"steps: the run in {cfg.out!r} is already at step {step}; expected steps >= {step}")
            if cfg.steps == step:  # nothing to do, and no file is touched
                return {"steps": step, "loss": meta.get("loss"), "elapsed_s": meta.get("elapsed_s", 0.0),
                        "checkpoint": json_path, "rank": rank, "world_size": world, "already_finished": True}
            tensors = _read_tensors(json_path, meta, weights_file, verify=True)
    else:
        _fill_bookkeeping(cfg, None)
        cfg.validate()
        found = _run_files(cfg.out)
        if found and not fresh:
            raise ValueError(
                f"out: {cfg.out!r} already holds a training run ({', '.join(found)}); pass --resume "
                "(resume=True) to continue it, or --fresh (fresh=True) to start a new run there after moving the old "
                "one into <out>/previous-<time>/, or choose another --out"
            )
        if found and rank == 0:
            moved = found  # moved only once the data and the model are ready: a bad --data moves nothing
    device = _pick_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch % world:
        raise ValueError(f"batch: the global batch {cfg.batch} must be divisible by the number of processes {world}")
    local_batch = cfg.batch // world

    own_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
        if device.type == "cuda":
            torch.cuda.set_device(device)

    finished = False
    try:
        summary = _train_loop(cfg, meta, tensors, rank, world, device, local_batch, json_path, callback, moved)
        finished = True
    finally:
        if own_group:  # a group the caller created is the caller's to destroy
            import torch.distributed as dist

            if finished:
                # The DDP wrapper (its reducer keeps the group and its gloo work alive) is freed now,
                # not at interpreter exit, and every rank is past its last collective before any
                # tears the group down: a 2-process CI run once aborted in exit ("terminate called
                # without an active exception"), where gloo's threads outlived the interpreter.
                import gc

                gc.collect()
                dist.barrier()
            dist.destroy_process_group()
    return summary


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the metrics lines after ``step`` (written after the checkpoint a resume starts from,
    and about to be written again), so a resumed run's metrics.jsonl has each step once."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if len(keep) != len(lines):
        atomic_write_bytes(path, b"".join(keep))


def _train_loop(cfg, meta, tensors, rank, world, device, local_batch, json_path, callback, move_aside=None):
    from torch.utils.data import DistributedSampler

    data, data_info = load_dataset(cfg.data, image_size=cfg.image_size)
    n, channels, h, w = data.shape
    if h != w:
        raise ValueError(f"data: expected square images, got {h}x{w}")
    if cfg.batch > n:
        raise ValueError(f"batch: {cfg.batch} is larger than the data set ({n} images)")
    schedule = NoiseSchedule.linear(cfg.T, cfg.beta_start, cfg.beta_end)
    alphas = schedule.alphas_cumprod.to(torch.float32)

    if meta is not None:
        # Compare configs before allocating anything: the checkpoint's file is untrusted input.
        with torch.device("meta"):
            probe = model_from_train_config(cfg, channels, h)
        if meta["model"] != probe.config:
            raise CheckpointError(f"resume: the model config in {json_path!r} does not match the data ({channels}x{h}x{w})")
        keys = ("source", "path", "num_images", "channels", "image_size")
        saved_data = {k: v for k, v in (meta.get("data") or {}).items() if k in keys}
        if saved_data != {k: v for k, v in data_info.items() if k in keys}:
            raise ValueError(
                f"data: {cfg.data!r} is not the data set the run in {cfg.out!r} was trained on "
                f"(it recorded {saved_data}, this is {({k: v for k, v in data_info.items() if k in keys})})"
            )
    torch.manual_seed(cfg.seed)  # the initial weights
    model = model_from_train_config(cfg, channels, h).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    elapsed = 0.0
    running = None
    prev_weights = None
    if meta is not None:
        prev_weights = meta["weights"]
        _load_weights(model, _sub(tensors, "model/"), f"checkpoint {json_path!r} (model)")
        _load_weights(ema, _sub(tensors, "ema/"), f"checkpoint {json_path!r} (ema)")
        try:
            _unflatten_optimizer(opt, tensors, meta["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {json_path!r}: cannot restore the optimizer: {e}") from e
        step, elapsed, running = int(meta["step"]), float(meta.get("elapsed_s", 0.0)), meta.get("loss")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # DistributedSampler with drop_last: rank r of W sees perm[r::W] of each epoch's permutation,
    # so local batch b of every rank together is exactly perm[b*B:(b+1)*B], whatever W is.
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    batches_per_epoch = len(sampler) // local_batch
    epoch, order = -1, None

    def save(final: bool = False) -> None:
        nonlocal prev_weights
        if rank != 0:
            return
        opt_tensors, opt_info = _flatten_optimizer(opt)
        out_tensors = {**{f"model/{k}": v for k, v in model.state_dict().items()}, **{f"ema/{k}": v for k, v in ema.state_dict().items()}, **opt_tensors}
        weights_name = f"checkpoint-{step:08d}.safetensors"
        write_checkpoint(
            json_path,
            out_tensors,
            {
                "contents": ["model", "ema", "optimizer"],
                "step": step,
                "loss": running,
                "elapsed_s": round(elapsed, 3),
                "model": model.config,
                "schedule": schedule_config(cfg),
                "data": data_info,
                "train": cfg.to_json(),
                "optimizer": opt_info,
                "rng": {
                    "seed": cfg.seed,
                    "scheme": "stateless: the data order of epoch e is DistributedSampler(seed, e); "
                    "t, eps and flips of step s come from a generator seeded with (seed, s); "
                    "dropout from torch.manual_seed((seed, s, rank)) before step s",
                },
                "world_size": world,
                "final": final,
                # The unfinished metrics interval, so that a resumed run logs the same mean losses.
                "log_interval": {"loss_sum": interval_loss, "steps": interval_n},
            },
            weights_name=weights_name,
        )
        # Only now that checkpoint.json names the new weights may the previous file go, and only
        # a file this code names (checkpoint-<step>.safetensors): never one a JSON pointed at.
        old, prev_weights = prev_weights, weights_name
        if old and old != weights_name and _WEIGHTS_FILE.fullmatch(old):
            try:
                os.unlink(os.path.join(os.path.dirname(json_path), old))
            except FileNotFoundError:
                pass

    def grid() -> None:
        if rank != 0:
            return
        x = preview_samples(ema, schedule, (cfg.num_samples, channels, h, w), steps=cfg.sample_steps, seed=0)
        save_grid(x, os.path.join(cfg.out, "samples", f"step_{step:08d}.png"))

    previous_run = None
    if rank == 0:
        if move_aside:
            previous_run = _move_aside(cfg.out, move_aside)
        os.makedirs(cfg.out, exist_ok=True)
    bar = None
    if rank == 0 and cfg.progress and step < cfg.steps:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0 and meta is not None:
        _truncate_metrics(metrics_path, step)
    interval_loss, interval_n, t_interval, timed_n = 0.0, 0, time.perf_counter(), 0
    if meta is not None and isinstance(meta.get("log_interval"), dict):
        interval_loss = float(meta["log_interval"].get("loss_sum", 0.0))
        interval_n = int(meta["log_interval"].get("steps", 0))
    C, B = channels, cfg.batch
    model.train()
    while step < cfg.steps:
        t_step = time.perf_counter()
        ep, b = divmod(step, batches_per_epoch)
        if ep != epoch:
            sampler.set_epoch(ep)
            order = torch.tensor(list(sampler), dtype=torch.int64)
            epoch = ep
        idx = order[b * local_batch : (b + 1) * local_batch]
        # Randomness of the global batch, then this rank's rows (global row of local j = rank + W j).
        g = torch.Generator().manual_seed(_mix(cfg.seed, step))
        t_all = torch.randint(0, cfg.T, (B,), generator=g)
        eps_all = torch.randn(B, C, h, w, generator=g)
        flip_all = torch.rand(B, generator=g) < 0.5
        t = t_all[rank::world].to(device)
        eps = eps_all[rank::world].to(device)
        x0 = data[idx].to(device)
        if cfg.flip:
            x0 = torch.where(flip_all[rank::world].to(device)[:, None, None, None], x0.flip(-1), x0)
        a = alphas.to(device)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        torch.manual_seed(_mix(cfg.seed, step, rank))  # dropout masks

        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = F.mse_loss(net(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = _ema_decay(cfg, step)
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - d)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        step += 1

        loss_value = loss.detach()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_value)
            loss_value /= world
        loss_value = float(loss_value)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged: loss is {loss_value} at step {step} (try a lower --lr)")
        running = loss_value if running is None else 0.99 * running + 0.01 * loss_value
        elapsed += time.perf_counter() - t_step
        interval_loss += loss_value
        interval_n += 1
        timed_n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": interval_loss / interval_n,
                "running_loss": running,
                "lr": _lr_at(cfg, step - 1),
                "s_per_step": (now - t_interval) / timed_n,  # the steps timed in this process
                "elapsed_s": round(elapsed, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if bar is not None and not sys.stderr.isatty():
                bar.write(json.dumps(rec))
            interval_loss, interval_n, t_interval, timed_n = 0.0, 0, now, 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(final=step == cfg.steps)
        if step % cfg.sample_every == 0 or step == cfg.steps:
            grid()
        if callback is not None:
            callback(step, loss_value)
    if bar is not None:
        bar.close()
    summary = {"steps": step, "loss": running, "elapsed_s": elapsed, "checkpoint": json_path, "rank": rank,
               "world_size": world, "already_finished": False}
    if previous_run is not None:
        summary["previous_run"] = previous_run
    return summary
