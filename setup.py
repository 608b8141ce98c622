"""amd_fast: fast AMD / DMAE / (Video)MAE pre-training of small ViTs.

Install torch first (`pip install torch==2.13.0` on CPU machines, so no CUDA build is pulled),
then `pip install -e .[dev]`; `scripts/setup.sh` does both.
"""

from setuptools import find_packages, setup

setup(
    name="amd_fast",
    version="0.1.0",
    description="Kernel-accelerated Asymmetric Masked Distillation (AMD), DMAE and VideoMAE pre-training",
    packages=find_packages(include=["amd_fast", "amd_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # fused AdamW on CPU, SDPA's CPU flash kernel
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={"dev": ["pytest", "ruff"]},
    entry_points={"console_scripts": ["amd-fast-train=amd_fast.train:main"]},
)
