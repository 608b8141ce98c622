"""One attention function, several backends, chosen once.

`attention(q, k, v)` takes `[B, H, N, hd]` tensors and returns `[B, H, Nq, hd]` (Nq may be smaller
than N: the last block of a decoder only needs some query rows). Backends, fastest first:

- `flash_attn`: Dao-AILab flash-attention, CUDA, fp16/bf16 only.
- `xformers`: memory-efficient attention, CUDA.
- `sdpa`: `F.scaled_dot_product_attention`. On CPU it runs a flash kernel that never materializes the
  N x N matrix, in fp32 arithmetic whatever the input dtype.
- `math`: the explicit `softmax(q k^T / sqrt(d)) v` of the VideoMAE / AMD reference code (the softmax in
  fp32, as autocast runs the reference's); the reference the others are tested against. Its two products are
  GEMMs, so in bf16 they run on a CPU's bf16 units, where SDPA's CPU kernel does not.

`select_backend` resolves `auto` to the fastest backend that runs on a device and dtype, measured once per
machine at the call's shape class (amd_fast/measure.py; the order above is only the order of the trials), or
checks the one a config forces; it logs the choice once with its reason (the figures for a measured one) and
fails with a clear message when a forced backend cannot run. Models hold `get_attention(requested)`, which
resolves on the device, dtype and shape class of the tensors it is given (a bf16 teacher and an fp32
evaluation of the same code get the backend each runs fastest), then reuses it.
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
    return attn.softmax(dim=-1, dtype=torch.promote_types(attn.dtype, torch.float32)).to(v.dtype) @ v


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


_logged: set[tuple] = set()


def candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends `auto` tries here, in order. On CUDA the explicit `math` is left out: its N x N matrix at a
    GPU's batch takes GiBs, and the fused kernels are built for that device."""
    names = [n for n in BACKENDS if backend_available(n, device, dtype)[0]]
    return [n for n in names if n != "math"] if device.type == "cuda" else names


def select_backend(requested: str = "auto", device: torch.device | str = "cpu", dtype=torch.float32, q=None, k=None,
                   grad: bool = False) -> str:  # fmt: skip
    """Resolve `auto` to the fastest backend that runs on this device and dtype, measured at the shape class of
    q / k when given (else the first that runs); check a forced one. Logged once per choice."""
    device = torch.device(device)
    check_backend(requested)
    cls = ""
    if requested != "auto":
        ok, why = backend_available(requested, device, dtype)
        if not ok:
            raise RuntimeError(f"attention backend '{requested}' was forced but cannot run: {why}")
        name, reason = requested, "forced"
    else:
        cands = candidates(device, dtype)
        if len(cands) == 1 or q is None or torch.compiler.is_compiling():
            name, reason = cands[0], "auto: the first that runs here" + (" (nothing else does)" if len(cands) == 1
                                                                         else " (no shape to measure)")  # fmt: skip
        else:
            name, why = _fastest({n: _IMPLS[n] for n in cands}, q, k, grad)
            reason, cls = f"auto, the fastest here: {why}", _shape_class(q, k, grad)
    key = (requested, name, device.type, dtype, cls)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend on %s %s%s: %s (%s)", device.type, str(dtype).removeprefix("torch."),
                 f" {cls}" if cls else "", name, reason)  # fmt: skip
    return name


def _shape_class(q: torch.Tensor, k: torch.Tensor, grad: bool) -> str:
    """What an attention measurement stands for: [B*H, Nq, Nk] bucketed to powers of two, the head width, grad."""
    from amd_fast.kernels.triton_utils import next_pow2

    bh, nq, nk = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    return f"bh{next_pow2(bh)} q{next_pow2(nq)} k{next_pow2(nk)} d{q.shape[3]} {'fwd+bwd' if grad else 'fwd'}"


def _fastest(impls: dict, q: torch.Tensor, k: torch.Tensor, grad: bool) -> tuple[str, str]:
    """The fastest of `impls` at this call's shape class, timed once per machine on random tensors of its shape
    (amd_fast/measure.py) -> (name, the reason with its figures)."""
    from amd_fast.measure import fastest

    gen = torch.Generator().manual_seed(0)
    dev, dt = q.device, q.dtype
    q_, k_, v_ = (torch.randn(s, generator=gen).to(dev, dt).requires_grad_(grad) for s in (q.shape, k.shape, k.shape))

    def call(fn):
        def run():
            with torch.enable_grad() if grad else torch.no_grad():
                out = fn(q_, k_, v_)
                if grad:
                    out.backward(torch.ones_like(out))
                    q_.grad = k_.grad = v_.grad = None

        return run

    what = f"attention/{dev.type} {str(dt).removeprefix('torch.')} {_shape_class(q, k, grad)}"
    return fastest(what, dev, {n: call(fn) for n, fn in impls.items()})


class _Dispatch:
    """attention(q, k, v) on the backend resolved for q's device and dtype and the call's shape class (once each)."""

    def __init__(self, requested: str):
        self.requested = check_backend(requested)
        self._impl: dict[tuple, Callable] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        key = (q.device.type, q.dtype, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], grad)
        impl = self._impl.get(key)
        if impl is None:
            if self.requested == "auto":
                impl = _IMPLS[select_backend("auto", q.device, q.dtype, q, k, grad)]
            else:
                impl = _IMPLS[select_backend(self.requested, q.device, q.dtype)]
            self._impl[key] = impl
        return impl(q, k, v)


_DISPATCH: dict[str, _Dispatch] = {}


def get_attention(requested: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attention function for a config's backend (`auto` or forced), shared by every block that asks."""
    if requested not in _DISPATCH:
        _DISPATCH[requested] = _Dispatch(requested)
    return _DISPATCH[requested]
