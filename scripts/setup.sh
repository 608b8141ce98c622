#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST data (Debian package), a virtual environment in .venv,
# PyTorch pinned to 2.13.0 (on this project's CPU machines a local CPU wheel; an unpinned `torch`
# would pull a multi-GB CUDA build), and amd_fast with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, amd_fast; print('amd_fast set up: torch', torch.__version__)"
