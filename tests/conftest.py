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
    ops._cpp_load.cache_clear()
    yield
    ops._cpp_load.cache_clear()  # later tests load the real extension again


@pytest.fixture(params=["torch", "cpp", "triton"])
def step_backend(request, monkeypatch):
    """Each concrete backend of the fused op by name, and proof that it ran: the test passes
    ``backend=step_backend`` and afterwards at least one step must have gone through that
    backend's implementation (a silent fallback to the reference fails the test)."""
    from ddim_fast import ops

    name = request.param
    if ops.resolve_backend(name, "cpu") != name:
        pytest.fail(f"the {name} backend is unavailable here: the test would compare the reference with itself")
    calls = []
    impl = ops._IMPLS[name]  # a factory of the backend's function (ops.step_impl)

    def counted(*args):
        calls.append(1)
        return impl()(*args)

    monkeypatch.setitem(ops._IMPLS, name, lambda: counted)
    yield name
    assert calls, f"backend={name!r} was asked for but its implementation never ran"
