"""Which implementation each op runs, chosen once per process and logged (STYLE habit 8).

Backends: `reference` (plain PyTorch, the math as written: kernels off), `chunked` (chunked PyTorch, the CPU
twin and memory baseline), `compiled` (the chunked twin with its row part through torch.compile), `native`
(the optional C++ extension, csrc/), `triton` (CUDA; or any device under `TRITON_INTERPRET=1`, which only tests
use). `auto` picks per op and device:

- CUDA tensors: `triton` when Triton is installed, else `chunked`;
- CPU tensors: the twin that won `benchmarks/kernels.py` on this project's CPU (AUTO_CPU below), falling back
  to `chunked` when the native extension is not built.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger("amd_fast.kernels")

BACKENDS = ("auto", "reference", "chunked", "compiled", "native", "triton")

# From benchmarks/kernels.py on the 2-core AVX-512 CPU (README, "Kernels"): at the paper's shapes the native
# twins beat the compiled chunked PyTorch ones in every case, forward and forward+backward (the alignment loss
# at a fraction of their memory; the gathers, whose compiled twin is the plain index_select, by 10-25%).
AUTO_CPU = {"alignment_loss": "native", "gather": "native"}

_selected = "auto"
_logged: set[tuple[str, str, str]] = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # without importing it (see triton_utils)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_module():
    """The compiled extension, or None when it was not built (no compiler at install time)."""
    try:
        from amd_fast.kernels import _native
    except ImportError:
        return None
    return _native


def select(name: str) -> None:
    """Force one backend for every op (`auto` restores the default). Tests and `objective.kernels` use it."""
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if name == "native" and native_module() is None:
        raise RuntimeError("kernel backend 'native' asked for, but the C++ extension is not built (see README)")
    if name == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' asked for, but triton is not installed")
    _selected = name


def selected() -> str:
    return _selected


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `op` runs on for tensors of this device and dtype (logged once per combination)."""
    name = _selected
    if name == "auto":
        if device.type == "cuda":
            name = "triton" if triton_available() else "chunked"
        elif device.type == "cpu":
            name = AUTO_CPU[op]
        else:
            name = "chunked"
    if name == "native" and (native_module() is None or device.type != "cpu" or not _native_dtype_ok(op, dtype)):
        name = "chunked"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        name = "chunked"
    key = (op, device.type, name)
    if key not in _logged:
        _logged.add(key)
        log.info("kernels: %s on %s runs %s (selected: %s)", op, device.type, name, _selected)
    return name


def _native_dtype_ok(op: str, dtype: torch.dtype) -> bool:
    # the native alignment loss is written for fp32/fp64 (the CPU training dtypes); the gather takes any
    return op == "gather" or dtype in (torch.float32, torch.float64)
