"""ddim_fast: a custom-kernel accelerated DDIM sampler for PyTorch diffusion models.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as ``ddim_fast.kernels`` (a top-level ``kernels`` would clash with a PyPI package).

The C++ CPU kernel (``csrc/``) is compiled ahead of time into ``ddim_fast._C`` with ninja when
torch is importable while building (``pip install --no-build-isolation -e .``; ~30 s on 2
cores). ``DDIM_FAST_BUILD_EXT=0`` skips it. A failed build (no compiler, ...) is a warning,
never a failed install: ``ddim_fast._ext`` then compiles ``csrc/`` on first use, or the
sampler falls back to the PyTorch reference with one warning. The sources are also copied
into the package (``ddim_fast/csrc/``) so that an installed copy can compile them itself.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_settings():
    """ddim_fast/_ext.py (compiler flags) without importing the package (it needs torch & co.)."""
    spec = importlib.util.spec_from_file_location("_ddim_fast_ext_settings", os.path.join(HERE, "ddim_fast", "_ext.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCsrc(build_py):
    """build_py that also ships csrc/*.cpp|*.h as ddim_fast/csrc/ (for the JIT build of a wheel)."""

    def run(self):
        super().run()
        source = os.path.join(HERE, "csrc")
        if not os.path.isdir(source):  # e.g. an sdist made without them: nothing to ship
            return
        target = os.path.join(self.build_lib, "ddim_fast", "csrc")
        self.mkpath(target)
        for name in sorted(os.listdir(source)):
            if name.endswith((".cpp", ".h")):
                self.copy_file(os.path.join(source, name), os.path.join(target, name))


def _cpp_extension():
    """(ext_modules, cmdclass) for ddim_fast._C, or none when disabled or torch is not importable."""
    cmdclass = {"build_py": BuildPyWithCsrc}
    if os.environ.get("DDIM_FAST_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        return [], cmdclass
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # torch not importable here (e.g. build isolation): compiled on first use
        return [], cmdclass

    class OptionalBuildExtension(BuildExtension):
        """A build failure is a warning: the package still installs and works without _C."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler, missing headers, ...
                self.warn(
                    f"ddim_fast: building the C++ extension failed ({type(e).__name__}: {e}); it will be "
                    "compiled on first use, or the sampler will use the PyTorch reference"
                )

    settings = _ext_settings()
    ext = CppExtension(
        "ddim_fast._C",
        sources=[os.path.join("csrc", name) for name in settings.SOURCES],
        extra_compile_args={"cxx": list(settings.CXX_FLAGS)},
        extra_link_args=list(settings.LD_FLAGS),
    )
    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


EXT_MODULES, CMDCLASS = _cpp_extension()

setup(
    name="ddim_fast",
    version="0.1.0",
    description="Fused DDIM/DDPM sampler (Song, Meng & Ermon, ICLR 2021) with Triton and C++ kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["ddim_fast", "ddim_fast.nn", "ddim_fast.experiments", "ddim_fast.kernels"],
    package_dir={"ddim_fast": "ddim_fast", "ddim_fast.kernels": "kernels"},
    package_data={"ddim_fast": ["assets/*", "csrc/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "einops>=0.7",
        "tqdm>=4.60",
        "Pillow>=9.0",
        "safetensors>=0.4",
        "ninja>=1.11",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # ddim_fast.FusedScheduler (a diffusers scheduler); the rest of the package never imports it
        "diffusers": ["diffusers>=0.30"],
        "test": [
            "pytest>=7.0",
            "pytest-benchmark>=4.0",
            "diffusers>=0.30",
            "transformers>=4.40",  # a StableDiffusionPipeline assembled from configs (CLIP text encoder) in the tests
            "scikit-learn>=1.2",
            "scipy>=1.10",
            "matplotlib>=3.5",
        ],
        "plots": ["matplotlib>=3.5"],  # the tables' line plots (ddim-fast eval); PNG grids need only Pillow
    },
    entry_points={"console_scripts": ["ddim-fast = ddim_fast.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
