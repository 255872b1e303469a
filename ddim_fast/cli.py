"""The ``ddim-fast`` command.

    ddim-fast sample --steps 50 --eta 0 --n 64 --seed 0 --out grid.png    # the embedded digits model
    ddim-fast sample --ckpt runs/digits --npz samples.npz --out grid.png  # a training run's EMA model
    ddim-fast sample --solver dpmpp_3m --steps 10 --skip logsnr         # DPM-Solver++(3M): S = 10
    ddim-fast train --data digits --out runs/digits --steps 12000         # L_simple, EMA, checkpoints
    ddim-fast train --out runs/digits --resume --steps 20000              # continue a run exactly
    torchrun --nproc_per_node 2 -m ddim_fast.cli train ...                # data-parallel training
    ddim-fast export --ckpt runs/digits --out my_model.json               # EMA weights only

Each subcommand is a ``_cmd_<name>(args)`` function registered in ``_build_parser``; new ones
(``eval``, ``figure``) add a subparser and a function the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _int_list(text: str):
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return vals


def _skip(text: str):
    """A named tau selection, or comma-separated increasing timesteps."""
    if text and (text[0].isdigit()):
        return list(_int_list(text))
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddim-fast", description="Fused DDIM sampling, and training of the DDPM UNet.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sample", help="draw images with FusedSampler and save a PNG grid",
                       description="Sample with FusedSampler from a checkpoint (default: the embedded digits model).")
    s.add_argument("--ckpt", default=None, help="training folder, checkpoint .json or .safetensors (default: embedded model)")
    s.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a training checkpoint")
    s.add_argument("--steps", type=int, default=50, help="number of sampling steps S (default 50)")
    s.add_argument("--eta", default="0", help='0 = DDIM, 1 = DDPM posterior variance, or "ddpm_large"')
    s.add_argument("--skip", type=_skip, default="uniform",
                   help="uniform | quad | trailing | linspace | logsnr | t1,t2,... (default uniform)")
    s.add_argument("--solver", default="ddim", choices=("ddim", "dpmpp_2m", "dpmpp_3m"),
                   help="ddim (Eq. 12, any eta) or a multistep ODE solver: dpmpp_2m | dpmpp_3m (eta 0; see README)")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=int, default=None, help="images per grid row (default: a square grid)")
    s.add_argument("--scale", type=int, default=None, help="enlarge each image this many times (default: to >= 64 px)")
    s.add_argument("--out", default="grid.png", help="PNG grid to write (default grid.png)")
    s.add_argument("--npz", default=None, help="also save the images as uint8 (N, H, W, C) under 'arr_0' (what FID evaluators read)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", default="auto", help="FusedSampler backend (auto | triton | cpp | torch)")
    s.add_argument("--precision", default="auto", help="FusedSampler precision of the model (auto | fp32 | fp16 | bf16)")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is fastest on a busy machine)")
    s.set_defaults(func=_cmd_sample)

    t = sub.add_parser("train", help="train a UNet with L_simple (EMA, checkpoints, --resume, torchrun)",
                       description="Train an epsilon-prediction UNet. Unset options take TrainConfig's defaults "
                       "(or, with --resume, the checkpoint's values).")
    t.add_argument("--data", default=None, help="'digits', a folder of PNG/JPEG images, or a .npz of uint8 images")
    t.add_argument("--out", required=True, help="output folder (checkpoint.json, checkpoint-*.safetensors, samples/, metrics.jsonl)")
    t.add_argument("--resume", action="store_true", help="continue exactly from <out>/checkpoint.json")
    t.add_argument("--steps", type=int, default=None, help="total number of training steps (default 10000)")
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
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="write the EMA weights of a training run as a small sampling checkpoint")
    e.add_argument("--ckpt", required=True, help="training folder or checkpoint .json")
    e.add_argument("--out", required=True, help="output .json (the .safetensors goes next to it)")
    e.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    e.set_defaults(func=_cmd_export)

    from ddim_fast import experiments  # adds `eval`, `figure`; routes `sample --npz` through sharded sampling

    experiments.register(sub)
    return p


def _cmd_train(args) -> int:
    from ddim_fast.train import TrainConfig, train

    cfg = TrainConfig(out=args.out)
    for name in (
        "data", "steps", "batch", "lr", "warmup", "grad_clip", "ema_decay", "flip", "seed", "image_size", "ch",
        "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_groups", "T", "beta_start", "beta_end",
        "ckpt_every", "sample_every", "log_every", "device", "threads", "progress",
    ):
        v = getattr(args, name)
        if v is not None:
            if args.resume and name not in ("steps", "ckpt_every", "sample_every", "log_every", "device", "threads", "progress"):
                raise SystemExit(f"ddim-fast train: --{name.replace('_', '-')} cannot change on --resume (the checkpoint fixes it)")
            setattr(cfg, name, v)
    t0 = time.time()
    summary = train(cfg, resume=args.resume)
    if summary["rank"] == 0:
        summary["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(summary))
    return 0


def _parse_eta(text: str):
    if text == "ddpm_large":
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f'ddim-fast sample: --eta expects a float >= 0 or "ddpm_large", got {text!r}') from None


def _cmd_sample(args) -> int:
    import torch

    from ddim_fast import FusedSampler
    from ddim_fast.data import save_grid, save_npz
    from ddim_fast.train import load_model

    if args.n < 1:
        raise SystemExit(f"ddim-fast sample: --n must be a positive number of images, got {args.n}")
    if not args.out.lower().endswith(".png"):
        raise SystemExit(f"ddim-fast sample: --out must name a .png file, got {args.out!r}")
    eta = _parse_eta(args.eta)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"ddim-fast sample: --threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, schedule = load_model(args.ckpt, device=args.device, weights=args.weights)
    cfg = model.config
    shape = (args.n, cfg["in_channels"], cfg["resolution"], cfg["resolution"])
    sampler = FusedSampler(model, schedule=schedule, steps=args.steps, eta=eta, skip=args.skip, solver=args.solver,
                           backend=args.backend, precision=args.precision)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = sampler.sample(shape=shape, seed=args.seed)
    dt = time.perf_counter() - t0
    x = x.float().clamp(-1, 1).cpu()
    save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    if args.npz:
        save_npz(x, args.npz)
    print(f"wrote {args.out} ({args.n} images {shape[1]}x{shape[2]}x{shape[3]}, {len(sampler.timesteps)} steps, "
          f"{args.solver if args.solver != 'ddim' else f'eta={eta}'}, {dt:.2f} s)" + (f" and {args.npz}" if args.npz else ""))
    return 0


def _cmd_export(args) -> int:
    import torch

    from ddim_fast.train import export_model

    export_model(args.ckpt, args.out, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ddim_fast.train import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # our ValueErrors name the bad argument
        print(f"ddim-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
