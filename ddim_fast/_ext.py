"""Loading the C++ CPU kernel of ``csrc/`` (``torch.ops.ddim_fast_C.step``, ``gaussian``, ``contract_version``).

``load()`` returns the op, trying in order:

1. ``torch.ops.ddim_fast_C.step`` if something already registered it in this process;
2. the ahead-of-time build ``ddim_fast._C`` (``pip install -e .`` / a wheel builds it with
   ninja when torch is importable at build time; importing it only registers the ops);
3. a just-in-time build of ``csrc/ddim_step.cpp`` (it includes ``csrc/philox.h``) with ``torch.utils.cpp_extension.load``
   (ninja, 20-40 s on 2 cores, cached under ``TORCH_EXTENSIONS_DIR`` or
   ``~/.cache/torch_extensions``; later processes reuse it).

It raises when none works; ``ddim_fast.ops`` turns that into one warning and the PyTorch
reference. ``DDIM_FAST_BUILD_EXT=0`` disables the extension (no import, no compiler run),
``DDIM_FAST_BUILD_EXT=jit`` skips the ahead-of-time module (to test the JIT path).

Where the sources are: ``ddim_fast/csrc/`` inside an installed (non-editable) package, where
setup.py's ``build_py`` copies them (``package_data`` ``csrc/*``), else ``csrc/`` next to the
package in a source checkout or editable install. Nothing here imports torch at module level:
setup.py reads ``CXX_FLAGS`` from this file without importing the package.
"""

from __future__ import annotations

import logging
import os
import platform
import threading

__all__ = ["load", "source_files", "CXX_FLAGS", "LD_FLAGS", "EXT_NAME"]

EXT_NAME = "ddim_fast_C"  # the torch.library namespace and the JIT build name
SOURCES = ("ddim_step.cpp",)
HEADERS = ("philox.h",)  # included by ddim_step.cpp; shipped and looked for with it

# Shared by the ahead-of-time build (setup.py) and the JIT build, so both give the same bits.
# -ffp-contract=off: no FMA contraction, so every target_clones level (AVX-512, AVX2, SSE2) and
#   every build computes identical noise and steps. -fno-math-errno: inline vsqrtps.
# -mprefer-vector-width=512 (x86 only): gcc 12 otherwise uses 256-bit vectors in the
# x86-64-v4 clone. No -march=native: the kernel picks its ISA level at load time
# (target_clones), so the same binary is portable and still uses AVX-512 where there is one.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
if platform.machine().lower() in ("x86_64", "amd64"):
    CXX_FLAGS.append("-mprefer-vector-width=512")
LD_FLAGS = ["-fopenmp"]


def _layout_defines() -> list:
    """ddim_fast/layout.py's -D flags, read without importing the package (setup.py loads this file)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layout.py")
    spec = importlib.util.spec_from_file_location("_ddim_fast_layout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cxx_defines()


# The column layout of the coefficient table is defined once, in layout.py.
CXX_FLAGS += _layout_defines()

_LOCK = threading.Lock()


def source_files() -> list:
    """Absolute paths of the C++ sources (installed copy first, then the source checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        paths = [os.path.join(folder, name) for name in SOURCES]
        if all(os.path.isfile(os.path.join(folder, name)) for name in SOURCES + HEADERS):
            return paths
    raise FileNotFoundError(f"the C++ sources {SOURCES} are neither in {here}/csrc nor in {os.path.dirname(here)}/csrc")


def _registered():
    import torch

    try:
        return torch.ops.ddim_fast_C.step
    except (AttributeError, RuntimeError):
        return None


def _jit_build(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    try:  # (a private helper: the folder load() itself builds in)
        build_dir = cpp_extension._get_build_directory(EXT_NAME, False)
        cached = os.path.exists(os.path.join(build_dir, EXT_NAME + ".so"))
    except Exception:
        build_dir, cached = "the torch extensions folder", False
    if not cached:  # a log line, not a warning: the first run otherwise sits silent for ~30 s
        logging.getLogger("ddim_fast").warning("ddim_fast: compiling the C++ CPU kernel once (~30 s) into %s", build_dir)
    cpp_extension.load(
        name=EXT_NAME,
        sources=source_files(),
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        is_python_module=False,  # torch.ops.load_library: the static registrations run
        verbose=verbose,
    )


def load():
    """``torch.ops.ddim_fast_C.step`` (same positional arguments as ``reference.fused_step``)."""
    mode = os.environ.get("DDIM_FAST_BUILD_EXT", "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        raise RuntimeError("the C++ extension is disabled by DDIM_FAST_BUILD_EXT=0")
    with _LOCK:
        op = _registered()
        if op is not None:
            return op
        aot_error = None
        if mode != "jit":
            try:
                import ddim_fast._C  # noqa: F401  (registers the ops)
            except ImportError as e:
                aot_error = e
            else:
                op = _registered()
                if op is not None:
                    return op
        try:
            _jit_build(verbose=os.environ.get("DDIM_FAST_VERBOSE_BUILD", "0") == "1")
        except Exception as e:
            why = f"ahead-of-time module: {aot_error}; " if aot_error is not None else ""
            raise RuntimeError(f"{why}just-in-time build failed: {type(e).__name__}: {e}") from e
        op = _registered()
        if op is None:
            raise RuntimeError("the C++ extension was built but did not register torch.ops.ddim_fast_C.step")
        return op
