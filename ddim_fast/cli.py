"""The ``ddim-fast`` command.

    ddim-fast sample --steps 50 --eta 0 --n 64 --seed 0 --out grid.png    # the embedded digits model
    ddim-fast sample --ckpt runs/digits --npz samples.npz --out grid.png  # a training run's EMA model
    ddim-fast sample --solver dpmpp_3m --steps 10 --skip logsnr         # DPM-Solver++(3M): S = 10
    ddim-fast tune --steps 6 --solver ipndm --out steps.json            # timesteps tuned to the model
    ddim-fast sample --steps 6 --solver ipndm --skip steps.json         # ... and sampled with them
    ddim-fast train --data digits --out runs/digits --steps 12000         # L_simple, EMA, checkpoints
    ddim-fast train --out runs/digits --resume --steps 20000              # continue a run exactly
    torchrun --nproc_per_node 2 -m ddim_fast.cli train ...                # data-parallel training
    torchrun --nproc_per_node 2 -m ddim_fast.cli sample --num-samples 50000 --npz out.npz   # sharded, resumable
    ddim-fast export --ckpt runs/digits --out my_model.json               # EMA weights only
    ddim-fast eval table1 | table2 | timing | solvers | fd                # the paper's tables (docs/results)
    ddim-fast figure consistency | interpolate | sequence                 # the paper's figures

Every subcommand is a ``_cmd_<name>(args)`` function registered in ``build_parser``. Bad input
exits with status 2 and one ``ddim-fast <command>: error: ...`` line naming the argument (the
library's ValueError, CheckpointError and FloatingPointError, and unwritable outputs), never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]

# Pillow treats images over 89.5 M pixels as decompression bombs (a warning on opening them), so
# a grid is bounded below that: 2**26 = 67 M pixels (--scale 100000 once asked for 9 TiB).
MAX_GRID_PIXELS = 1 << 26
GRID_FROM_NPZ = 256  # with --npz, the grid shows the first 256 images


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------
def _int_list(text: str):
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str):
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def _parse_eta(text: str):
    if text == "ddpm_large":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a float >= 0 or "ddpm_large", got {text!r}') from None


def _eta_list(text: str):
    return tuple(_parse_eta(v) for v in _str_list(text))


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _skip(text: str):
    """A named tau selection, a tuned-timesteps .json file, or comma-separated increasing timesteps."""
    if text and (text[0].isdigit()):
        return list(_int_list(text))
    return text


# --------------------------------------------------------------------------------------------
# checks shared by the commands (before any work starts)
# --------------------------------------------------------------------------------------------
def _device(text: str, local_rank: int = 0) -> str:
    """``--device`` checked against this machine; a bare "cuda" is this torchrun rank's GPU."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cpu":
        return str(dev)
    backend = getattr(torch, dev.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        raise ValueError(f"--device {text}: no {dev.type} device is available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    if dev.type == "cuda":
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    return str(dev)


def _threads(n: Optional[int]) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _check_output(path: str, option: str, suffix: Optional[str] = None) -> None:
    """Fail before any work when ``path`` cannot become the file that ``option`` asks for."""
    if suffix and not path.lower().endswith(suffix):
        raise ValueError(f"{option} must name a {suffix} file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path!r} is a folder; expected a file name")
    _check_folder(os.path.dirname(os.path.abspath(path)), option, path)


def _check_folder(folder: str, option: str, path: Optional[str] = None) -> None:
    """``folder`` exists and is writable, or could be created in its nearest existing parent."""
    path = folder if path is None else path
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{option}: cannot write {path!r}: {probe!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot write {path!r}: no permission to write in {probe!r}")


@contextlib.contextmanager
def _writing(path: str, option: str):
    """An OSError while writing ``path`` becomes a message that names ``path`` (not a temp file)."""
    try:
        yield
    except OSError as e:
        # data.atomic_write_bytes already says "cannot write the file: <reason>": keep the reason.
        reason = (e.strerror or str(e)).removeprefix("cannot write the file: ")
        raise ValueError(f"{option}: cannot write {path!r}: {reason}") from None


def _check_grid(n: int, h: int, w: int, nrow: Optional[int], scale: Optional[int]) -> None:
    """The grid ``data.make_grid`` would draw stays under MAX_GRID_PIXELS."""
    cols = math.ceil(math.sqrt(n)) if nrow is None else nrow
    s = max(1, 64 // max(h, w)) if scale is None else scale
    width, height = cols * (w * s + 1) + 1, -(-n // cols) * (h * s + 1) + 1
    if width * height > MAX_GRID_PIXELS:
        raise ValueError(f"--scale/--nrow: a grid of {n} images of {h}x{w} pixels at scale {s} with {cols} per row would be "
                         f"{width}x{height} pixels, over the limit of {MAX_GRID_PIXELS:,}; choose a smaller --scale or --nrow")


def _sampler_options(args) -> dict:
    return {"compile": True} if getattr(args, "compile", False) else {}


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--ckpt", default=None, help="training folder, checkpoint .json or .safetensors (default: embedded model)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a training checkpoint")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (1 is fastest on a busy machine)")
    if seed:
        p.add_argument("--seed", type=int, default=0)


def _command(sub, name: str, func, **kw) -> argparse.ArgumentParser:
    """The subparser of ``ddim-fast <name>``, run by ``func(args)``."""
    p = sub.add_parser(name, **kw)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from ddim_fast.experiments.paper import DEFAULT_OUT_DIR, TABLE1_ETAS, TABLE1_SKIPS, TABLE1_SPREAD_STEPS
    from ddim_fast.solvers import SOLVERS

    others = " | ".join(s for s in SOLVERS if s != "ddim")
    p = argparse.ArgumentParser(prog="ddim-fast", description="Fused DDIM sampling, and training of the DDPM UNet.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = _command(sub, "sample", _cmd_sample, help="draw images with FusedSampler and save a PNG grid",
                 description="Sample with FusedSampler from a checkpoint (default: the embedded digits model).")
    _model_options(s)
    s.add_argument("--steps", type=int, default=50, help="number of sampling steps S (default 50)")
    s.add_argument("--eta", type=_parse_eta, default=0.0, help='0 = DDIM, 1 = DDPM posterior variance, or "ddpm_large"')
    s.add_argument("--skip", type=_skip, default="uniform",
                   help="uniform | quad | trailing | linspace | logsnr | karras | t1,t2,... | a .json of `ddim-fast tune` "
                   "(default uniform)")
    s.add_argument("--solver", default="ddim", choices=SOLVERS,
                   help=f"ddim (Eq. 12, any eta) or a multistep solver: {others} (see README for their eta)")
    # torchrun's own parser rejects "--n" after the script as an ambiguous prefix of its
    # --nnodes/--nproc-per-node/... (Python 3.11 argparse), so --n has a long spelling too.
    s.add_argument("--n", "--num-samples", dest="n", type=_positive, default=64,
                   help="number of images (default 64; --num-samples under torchrun)")
    s.add_argument("--nrow", type=_positive, default=None, help="images per grid row (default: a square grid)")
    s.add_argument("--scale", type=_positive, default=None, help="enlarge each image this many times (default: to >= 64 px)")
    s.add_argument("--out", default="grid.png", help="PNG grid to write (default grid.png)")
    s.add_argument("--npz", default=None, help="also save the images as uint8 (N, H, W, C) under 'arr_0' (what FID evaluators "
                   "read): sharded over torchrun ranks and batches, resumable")
    s.add_argument("--force", action="store_true", help="replace an existing --npz file that is not this run's output")
    s.add_argument("--batch-size", type=_positive, default=256, help="images per model call with --npz (default 256)")
    s.add_argument("--shard-size", type=_positive, default=1000, help="images per resumable shard file with --npz (default 1000)")
    s.add_argument("--keep-shards", action="store_true", help="keep <npz>.shards/ after the final .npz is written")
    s.add_argument("--backend", default="auto", help="FusedSampler backend (auto | triton | cpp | torch)")
    s.add_argument("--precision", default="auto", help="FusedSampler precision of the model (auto | fp32 | fp16 | bf16)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (FusedSampler(compile=True))")

    u = _command(sub, "tune", _cmd_tune, help="tune S timesteps to a model and save them as JSON for `sample --skip FILE.json`",
                 description="Search the timesteps of an S-step trajectory that best match a many-step reference "
                 "on this model (ddim_fast.tune.tune_timesteps).")
    _model_options(u)
    u.add_argument("--steps", type=_positive, required=True, help="number of sampling steps S")
    u.add_argument("--solver", default="ipndm", choices=SOLVERS, help="the solver the timesteps are tuned for (default ipndm)")
    u.add_argument("--batch", type=_positive, default=64, help="images in the tuning batch (default 64)")
    u.add_argument("--loss", default="rms", choices=("rms", "log"),
                   help="what is minimised against the reference: the batch's RMS error (default), or 'log', the geometric "
                   "mean of the samples' RMS errors, for data whose fine structure the RMS error misses (tune_timesteps)")
    u.add_argument("--shift-last", action="store_true",
                   help="also search the timestep the model is told at the last call (LD3's decoupled timestep; ~2.5-4x the "
                   "model calls); the file then records it and `sample --skip FILE.json` uses it")
    u.add_argument("--out", required=True, help="the .json file to write")
    u.add_argument("--force", action="store_true", help="replace an existing --out")

    t = _command(sub, "train", _cmd_train, help="train a UNet with L_simple (EMA, checkpoints, --resume, torchrun)",
                 description="Train an epsilon-prediction UNet. Unset options take TrainConfig's defaults "
                 "(or, with --resume, the checkpoint's values).")
    t.add_argument("--data", default=None, help="'digits', a folder of PNG/JPEG images, or a .npz of uint8 images")
    t.add_argument("--out", required=True, help="output folder (checkpoint.json, checkpoint-*.safetensors, samples/, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue exactly from <out>/checkpoint.json (with its own settings)")
    t.add_argument("--fresh", action="store_true",
                   help="start a new run in an --out that holds one (its files move to <out>/previous-<UTC time>/)")
    t.add_argument("--steps", type=int, default=None,
                   help="total number of training steps (default 10000; with --resume the run's own target)")
    t.add_argument("--batch", type=int, default=None, help="global batch size (default 64)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4)")
    t.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 500)")
    t.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip (default 1.0)")
    t.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default 0.999)")
    t.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips (default off)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: the data's; digits 16)")
    t.add_argument("--ch", type=int, default=None, help="base channel width (default 32)")
    t.add_argument("--ch-mult", type=_int_list, default=None, help="channel multipliers per level (default 1,2,2)")
    t.add_argument("--num-res-blocks", type=int, default=None, help="residual blocks per level (default 2)")
    t.add_argument("--attn", type=_int_list, default=None, dest="attn_resolutions",
                   help="resolutions with self-attention (default: half the image size)")
    t.add_argument("--dropout", type=float, default=None, help="dropout (default 0.1)")
    t.add_argument("--num-groups", type=int, default=None, help="GroupNorm groups (default 8)")
    t.add_argument("--T", type=int, default=None, help="training timesteps (default 1000)")
    t.add_argument("--beta-start", type=float, default=None, help="linear schedule start (default 1e-4)")
    t.add_argument("--beta-end", type=float, default=None, help="linear schedule end (default 0.02)")
    t.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps (default 500)")
    t.add_argument("--sample-every", type=int, default=None, help="sample grid every N steps (default 1000)")
    t.add_argument("--log-every", type=int, default=None, help="metrics line every N steps (default 100)")
    t.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for each process")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no tqdm bar")

    e = _command(sub, "export", _cmd_export, help="write the EMA weights of a training run as a small sampling checkpoint")
    e.add_argument("--ckpt", required=True, help="training folder or checkpoint .json")
    e.add_argument("--out", required=True, help="output .json (the .safetensors goes next to it)")
    e.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")

    v = _command(sub, "eval", _cmd_eval, help="the paper's tables on the embedded model: table1 | table2 | timing | solvers",
                 description="Table 1 (FD vs S x eta), Table 2 (reconstruction MSE vs S), Figure 4 (time vs S), "
                 "solvers (multistep at S vs DDIM at 5 S).")
    v.add_argument("which", choices=("table1", "table2", "timing", "solvers", "fd"))
    v.add_argument("--npz", default=None, help="fd: a uint8 image .npz (e.g. from `sample --npz`) to score against the digits")
    v.add_argument("--subset-size", type=int, default=None,
                   help="fd: also score disjoint subsets of this many images (the measure's spread at that n)")
    _model_options(v)
    v.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the .md/.png/.json go (default {DEFAULT_OUT_DIR})")
    v.add_argument("--n", type=_positive, default=None,
                   help="samples per cell (table1: 500), test digits (table2: 100), batch (timing: 16)")
    v.add_argument("--steps", type=_int_list, default=None, help="comma-separated S values (default: the paper's)")
    v.add_argument("--etas", type=_eta_list, default=TABLE1_ETAS, help="table1: comma-separated etas (default 0,0.2,0.5,1,ddpm_large)")
    v.add_argument("--skips", type=_str_list, default=TABLE1_SKIPS, help="table1: tau selections (default uniform,quad)")
    v.add_argument("--spread-seed", type=int, default=1, help="table1: second seed for the spread (-1: none)")
    v.add_argument("--spread-steps", type=_int_list, default=TABLE1_SPREAD_STEPS, help="table1: S values run with the second seed")
    v.add_argument("--batch", type=_positive, default=250, help="images per model call (default 250)")
    v.add_argument("--max-minutes", type=float, default=None, help="start no new cell after this long (results so far are kept)")
    v.add_argument("--fresh", action="store_true", help="discard cached cells of this table")
    v.add_argument("--repeats", type=_positive, default=1, help="timing: best of this many runs")
    v.add_argument("--compile", action="store_true", help="torch.compile the model (FusedSampler(compile=True))")

    f = _command(sub, "figure", _cmd_figure, help="PNG grids: consistency | interpolate | sequence",
                 description="Figures of Sections 5.2-5.3 and the seed report (DDPM interpolation, sequences).")
    f.add_argument("which", choices=("consistency", "interpolate", "sequence"))
    _model_options(f)
    f.add_argument("--out", default=None, help=f"PNG path (default {DEFAULT_OUT_DIR}/figure_<which>.png)")
    f.add_argument("--n", type=_positive, default=None, help="rows (consistency 8), pairs (interpolate 4), samples (sequence 4)")
    f.add_argument("--steps", type=_int_list, default=None, help="consistency: S values (10,20,50,100,1000); others: S (50)")
    f.add_argument("--ddpm-t", type=_int_list, default=(100, 250), help="interpolate: DDPM interpolation timesteps")
    return p


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------
def _cmd_train(args) -> int:
    from ddim_fast.train import TrainConfig, train

    if args.device not in (None, "auto"):
        _device(args.device)
    given = {name: getattr(args, name) for name in (
        "data", "steps", "batch", "lr", "warmup", "grad_clip", "ema_decay", "flip", "seed", "image_size", "ch",
        "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_groups", "T", "beta_start", "beta_end",
        "ckpt_every", "sample_every", "log_every", "device", "threads", "progress",
    ) if getattr(args, name) is not None}
    # A resumed run keeps its own settings (steps, ckpt_every, ...) unless an option names one.
    cfg = TrainConfig.from_checkpoint(args.out, **given) if args.resume else TrainConfig(out=args.out, **given)
    t0 = time.time()
    summary = train(cfg, resume=args.resume, fresh=args.fresh)
    if summary["rank"] == 0:
        if summary.get("already_finished"):
            print(f"ddim-fast train: the run in {args.out!r} already finished at step {summary['steps']} (its target); "
                  "pass --steps N with a larger N to continue it", file=sys.stderr)
        if summary.get("previous_run"):
            print(f"ddim-fast train: moved the previous run to {summary['previous_run']!r}", file=sys.stderr)
        summary["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(summary))
    return 0


def _timesteps(args, model, schedule):
    """``--skip``: (a name or timesteps as given, {}), or the timesteps of a ``ddim-fast tune`` file
    and, when it has them, the model's timesteps as a ``FusedSampler`` option."""
    if isinstance(args.skip, str) and args.skip.lower().endswith(".json"):
        from ddim_fast.tune import load_tuned

        tau, model_tau = load_tuned(args.skip, model=model, schedule=schedule, solver=args.solver, with_model_timesteps=True)
        options = {} if (model_tau == tau).all() else {"model_timesteps": [int(t) for t in model_tau]}
        return [int(t) for t in tau], options
    return args.skip, {}


def _cmd_sample(args) -> int:
    import torch

    from ddim_fast import FusedSampler
    from ddim_fast.data import save_grid
    from ddim_fast.sharded import dist_env
    from ddim_fast.train import load_model

    _check_output(args.out, "--out", ".png")
    if args.npz:
        _check_output(args.npz, "--npz")
    _threads(args.threads)
    rank, world, local_rank = dist_env()
    device = _device(args.device, local_rank)
    model, schedule = load_model(args.ckpt, device=device, weights=args.weights)
    cfg = model.config
    shape = (args.n, cfg["in_channels"], cfg["resolution"], cfg["resolution"])
    _check_grid(min(args.n, GRID_FROM_NPZ) if args.npz else args.n, shape[2], shape[3], args.nrow, args.scale)
    skip, tuned = _timesteps(args, model, schedule)
    if args.npz:
        return _sample_sharded(args, model, schedule, skip, tuned, device, rank, world)
    sampler = FusedSampler(model, schedule=schedule, steps=args.steps, eta=args.eta, skip=skip, solver=args.solver,
                           backend=args.backend, precision=args.precision, **_sampler_options(args), **tuned)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = sampler.sample(shape=shape, seed=args.seed)
    dt = time.perf_counter() - t0
    with _writing(args.out, "--out"):
        save_grid(x.float().clamp(-1, 1).cpu(), args.out, nrow=args.nrow, scale=args.scale)
    print(f"wrote {args.out} ({args.n} images {shape[1]}x{shape[2]}x{shape[3]}, {len(sampler.timesteps)} steps, "
          f"{args.solver if args.solver != 'ddim' else f'eta={args.eta}'}, {dt:.2f} s)")
    return 0


def _sample_sharded(args, model, schedule, skip, tuned, device, rank, world) -> int:
    """``sample --npz``: sharded over torchrun ranks and batches, resumable; a grid of the first images."""
    import numpy as np
    import torch

    from ddim_fast.data import NPZ_KEY, save_grid
    from ddim_fast.nn import model_fingerprint
    from ddim_fast.sharded import sample_npz

    with _writing(args.npz, "--npz"):
        res = sample_npz(model, schedule, args.n, args.npz, steps=args.steps, eta=args.eta, skip=skip, solver=args.solver,
                         seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size, device=device,
                         backend=args.backend, precision=args.precision, fingerprint=model_fingerprint(model),
                         keep_shards=args.keep_shards, force=args.force, sampler_options={**_sampler_options(args), **tuned})
    if rank == 0:
        k = min(args.n, GRID_FROM_NPZ)
        with np.load(args.npz, allow_pickle=False) as f:
            first = f[NPZ_KEY][:k]
        x = torch.from_numpy(first).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with _writing(args.out, "--out"):
            save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
        print(f"wrote {args.npz} ({args.n} images, {world} process(es), {res['computed_shards']} shard(s) computed here, "
              f"{res['skipped_shards']} reused, {res['seconds']:.1f} s) and {args.out} (first {k})")
    return 0


def _cmd_tune(args) -> int:
    from ddim_fast.train import load_model
    from ddim_fast.tune import save_tuned, tune_timesteps

    _check_output(args.out, "--out", ".json")
    if os.path.lexists(args.out) and not args.force:
        raise ValueError(f"--out: {args.out!r} already exists; pass --force to replace it, or choose another --out")
    _threads(args.threads)
    model, schedule = load_model(args.ckpt, device=_device(args.device), weights=args.weights)
    cfg = model.config
    t0 = time.perf_counter()
    info = {}  # tune_timesteps fills in how the tuning went (method, errors before/after, ...)
    timesteps = tune_timesteps(model, args.steps, (args.batch, cfg["in_channels"], cfg["resolution"], cfg["resolution"]),
                               schedule=schedule, solver=args.solver, seed=args.seed, loss=args.loss, shift_last=args.shift_last,
                               info=info)  # fmt: skip
    info = {"seed": args.seed, "batch": args.batch, "seconds": round(time.perf_counter() - t0, 1), **info,
            "ckpt": "embedded" if args.ckpt is None else args.ckpt, "weights": args.weights}
    model_tau = info.get("model_timesteps")
    with _writing(args.out, "--out"):
        save_tuned(args.out, timesteps, model=model, schedule=schedule, solver=args.solver, steps=args.steps, info=info,
                   model_timesteps=model_tau)
    told = ""
    if model_tau is not None and [int(t) for t in model_tau] != [int(t) for t in timesteps]:
        told = f" (the model told {','.join(str(int(t)) for t in model_tau)})"
    print(f"tuned {len(timesteps)} timesteps for {args.solver}: {','.join(str(int(t)) for t in timesteps)}{told}; wrote {args.out} "
          f"({info['seconds']:.1f} s; sample with --solver {args.solver} --steps {args.steps} --skip {args.out})")
    return 0


def _cmd_export(args) -> int:
    import torch

    from ddim_fast.train import export_model

    _check_output(args.out, "--out")
    with _writing(args.out, "--out"):
        export_model(args.ckpt, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"wrote {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from ddim_fast import experiments

    if args.which == "fd":
        if not args.npz:
            raise ValueError("--npz FILE is required")
        print(json.dumps(experiments.npz_scores(args.npz, subset_size=args.subset_size)))
        return 0
    _check_folder(args.out_dir, "--out-dir")
    n = args.n or {"table1": 500, "table2": 100, "timing": 16, "solvers": 1000}[args.which]
    _threads(args.threads)
    model, schedule, desc = experiments.load(args.ckpt, device=_device(args.device), weights=args.weights)
    kw = dict(out_dir=args.out_dir, description=desc, sampler_options=_sampler_options(args))
    fp = desc["fingerprint"]
    if args.which == "table1":
        experiments.table1(model, schedule, n=n, seed=args.seed, spread_seed=None if args.spread_seed < 0 else args.spread_seed,
                           spread_steps=args.spread_steps, steps=args.steps or experiments.TABLE1_STEPS, etas=args.etas,
                           skips=args.skips, batch_size=args.batch, fingerprint=fp, max_minutes=args.max_minutes,
                           fresh=args.fresh, **kw)
    elif args.which == "solvers":
        seeds = (args.seed,) if args.spread_seed < 0 else (args.seed, args.spread_seed)
        experiments.solvers_table(model, schedule, n=n, seeds=seeds, batch_size=args.batch, fingerprint=fp,
                                  max_minutes=args.max_minutes, fresh=args.fresh, **kw)
    elif args.which == "table2":
        experiments.table2(model, schedule, n=n, steps=args.steps or experiments.TABLE2_STEPS, batch_size=args.batch,
                           fingerprint=fp, max_minutes=args.max_minutes, fresh=args.fresh, **kw)
    else:
        experiments.timing(model, schedule, steps=args.steps or experiments.TIMING_STEPS, n=n, repeats=args.repeats,
                           max_minutes=args.max_minutes, **kw)
    print(os.path.join(args.out_dir, f"{args.which}.md"))
    return 0


def _cmd_figure(args) -> int:
    from ddim_fast import experiments

    out = args.out or os.path.join(experiments.DEFAULT_OUT_DIR, f"figure_{args.which}.png")
    _check_output(out, "--out")
    _threads(args.threads)
    model, schedule, _ = experiments.load(args.ckpt, device=_device(args.device), weights=args.weights)
    with _writing(out, "--out"):
        if args.which == "consistency":
            experiments.figure_consistency(model, schedule, out, rows=args.n or 8, steps=args.steps or experiments.TABLE1_STEPS,
                                           seed=args.seed)
        elif args.which == "interpolate":
            experiments.figure_interpolate(model, schedule, out, pairs=args.n or 4, steps=(args.steps or (50,))[0],
                                           seed=args.seed, ddpm_t=args.ddpm_t)
        else:
            experiments.figure_sequence(model, schedule, out, n=args.n or 4, steps=(args.steps or (50,))[0], seed=args.seed)
    print(out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FloatingPointError, OSError) as e:  # CheckpointError is a ValueError; ours name the argument
        print(f"ddim-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
