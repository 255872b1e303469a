"""Timing helpers for ratios measured inside one benchmark (baseline and ours in the same run).

pytest-benchmark times one callable per test; a speed-up is only meaningful against a baseline
timed on the same machine in the same minute, so each benchmark also times its baseline here
and records the ratio in ``benchmark.extra_info``.
"""

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, *, repeat: int = 20, warmup: int = 3, device="cpu") -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(fns, *, rounds: int, block: int = 1, warmup: int = 1, device="cpu"):
    """Per-call wall times of several callables, taking turns: {name: [seconds, ...]}.

    Each round runs every callable ``block`` times back to back, so a slow phase of a shared
    machine (another job, a frequency drop) slows all of them alike while each still runs with
    its own data in cache; ratios are then taken per round (``paired_ratio``, block = 1) or
    between medians / minimums of these lists instead of between runs minutes apart.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, baseline: str, ours: str) -> float:
    """Median over rounds of baseline / ours (a speed-up when > 1)."""
    return statistics.median(b / o for b, o in zip(times[baseline], times[ours]))


def small_unet():
    """The benches' diffusers UNet2DModel (5.4M parameters, 32x32 RGB), seeded."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 96, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval()


def json_cells(path: str):
    """(cells, put): a JSON file of finished cells, rewritten atomically after each ``put(key, value)``."""
    import json
    import os

    cells = json.load(open(path)) if os.path.exists(path) else {}

    def put(key, value):
        cells[key] = value
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cells, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    return cells, put
