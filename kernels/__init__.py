"""Triton kernels of ddim_fast, installed as ``ddim_fast.kernels`` (never as a top-level ``kernels``).

- ``ddim_step``: the one fused step of every solver table (``fused_step``, the Triton backend of
  the ``ddim_fast::step`` op) and the Philox Gaussian for x_T (``gaussian``).

Nothing is imported here: ``import ddim_fast.kernels`` neither imports triton nor queries a GPU.
``ddim_fast.ops`` imports ``ddim_fast.kernels.ddim_step`` on first use of the Triton backend; to
run the kernels on CPU tensors (tests), set ``TRITON_INTERPRET=1`` before that import.

Imported as a top-level ``kernels`` (the repository root is on ``sys.path``: ``python -m pytest``
or a script run from the root), this folder would shadow the PyPI package of that name, which
transformers and diffusers import. It then hands the name over to that package, or, where none is
installed, raises the ImportError that a missing package raises.
"""

if __name__ == "kernels":

    def _hand_over():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                "No module named 'kernels' (the repository's kernels/ folder is ddim_fast.kernels, not a top-level package)",
                name="kernels",
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _hand_over()
    del _hand_over
