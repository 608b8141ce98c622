"""What the device does fast: on a GPU by its capability, on a CPU by measurement (amd_fast/measure.py)."""

from __future__ import annotations

import logging
import resource
import sys

import torch

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_logged: set[tuple[str, str]] = set()


def log_choice(what: str, choice, reason: str) -> None:
    """Log a backend / precision choice with its reason, once per process for each (what, choice)."""
    key = (what, str(choice))
    if key not in _logged:
        _logged.add(key)
        log.info("%s: %s (%s)", what, str(choice).removeprefix("torch."), reason)


def fast_dtype_and_reason(device: torch.device) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with bf16 tensor cores"
        return torch.float16, "CUDA without bf16 support"
    if device.type != "cpu":
        return torch.float32, f"no bf16 trial for {device.type}"
    # The same flags (AVX-512-BF16, no AMX) give 4.4x fp32's GEMM rate on one CPU and half of it on another:
    # measured, once per machine
    from amd_fast.measure import fast_cpu_dtype

    return fast_cpu_dtype()


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype for inference-only work (the teacher) on this device."""
    return fast_dtype_and_reason(device)[0]


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the student, or None where autocast does not pay (a CPU whose bf16 is slow). Logged."""
    if setting == "off":
        dt, why = None, "train.autocast=off"
    elif setting != "auto":
        dt, why = getattr(torch, setting), f"train.autocast={setting}"
    else:
        dt, why = fast_dtype_and_reason(device)
        dt, why = (None if dt == torch.float32 else dt), f"auto: {why}"
    log_choice(f"autocast on {device.type}", "off (fp32)" if dt is None else dt, why)
    return dt


def use_fused_adamw(requested: bool, device: torch.device) -> bool:
    """PyTorch's fused AdamW (CPU and CUDA kernels; ~6x the for-each one on this project's CPU; apex's FusedAdam
    in the references). Logged."""
    fused = requested and device.type in ("cpu", "cuda")
    why = "optim.fused=false" if not requested else f"fused kernel for {device.type}" if fused else \
        f"no fused kernel for {device.type}"  # fmt: skip
    log_choice(f"AdamW on {device.type}", "fused" if fused else "for-each", why)
    return fused


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
