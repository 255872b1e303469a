"""Shared test set-up: every test starts from the same seeds; Triton runs interpreted without a GPU."""

import os
import random

import numpy as np
import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter, which must be chosen before any
# @triton.jit function is created, i.e. before any test module imports ddim_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_extension(monkeypatch):
    """ddim_fast.ops as on a machine where the C++ extension neither imports nor compiles."""
    from ddim_fast import _ext, ops

    def unavailable():
        raise RuntimeError("no compiler (simulated)")

    monkeypatch.setattr(_ext, "load", unavailable)
    monkeypatch.setattr(ops, "_WARNED", set())
    ops._cpp_ops.cache_clear()
    yield
    ops._cpp_ops.cache_clear()  # later tests load the real extension again
