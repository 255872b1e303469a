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

Checkpoints (no pickle anywhere)
--------------------------------
``<out>/checkpoint-<step>.safetensors`` holds the tensors (``model/*``, ``ema/*`` and the Adam
state flattened as ``optim/<param index>/<name>``); ``<out>/checkpoint.json`` holds the model
config, the schedule, the data normalisation, the training config, the step, the optimizer's
param groups, and the file name and SHA-256 of the weights. Both are written through a
temporary file and ``os.replace``; the JSON is written last and names the weights it belongs
to, so a kill at any moment leaves the previous complete checkpoint. Loading checks the hash,
so a truncated or edited weights file is a clear error rather than garbage.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ddim_fast.data import atomic_write_bytes, load_dataset, save_grid
from ddim_fast.nn.unet import UNet
from ddim_fast.schedule import NoiseSchedule, select_timesteps, step_table

__all__ = [
    "TrainConfig",
    "train",
    "load_model",
    "read_checkpoint",
    "write_checkpoint",
    "export_model",
    "CheckpointError",
    "schedule_from_config",
    "ASSET_PATH",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "ddim_fast.checkpoint"
CHECKPOINT_VERSION = 1
ASSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, edited or does not match its config."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    image_size: Optional[int] = None  # None: the data's own size (16 for the digits)
    steps: int = 10000
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
    ckpt_every: int = 500
    sample_every: int = 1000
    log_every: int = 100
    sample_steps: int = 50
    num_samples: int = 64
    device: str = "auto"
    threads: Optional[int] = None
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch", "ckpt_every", "sample_every", "log_every", "sample_steps", "num_samples", "T"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an integer >= 0, got {self.warmup!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a positive gradient-norm limit, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a decay in [0, 1), got {self.ema_decay!r}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps: {self.sample_steps} exceeds T = {self.T}")

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("ch_mult", "attn_resolutions"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"train config: unknown field(s) {unknown}")
        d = dict(d)
        for k in ("ch_mult", "attn_resolutions"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def schedule_config(cfg: TrainConfig) -> Dict[str, Any]:
    return {"kind": "linear", "T": cfg.T, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def schedule_from_config(d: Dict[str, Any]) -> NoiseSchedule:
    """The NoiseSchedule a checkpoint's ``schedule`` entry describes."""
    if not isinstance(d, dict) or "kind" not in d:
        raise CheckpointError(f"schedule: expected a dict with a 'kind', got {d!r}")
    d = dict(d)
    kind = d.pop("kind")
    makers = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine, "scaled_linear": NoiseSchedule.scaled_linear}
    if kind == "betas":
        return NoiseSchedule.from_betas(d["betas"])
    if kind not in makers:
        raise CheckpointError(f"schedule: unknown kind {kind!r}; expected one of {sorted(makers) + ['betas']}")
    try:
        return makers[kind](**d)
    except TypeError as e:
        raise CheckpointError(f"schedule: bad arguments for {kind!r}: {e}") from e


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


def read_checkpoint(path: Optional[str] = None, *, verify: bool = True) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(meta, tensors) of a checkpoint: a training folder, its ``.json`` or its ``.safetensors``;
    None = the embedded digits model. Never unpickles; checks the SHA-256 the JSON records."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    json_path = _resolve_checkpoint_json(path)
    if path is None and not os.path.isfile(json_path):
        raise CheckpointError(f"the embedded model {json_path!r} is missing from this installation")
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
    weights = os.path.join(os.path.dirname(os.path.abspath(json_path)), meta["weights"])
    if not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint weights {weights!r} named by {json_path!r} do not exist")
    with open(weights, "rb") as f:
        blob = f.read()
    if verify and _sha256(blob) != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint weights {weights!r} do not match the SHA-256 recorded in {json_path!r} "
            f"({len(blob)} bytes): the file is truncated, corrupt or was edited"
        )
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {weights!r} are not a valid safetensors file: {e}") from e
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
    in ``ddim_fast/assets/``. ``weights="ema"`` (default, the sampling weights) or ``"model"``."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
    meta, tensors = read_checkpoint(path)
    where = meta["_json_path"]
    try:
        model = UNet.from_config(meta["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint config {where!r}: bad model config: {e}") from e
    state = _sub(tensors, weights + "/")
    if not state:
        raise CheckpointError(f"checkpoint {where!r} holds no {weights!r} weights (it has {meta.get('contents')})")
    _load_weights(model, state, f"checkpoint {where!r} ({weights})")
    return model.to(device).eval(), schedule_from_config(meta["schedule"])


def export_model(ckpt: str, json_out: str, dtype: torch.dtype = torch.float32, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write the EMA weights (only) of a training checkpoint as a small sampling checkpoint."""
    meta, tensors = read_checkpoint(ckpt)
    ema = {k: v.to(dtype) for k, v in tensors.items() if k.startswith("ema/")}
    if not ema:
        raise CheckpointError(f"checkpoint {meta['_json_path']!r} holds no EMA weights")
    keep = {k: meta[k] for k in ("model", "schedule", "data", "step", "train", "loss", "elapsed_s") if k in meta}
    keep.update(contents=["ema"], dtype=str(dtype).replace("torch.", ""), **(extra or {}))
    write_checkpoint(json_out, ema, keep)


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
    """Deterministic DDIM (eta = 0, Eq. 12) samples for the training-time grids.

    Deliberately independent of FusedSampler and its compiled backends: a long training run
    must not fail because a kernel could not be built. Same maths, plain PyTorch, float32.
    """
    device = next(model.parameters()).device
    tau = select_timesteps(schedule.T, steps, "uniform")
    coef = step_table(schedule, tau, 0.0).to(torch.float32)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=g).to(device)
    for k, t in enumerate(tau[::-1].tolist()):
        sqrt_alpha_t, sqrt_one_minus_alpha_t, sqrt_alpha_prev, c_dir, _ = coef[k].tolist()
        eps = model(x, torch.full((shape[0],), t, dtype=torch.int64, device=device))
        x0_pred = (x - sqrt_one_minus_alpha_t * eps) / sqrt_alpha_t
        x = sqrt_alpha_prev * x0_pred + c_dir * eps
    return x


def _dist_info() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callback: Optional[Callable[[int, float], None]] = None,
) -> Dict[str, Any]:
    """Train (or with ``resume``, continue from ``<cfg.out>/checkpoint.json``) to ``cfg.steps`` steps.

    Run it under ``torchrun --nproc_per_node W`` for W data-parallel processes. ``callback(step,
    loss)`` is called on every rank after each step (``step`` counts completed steps). Returns a
    summary (steps, final running loss, wall time, checkpoint path) on every rank.
    """
    rank, world, local_rank = _dist_info()
    json_path = os.path.join(cfg.out, "checkpoint.json")
    meta: Optional[Dict[str, Any]] = None
    tensors: Dict[str, torch.Tensor] = {}
    if resume:
        if not os.path.isfile(json_path):
            raise CheckpointError(f"resume: no checkpoint at {json_path!r}")
        meta, tensors = read_checkpoint(json_path)
        saved = TrainConfig.from_json(meta["train"])
        # The run's identity comes from the checkpoint; only its length and bookkeeping may change.
        for f in ("steps", "ckpt_every", "sample_every", "log_every", "device", "threads", "progress", "out"):
            setattr(saved, f, getattr(cfg, f))
        cfg = saved
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _pick_device(cfg.device, local_rank)
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

    try:
        return _train_loop(cfg, meta, tensors, rank, world, device, local_batch, json_path, callback)
    finally:
        if own_group:  # a group the caller created is the caller's to destroy
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_loop(cfg, meta, tensors, rank, world, device, local_batch, json_path, callback):
    from torch.utils.data import DistributedSampler

    data, data_info = load_dataset(cfg.data, image_size=cfg.image_size)
    n, channels, h, w = data.shape
    if h != w:
        raise ValueError(f"data: expected square images, got {h}x{w}")
    if cfg.batch > n:
        raise ValueError(f"batch: {cfg.batch} is larger than the data set ({n} images)")
    schedule = NoiseSchedule.linear(cfg.T, cfg.beta_start, cfg.beta_end)
    alphas = schedule.alphas_cumprod.to(torch.float32)

    torch.manual_seed(cfg.seed)  # the initial weights
    model = model_from_train_config(cfg, channels, h).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    elapsed = 0.0
    running = None
    if meta is not None:
        if meta["model"] != model.config:
            raise CheckpointError(f"resume: the model config in {json_path!r} does not match the data ({channels}x{h}x{w})")
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
        if rank != 0:
            return
        opt_tensors, opt_info = _flatten_optimizer(opt)
        out_tensors = {**{f"model/{k}": v for k, v in model.state_dict().items()}, **{f"ema/{k}": v for k, v in ema.state_dict().items()}, **opt_tensors}
        weights_name = f"checkpoint-{step:08d}.safetensors"
        old = None
        if os.path.isfile(json_path):
            try:
                with open(json_path) as f:
                    old = json.load(f).get("weights")
            except (OSError, ValueError):
                old = None
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
            },
            weights_name=weights_name,
        )
        # Only now that checkpoint.json names the new weights may the previous file go.
        if old and old != weights_name:
            try:
                os.unlink(os.path.join(os.path.dirname(json_path), old))
            except FileNotFoundError:
                pass

    def grid() -> None:
        if rank != 0:
            return
        x = preview_samples(ema, schedule, (cfg.num_samples, channels, h, w), steps=cfg.sample_steps, seed=0)
        save_grid(x, os.path.join(cfg.out, "samples", f"step_{step:08d}.png"))

    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    bar = None
    if rank == 0 and cfg.progress and step < cfg.steps:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    interval_loss, interval_n, t_interval = 0.0, 0, time.perf_counter()
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
                "s_per_step": (now - t_interval) / interval_n,
                "elapsed_s": round(elapsed, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if bar is not None and not sys.stderr.isatty():
                bar.write(json.dumps(rec))
            interval_loss, interval_n, t_interval = 0.0, 0, now
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(final=step == cfg.steps)
        if step % cfg.sample_every == 0 or step == cfg.steps:
            grid()
        if callback is not None:
            callback(step, loss_value)
    if bar is not None:
        bar.close()
    return {"steps": step, "loss": running, "elapsed_s": elapsed, "checkpoint": json_path, "rank": rank, "world_size": world}
