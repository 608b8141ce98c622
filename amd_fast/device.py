"""What the device does fast: on a GPU by its capability, on a CPU by measurement (amd_fast/measure.py)."""

from __future__ import annotations

import logging
import resource
import sys

import torch

from amd_fast.measure import measured, sync_of, time_call

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
    and under bf16 autocast, its non-GEMM ops included -> {dtype: best seconds}. ~1 s in all."""
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

    # interleaved, best of each: a busy moment of a shared machine must not decide
    out: dict[str, float] = {}
    for dt in (torch.float32, torch.bfloat16) * 2:
        name = str(dt).removeprefix("torch.")
        out[name] = min(out.get(name, float("inf")), time_call(step(dt), reps=2, sync=sync_of(device)))
    return out


def fast_cpu_dtype() -> tuple[torch.dtype, str]:
    """bf16 or fp32 for a CPU, by the measured block trial -> (dtype, the reason with its figures)."""
    res = measured("precision", torch.device("cpu"), lambda: _precision_trial(torch.device("cpu")))
    t = res["timings"]
    fp32, bf16 = t["float32"], t["bfloat16"]
    dt = torch.bfloat16 if bf16 * BF16_MARGIN < fp32 else torch.float32
    why = (f"measured a ViT-S block fwd+bwd: bf16 {bf16 * 1e3:.1f} ms vs fp32 {fp32 * 1e3:.1f} ms "
           f"({fp32 / bf16:.2f}x) on {res['machine']}{', cached' if res.get('cached') else ''}")  # fmt: skip
    return dt, why
