"""What the device does fast: on a GPU by its capability, on a CPU by measurement (amd_fast/measure.py)."""

from __future__ import annotations

import logging
import resource
import sys

import torch

from amd_fast.measure import describe, measured, sync_of, time_rounds

log = logging.getLogger(__name__)

BF16_MARGIN = 1.1  # bf16 must beat fp32 by this factor: a tie goes to the more exact one


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


def _precision_trial(device: torch.device) -> dict:
    """A ViT-S block (width 384, 6 heads) on 392 tokens (the paper's teacher input), forward + backward, in fp32
    and under bf16 autocast, its non-GEMM ops included -> {dtype: [seconds per round]}. ~1-2 s in all."""
    from amd_fast.models.vit import Block

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG stays as it is
        block = Block(384, 6).to(device)
    x = torch.randn(1, 392, 384, generator=gen).to(device).requires_grad_()
    g = torch.randn(1, 392, 384, generator=gen).to(device)

    def step(dtype):
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = block(x)
            out.backward(g.to(out.dtype))
            block.zero_grad(set_to_none=True)
            x.grad = None

        return run

    return time_rounds({"float32": step(torch.float32), "bfloat16": step(torch.bfloat16)}, rounds=4,
                       sync=sync_of(device))  # fmt: skip


def _bf16_or_fp32(t: dict) -> str:
    return "bfloat16" if t["bfloat16"] * BF16_MARGIN < t["float32"] else "float32"


def fast_cpu_dtype() -> tuple[torch.dtype, str]:
    """bf16 or fp32 for a CPU, by the measured block trial -> (dtype, the reason with its figures). Rounds that
    disagree (a busy machine) give fp32, the exact one, for this run; the next run measures again."""
    choice, res = measured("precision", torch.device("cpu"), lambda: _precision_trial(torch.device("cpu")),
                           _bf16_or_fp32)  # fmt: skip
    if not res["conclusive"] and not res.get("cached"):
        choice = "float32"
    best = {n: min(v) for n, v in res["timings"].items()}
    why = (f"a ViT-S block fwd+bwd, {best['float32'] / best['bfloat16']:.2f}x in bf16: {describe(res)} on "
           f"{res['machine']}")  # fmt: skip
    return getattr(torch, choice), why
