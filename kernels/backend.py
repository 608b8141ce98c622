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
    name, reason = _selected, "forced"
    if name == "auto":
        if device.type == "cuda":
            name, reason = ("triton", "auto: CUDA") if triton_available() else ("chunked", "auto: triton not installed")
        elif device.type == "cpu":
            name, reason = AUTO_CPU[op], "auto: the fastest CPU twin measured"
            if name == "native" and not _native_dtype_ok(op, dtype):
                name, reason = "chunked", f"auto: the native twin computes in fp32; {dtype} runs the chunked twin"
        else:
            name, reason = "chunked", f"auto: no kernels for {device.type}"
    if name == "native" and (native_module() is None or device.type != "cpu"):
        name, reason = "chunked", "the native extension is not built" if device.type == "cpu" else "native is CPU only"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        name, reason = "chunked", "triton needs CUDA (or TRITON_INTERPRET=1)"
    key = (op, device.type, dtype, name)
    if key not in _logged:
        _logged.add(key)
        log.info("kernels: %s on %s %s runs %s (%s)", op, device.type, str(dtype).removeprefix("torch."), name, reason)
    return name


def autocast_inputs(device_type: str, *tensors):
    """The operands of an op that autocast cannot see into (a custom autograd.Function or op), cast as autocast
    would cast a GEMM's: floating tensors to the autocast dtype when autocast is on for `device_type`, else as
    they are. The casts are ordinary autograd ops, so gradients flow back to the fp32 parameters in fp32; the
    caller then runs its Function with autocast off (`no_autocast`), so its forward and its backward (which
    autograd runs outside autocast) see the same dtypes. -> (dtype or None, tensors)."""
    if not torch.is_autocast_enabled(device_type):
        return None, tensors
    dt = torch.get_autocast_dtype(device_type)
    return dt, tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)


def no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _native_dtype_ok(op: str, dtype: torch.dtype) -> bool:
    # the native alignment loss computes in fp32 / fp64 (a forced native casts other dtypes at its boundary,
    # fused_alignment_loss); the gather takes any dtype
    return op == "gather" or dtype in (torch.float32, torch.float64)
