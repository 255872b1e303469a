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
