"""amd_fast: fast AMD / DMAE / (Video)MAE pre-training of small ViTs.

Install torch first (`pip install torch==2.13.0` on CPU machines, so no CUDA build is pulled),
then `pip install -e .[dev]`; `scripts/setup.sh` does both.

The top-level `kernels/` installs as `amd_fast.kernels` (a top-level `kernels` would shadow the unrelated
PyPI package). The optional native CPU twins (csrc/) are built as `amd_fast.kernels._native` when torch is
importable at build time and a C++ compiler is present (`pip install --no-build-isolation -e .`, as
scripts/setup.sh does); otherwise the install goes on without them and the PyTorch twins are used.
"""

import os
import shutil

from setuptools import find_packages, setup


def native_extensions():
    if os.environ.get("AMD_FAST_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build env without torch: no native twins
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    ext = CppExtension(
        "amd_fast.kernels._native",
        ["csrc/amd_fast_kernels.cpp"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="amd_fast",
    version="0.1.0",
    description="Kernel-accelerated Asymmetric Masked Distillation (AMD), DMAE and VideoMAE pre-training",
    packages=find_packages(include=["amd_fast", "amd_fast.*"]) + ["amd_fast.kernels"],
    package_dir={"amd_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # fused AdamW on CPU, SDPA's CPU flash kernel
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "ruff", "matplotlib"],  # matplotlib: the mask-sweep plot
        # DeepSpeed ZeRO (amd_fast/engine.py). On CPU machines install it with --no-deps after these (its own
        # requirement list would let pip replace the pinned torch); scripts/setup.sh does.
        "deepspeed": [
            "deepspeed==0.19.8", "einops", "hjson", "msgpack", "ninja", "packaging", "psutil", "py-cpuinfo",
            "pydantic>=2",
        ],  # fmt: skip
        # Video files (amd_fast/data/decoders.py): torchcodec is the CPU decoder (needs the system FFmpeg libraries,
        # `apt-get install ffmpeg`), PyAV encodes the test media and is a fallback decoder, decord 0.6 is the
        # reference path of benchmarks/data.py. None of them requires torch, so pip leaves the pinned one alone.
        "video": ["torchcodec==0.13.0", "av==18.1.0", "decord==0.6.0"],
        # DALI's video decoder (CPU for VP8/VP9/MJPEG): a 424 MB wheel, ~1 GB installed; only worth it with a GPU.
        "dali": ["nvidia-dali-cuda120==2.4.0"],
    },
    entry_points={"console_scripts": ["amd-fast-train=amd_fast.train:main"]},
)
