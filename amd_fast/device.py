"""What the device can do fast, decided by capability rather than by a flag the user must know."""

from __future__ import annotations

import functools
import logging
import resource
import sys

import torch

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.cache
def cpu_has_amx() -> bool:
    """AMX tiles are what make bf16 GEMMs faster than fp32 on a CPU. Without them (AVX-512-BF16 only),
    bf16 runs at about half the fp32 GEMM rate on this project's machines, so fp32 is the fast choice."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype for inference-only work (the teacher) on this device."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_amx() else torch.float32


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the student, or None where autocast does not pay (CPUs without AMX)."""
    if setting == "off":
        return None
    if setting != "auto":
        return getattr(torch, setting)
    dt = fast_dtype(device)
    return None if dt == torch.float32 else dt


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
