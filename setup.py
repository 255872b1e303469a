"""ddim_fast: a custom-kernel accelerated DDIM sampler for PyTorch diffusion models.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as ``ddim_fast.kernels`` (a top-level ``kernels`` would clash with a PyPI package).
"""

from setuptools import setup

setup(
    name="ddim_fast",
    version="0.1.0",
    description="Fused DDIM/DDPM sampler (Song, Meng & Ermon, ICLR 2021) with Triton and C++ kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["ddim_fast", "ddim_fast.nn", "ddim_fast.kernels"],
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
        "test": [
            "pytest>=7.0",
            "pytest-benchmark>=4.0",
            "diffusers>=0.30",
            "scikit-learn>=1.2",
            "scipy>=1.10",
        ],
    },
    entry_points={"console_scripts": ["ddim-fast = ddim_fast.cli:main"]},
)
