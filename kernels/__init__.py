"""Triton kernels of ddim_fast, installed as ``ddim_fast.kernels`` (never as a top-level ``kernels``).

- ``ddim_step``: the one fused step of every solver table (``fused_step``, the Triton backend of
  the ``ddim_fast::step`` op) and the Philox Gaussian for x_T (``gaussian``).

Nothing is imported here: ``import ddim_fast.kernels`` neither imports triton nor queries a GPU.
``ddim_fast.ops`` imports ``ddim_fast.kernels.ddim_step`` on first use of the Triton backend; to
run the kernels on CPU tensors (tests), set ``TRITON_INTERPRET=1`` before that import.
"""
