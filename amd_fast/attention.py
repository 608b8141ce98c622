"""One attention function, several backends, chosen once.

`attention(q, k, v)` takes `[B, H, N, hd]` tensors and returns `[B, H, Nq, hd]` (Nq may be smaller
than N: the last block of a decoder only needs some query rows). Backends, fastest first:

- `flash_attn`: Dao-AILab flash-attention, CUDA, fp16/bf16 only.
- `xformers`: memory-efficient attention, CUDA.
- `sdpa`: `F.scaled_dot_product_attention`. On CPU it runs a flash kernel (~4.6x faster than the
  explicit softmax below on this project's 2-core machine), and never materializes the N x N matrix.
- `math`: the explicit `softmax(q k^T / sqrt(d)) v` of the VideoMAE / AMD reference code; the
  reference the others are tested against.

`select_backend` picks one for a device and dtype (or the one a config forces), logs the choice once
with its reason, and fails with a clear message when a forced backend cannot run. Models hold
`get_attention(requested)`, which resolves on the device and dtype of the tensors it is first given
(a bf16 teacher and an fp32 evaluation of the same code get the backend each can run), then reuses it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "xformers", "sdpa", "math")


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: the explicit softmax attention of the VideoMAE code."""
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional dependency, CUDA only

    # flash-attn wants [B, N, H, hd]
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops as xops  # optional dependency, CUDA only

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_IMPLS: dict[str, Callable] = {
    "flash_attn": attention_flash,
    "xformers": attention_xformers,
    "sdpa": attention_sdpa,
    "math": attention_math,
}


def backend_available(name: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether `name` can run here, and if not, why."""
    if name in ("sdpa", "math"):
        return True, ""
    if device.type != "cuda":
        return False, f"{name} needs a CUDA device (device is {device.type})"
    module = "flash_attn" if name == "flash_attn" else "xformers"
    if importlib.util.find_spec(module) is None:
        return False, f"{module} is not installed"
    if name == "flash_attn" and dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash_attn needs fp16/bf16 inputs (dtype is {dtype})"
    return True, ""


def check_backend(requested: str) -> str:
    """A backend name as a config gives it (`auto` or one of BACKENDS); an unknown one fails, naming it."""
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"attention backend {requested!r} is unknown; allowed: auto, {', '.join(BACKENDS)}")
    return requested


_logged: set[tuple[str, str, str, torch.dtype]] = set()


def select_backend(requested: str = "auto", device: torch.device | str = "cpu", dtype=torch.float32) -> str:
    """Resolve `auto` to the fastest backend that runs on this device and dtype; check a forced one.
    The choice and its reason are logged once per (request, device type, dtype)."""
    device = torch.device(device)
    check_backend(requested)
    if requested != "auto":
        ok, why = backend_available(requested, device, dtype)
        if not ok:
            raise RuntimeError(f"attention backend '{requested}' was forced but cannot run: {why}")
        name, reason = requested, "forced"
    else:
        skipped = []
        for name in BACKENDS:
            ok, why = backend_available(name, device, dtype)
            if ok:
                break
            skipped.append(why)
        reason = "auto, the fastest that runs here" + (f" ({'; '.join(skipped)})" if skipped else "")
    key = (requested, name, device.type, dtype)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend on %s %s: %s (%s)", device.type, str(dtype).removeprefix("torch."), name, reason)
    return name


class _Dispatch:
    """attention(q, k, v) on the backend resolved for the device and dtype of q (resolved once per pair)."""

    def __init__(self, requested: str):
        self.requested = check_backend(requested)
        self._impl: dict[tuple[str, torch.dtype], Callable] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (q.device.type, q.dtype)
        impl = self._impl.get(key)
        if impl is None:
            impl = self._impl[key] = _IMPLS[select_backend(self.requested, q.device, q.dtype)]
        return impl(q, k, v)


_DISPATCH: dict[str, _Dispatch] = {}


def get_attention(requested: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attention function for a config's backend (`auto` or forced), shared by every block that asks."""
    if requested not in _DISPATCH:
        _DISPATCH[requested] = _Dispatch(requested)
    return _DISPATCH[requested]
