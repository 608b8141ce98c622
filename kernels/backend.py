"""Which implementation each op runs: forced once per process, or `auto`, measured once per machine; logged.

Backends: `reference` (plain PyTorch, the math as written: kernels off), `chunked` (chunked PyTorch, the CPU
twin and memory baseline), `compiled` (the chunked twin with its row part through torch.compile), `native`
(the optional C++ extension, csrc/), `triton` (CUDA; or any device under `TRITON_INTERPRET=1`, which only tests
use). `auto` runs, at the first call of each shape class (rows bucketed, widths, what the call fuses, whether it
needs gradients), every candidate on the call's own inputs and keeps the fastest (amd_fast/measure.py: cached
per machine with the figures, which the log repeats): on CUDA `triton`, `chunked` and `reference`, so plain
PyTorch runs where a kernel does not pay; on a CPU `native` (when built; fp32 / fp64 for the fused loss),
`chunked` and `reference`. Inside a torch.compile trace (nothing to time there) and when only one candidate
runs, the first candidate.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger("amd_fast.kernels")

BACKENDS = ("auto", "reference", "chunked", "compiled", "native", "triton")

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
    _chosen.clear()


def selected() -> str:
    return _selected


def candidates(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """What `auto` tries for `op` on this device and dtype, in order (the first is taken when nothing is timed)."""
    if device.type == "cuda":
        return (["triton"] if triton_available() else []) + ["chunked", "reference"]
    if device.type == "cpu":
        return (["native"] if native_module() is not None and _native_dtype_ok(op, dtype) else []) + \
            ["chunked", "reference"]  # fmt: skip
    return ["chunked"]


_chosen: dict[tuple, tuple[str, str]] = {}  # (op, device type, dtype, shape key) -> (backend, reason)


def resolve(op: str, device: torch.device, dtype: torch.dtype, shape: tuple = (), trials=None) -> str:
    """The backend `op` runs on for tensors of this device and dtype (logged once per combination). Under `auto`
    with `trials` ({backend: a zero-argument call of the op on this call's inputs}, built lazily by
    `trials(names)`), the fastest at `shape` (the call's shape class), measured once per machine."""
    name, reason = _selected, "forced"
    if name == "auto":
        key = (op, device.type, dtype, shape)
        if key in _chosen:
            return _chosen[key][0]
        cands = candidates(op, device, dtype)
        if len(cands) == 1 or trials is None or torch.compiler.is_compiling():
            name, reason = cands[0], "auto: the first candidate" + (" (no trial)" if len(cands) > 1 else "")
        else:
            from amd_fast.measure import fastest

            what = f"kernels/{op} {device.type} {str(dtype).removeprefix('torch.')} {' '.join(map(str, shape))}"
            name, why = fastest(what, device, trials(cands))
            reason = f"auto, the fastest here: {why}"
            _chosen[key] = (name, reason)  # measured: the next call of this class skips the lookup
    if name == "native" and (native_module() is None or device.type != "cpu"):
        name, reason = "chunked", "the native extension is not built" if device.type == "cpu" else "native is CPU only"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        name, reason = "chunked", "triton needs CUDA (or TRITON_INTERPRET=1)"
    key = (op, device.type, dtype, name, shape)
    if key not in _logged:
        _logged.add(key)
        log.info("kernels: %s on %s %s%s runs %s (%s)", op, device.type, str(dtype).removeprefix("torch."),
                 f" [{' '.join(map(str, shape))}]" if shape else "", name, reason)  # fmt: skip
    return name


def trial_inputs(*tensors):
    """Detached views of a call's inputs that ask for gradients as the originals do (a trial's backward must not
    reach the caller's graph)."""
    return [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]


def finish_trial(out, grad: bool) -> None:
    """A trial's backward: ones into every output that carries a gradient."""
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None and o.requires_grad]
    if grad and outs:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


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
