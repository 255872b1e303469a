"""Small helpers shared by the tests."""

import numpy as np
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "tensor"):
    """torch.testing-style check whose message names the worst element (xformers' habit)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    excess = err - tol
    if excess.numel() and excess.max() > 0:
        idx = np.unravel_index(int(torch.argmax(excess)), tuple(err.shape))
        raise AssertionError(
            f"{what}: max abs error {err.max().item():.3e} (atol={atol:g}, rtol={rtol:g}); worst at {tuple(int(i) for i in idx)}: "
            f"actual {actual[idx].item():.8g} vs expected {expected[idx].item():.8g}"
        )


class EagerReplayCapturer:
    """Stands in for CUDA graphs on the CPU: 'capture' records the loop, 'replay' reruns it eagerly
    on the same static buffers, so everything but the CUDA calls themselves is exercised."""

    device_types = frozenset({"cpu"})

    def __init__(self, fail_with=None):
        self.fail_with = fail_with
        self.warmups = self.captures = self.replays = 0

    def warmup(self, fn):
        self.warmups += 1
        fn()

    def capture(self, fn):
        self.captures += 1
        if self.fail_with is not None:
            raise self.fail_with

        def replay():
            self.replays += 1
            fn()

        return replay
