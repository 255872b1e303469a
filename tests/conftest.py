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
