"""Fused alignment loss: [LayerNorm] -> projection `W h + b` -> [normalize] -> distance to a [normalized]
teacher target, reduced to the mean, with its backward (METHOD.md sections 4-5; STYLE habits 1, 3, 4).

Shape legend: B batch, V tokens per sample, N = B*V rows, R rows of one chunk, Ds student width,
Dt teacher width.

Per token row: `hn = LN(h)` (optional, affine), `z = hn W^T + b`, `p = z / |z|` (optional, DMAE),
`q = LN(t)` without affine or `t / |t|` (optional), loss = mean over N*Dt of dist(p - q) with dist one of
mse, l1, smooth_l1 (beta 1). The target is a constant (the frozen teacher's features): it gets no gradient.

Two ways to run it:
- **loss only** (DMAE; AMD's direct alignment when no generator reads the projection): the tokens are cut
  into chunks of R rows and `z` exists only for one chunk at a time, so the [N, Dt] projection is never
  materialized. As Liger-Kernel's fused linear cross-entropy does, the gradients are computed during the
  forward when they will be needed (3 GEMMs in all, like eager; the weight gradient accumulated in fp32) and
  only scaled in the backward. With `recompute=True` (or when the forward ran without grad) the forward
  keeps nothing and the backward recomputes each chunk's projection (4 GEMMs, no saved gradients).
- **with z** (AMD: the generator reads the projection): the op returns z [B, V, Dt] and fuses the rest; the
  backward adds the loss's gradient into the generator's, row by row, then runs the two weight/input GEMMs.

Implementations, all against `alignment_loss_reference` in tests/test_kernels.py: the row part
(normalizations, distance, its gradient, written in place over the chunk's z) is `_alignment_rows_kernel`
(Triton), `_rows_torch` (the chunked PyTorch twin; `compiled`: the same through torch.compile) or the C++
twin (csrc/amd_fast_kernels.cpp, which also runs the loss-only chunk loop and the whole with-z op, its GEMMs
split between threads). The GEMMs are the BLAS's (cuBLAS / MKL) on every path, as in Liger's FLCE: a Triton
GEMM would not beat cuBLAS at these sizes, and the row part is where the fusion saves memory traffic.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from amd_fast.kernels import backend as _backend
from amd_fast.kernels.triton_utils import LazyKernel, cdiv, next_pow2

tl = triton = None  # set by LazyKernel when a Triton kernel is first launched

DISTANCES = {"mse": 0, "l1": 1, "smooth_l1": 2}
TARGET_NORMS = {"none": 0, "layernorm": 1, "l2": 2}
L2_EPS = 1e-12  # F.normalize's default eps
DEFAULT_CHUNK = 160  # rows per chunk at least: [160, 768] fp32 is 480 KiB; the paper batch (320 rows) runs in 2 chunks
MAX_CHUNKS = 8  # ... and at most 8 chunks: the loop's cost stays small, z stays <= 1/8 of [N, Dt]
# The native twin splits each GEMM's rows between threads that run their own single-threaded GEMMs
# (csrc/amd_fast_kernels.cpp: alignment_loss_pass per chunk, mm_rows on the with-z path): 0 lets it choose (every
# thread of ATen's pool when each gets >= 64 rows, else one thread and a multi-threaded BLAS); tests force a count.
NATIVE_THREADS = 0


def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0)


# ---------------------------------------------------------------------------------------------
# Reference


def alignment_loss_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-6,
    pred_norm: str = "none",
    target_norm: str = "none",
    target_eps: float = 1e-6,
    distance: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The math as written, in plain PyTorch -> (loss, z [..., Dt])."""
    if ln_weight is not None:
        h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, ln_eps)
    z = F.linear(h, weight, bias)
    p = F.normalize(z, dim=-1) if pred_norm == "l2" else z
    t = target.detach()
    if target_norm == "layernorm":
        t = F.layer_norm(t, (t.shape[-1],), eps=target_eps)
    elif target_norm == "l2":
        t = F.normalize(t, dim=-1)
    if distance == "mse":
        loss = F.mse_loss(p, t)
    elif distance == "l1":
        loss = F.l1_loss(p, t)
    elif distance == "smooth_l1":
        loss = F.smooth_l1_loss(p, t)
    else:
        raise ValueError(f"distance {distance!r} is unknown; allowed: {', '.join(DISTANCES)}")
    return loss, z


# ---------------------------------------------------------------------------------------------
# The row part: normalizations, distance and its gradient. Each returns the summed loss of its rows and,
# when `grad` is given, writes scale * dloss/dz into it (added to it when accumulate).


def _rows_torch(z_RD, t_RD, grad_RD, scale, accumulate, pred_l2, target_norm, dist, target_eps):
    acc = torch.float64 if torch.float64 in (z_RD.dtype, t_RD.dtype) else torch.float32
    z, t = z_RD.to(acc), t_RD.to(acc)
    if target_norm == 1:
        t = F.layer_norm(t, (t.shape[-1],), eps=target_eps)
    elif target_norm == 2:
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(L2_EPS)
    if pred_l2:
        nrm = z.norm(dim=-1, keepdim=True)
        p = z / nrm.clamp_min(L2_EPS)
    else:
        p = z
    d = p - t
    if dist == 0:
        loss = d.square().sum()
    elif dist == 1:
        loss = d.abs().sum()
    else:
        ad = d.abs()
        loss = torch.where(ad < 1, 0.5 * d * d, ad - 0.5).sum()
    if grad_RD is not None:
        if dist == 0:
            g = d.mul_(2)
        elif dist == 1:
            g = d.sign_()
        else:
            g = torch.where(ad < 1, d, d.sign())
        if pred_l2:
            g = torch.where(nrm > L2_EPS, (g - p * (g * p).sum(-1, keepdim=True)) / nrm, g / L2_EPS)
        g = g * scale
        if accumulate:
            grad_RD.add_(g)
        else:
            grad_RD.copy_(g)
    return loss


def _alignment_rows_kernel(
    z_ptr,
    t_ptr,
    g_ptr,
    loss_ptr,
    scale_ptr,
    D,
    stride_z,
    stride_t,
    stride_g,
    target_eps,
    TUNE_KEY,
    PRED_L2: tl.constexpr,
    TARGET_NORM: tl.constexpr,
    DIST: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per row: the whole row in registers (BLOCK_D >= D), statistics in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    z = tl.load(z_ptr + row * stride_z + offs, mask=m, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + offs, mask=m, other=0.0).to(tl.float32)
    if TARGET_NORM == 1:
        tc = tl.where(m, t - tl.sum(t, 0) / D, 0.0)
        q = tc / tl.sqrt(tl.sum(tc * tc, 0) / D + target_eps)
    elif TARGET_NORM == 2:
        q = t / tl.maximum(tl.sqrt(tl.sum(t * t, 0)), 1e-12)
    else:
        q = t
    if PRED_L2:
        nrm = tl.sqrt(tl.sum(z * z, 0))
        p = z / tl.maximum(nrm, 1e-12)
    else:
        p = z
    d = tl.where(m, p - q, 0.0)
    ad = tl.abs(d)
    sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    if DIST == 0:
        elem = d * d
        gp = 2.0 * d
    elif DIST == 1:
        elem = ad
        gp = sgn
    else:
        elem = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
        gp = tl.where(ad < 1.0, d, sgn)
    tl.store(loss_ptr + row, tl.sum(elem, 0))
    if WRITE_GRAD:
        if PRED_L2:
            gz = tl.where(nrm > 1e-12, (gp - p * tl.sum(gp * p, 0)) / nrm, gp / 1e-12)
        else:
            gz = gp
        gz = gz * tl.load(scale_ptr)
        if ACCUMULATE:
            gz += tl.load(g_ptr + row * stride_g + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(g_ptr + row * stride_g + offs, gz.to(g_ptr.dtype.element_ty), mask=m)


def _rows_gpu_configs():
    import triton

    return [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


def _prune_warps(configs, block_d):
    """At least 4 elements of the row a thread (a 64-wide row takes 1 warp, a 1024-wide one up to 8)."""
    return [c for c in configs if c.num_warps * 32 * 4 <= block_d] or configs[:1]


# The row pass writes the gradient over g (which is z itself in the loss-only pass, or a gradient it adds to):
# the tuner restores g around each of its launches. Tuned per width, rows bucket and what the pass computes.
_rows_jit = LazyKernel(_alignment_rows_kernel, _rows_gpu_configs,
                       ("D", "TUNE_KEY", "PRED_L2", "TARGET_NORM", "DIST", "WRITE_GRAD", "ACCUMULATE"),
                       restore_value=["g_ptr"], prune=_prune_warps)  # fmt: skip


def _rows_triton(z_RD, t_RD, grad_RD, scale, accumulate, pred_l2, target_norm, dist, target_eps):
    R, D = z_RD.shape
    loss_R = torch.empty(R, dtype=torch.float32, device=z_RD.device)
    if not torch.is_tensor(scale):
        scale = torch.tensor(scale, dtype=torch.float32, device=z_RD.device)
    g = grad_RD if grad_RD is not None else z_RD
    if R:
        _rows_jit[(R,)](
            z_RD, t_RD, g, loss_R, scale.float().reshape(1), D, z_RD.stride(0), t_RD.stride(0), g.stride(0),
            target_eps, next_pow2(R), PRED_L2=pred_l2, TARGET_NORM=target_norm, DIST=dist,
            WRITE_GRAD=grad_RD is not None, ACCUMULATE=accumulate, BLOCK_D=next_pow2(D),
        )  # fmt: skip
    return loss_R.sum()


@functools.cache
def _rows_compiled_fn():
    return torch.compile(_rows_torch, dynamic=True)


def _rows_compiled(*args):
    """The chunked twin's row part through inductor (one fused C++ loop instead of ~8 elementwise passes)."""
    return _rows_compiled_fn()(*args)


# the row part of the Python launchers; the native backend runs whole ops in C++ (alignment_loss_pass, the z ops)
ROWS = {"chunked": _rows_torch, "compiled": _rows_compiled, "triton": _rows_triton}


# ---------------------------------------------------------------------------------------------
# Launchers


def _ln_rows(h_RD, w, b, eps):
    """LayerNorm of a chunk -> (hn in h's dtype, xhat and rstd in the accumulation dtype)."""
    acc = torch.promote_types(h_RD.dtype, torch.float32)
    x = h_RD.to(acc)
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    return (xhat * w.to(acc) + b.to(acc)).to(h_RD.dtype), xhat, rstd


def _ln_backward_rows(g_RD, xhat, rstd, w, dlnw, dlnb):
    g = g_RD.to(xhat.dtype)
    dlnw.add_((g * xhat).sum(0))
    dlnb.add_(g.sum(0))
    dx = g * w.to(xhat.dtype)
    return rstd * (dx - dx.mean(-1, keepdim=True) - xhat * (dx * xhat).mean(-1, keepdim=True))


def chunk_rows(n: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Rows per chunk: at least chunk_size, at most MAX_CHUNKS chunks, all of (nearly) equal size."""
    n_chunks = max(1, cdiv(n, max(chunk_size, cdiv(n, MAX_CHUNKS))))
    return max(1, cdiv(n, n_chunks))


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def _target_rows(t_BVT, s, e):
    """Rows [s, e) of the flattened target: a view when it is contiguous, else a chunk-sized copy."""
    B, V, D = t_BVT.shape
    if t_BVT.is_contiguous():
        return t_BVT.view(B * V, D)[s:e]
    parts = []
    while s < e:
        b, v = divmod(s, V)
        n = min(e - s, V - v)
        parts.append(t_BVT[b, v : v + n])
        s += n
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def alignment_loss_forward(
    h_BVS, weight, bias, target_BVT, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps,
    compute_grad, chunk, backend,
):  # fmt: skip
    """Loss-only pass over token chunks -> (loss, dh, dw, db, dlnw, dlnb); the grads are those of the loss
    (grad_output 1) when compute_grad, else empty. The target may be a row-strided view (t[:, :V])."""
    if backend == "native":
        return _backend.native_module().alignment_loss_pass(
            h_BVS, ln_weight, ln_bias, ln_eps, weight, bias, target_BVT, pred_l2, target_norm, dist, target_eps,
            compute_grad, chunk, NATIVE_THREADS,
        )  # fmt: skip
    rows = ROWS[backend]
    B, V, Ds = h_BVS.shape
    Dt = weight.shape[0]
    acc = torch.promote_types(torch.promote_types(h_BVS.dtype, target_BVT.dtype), torch.float32)
    scale = torch.tensor(1.0 / max(1, B * V * Dt), dtype=torch.float32, device=h_BVS.device)
    loss = torch.zeros((), dtype=acc, device=h_BVS.device)
    ln = ln_weight is not None
    dh = dw = db = dlnw = dlnb = None
    if compute_grad:
        dh = torch.empty_like(h_BVS)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # fp32 accumulation across chunks
        db = torch.zeros(Dt, dtype=acc, device=weight.device) if bias is not None else None
        if ln:
            dlnw = torch.zeros(Ds, dtype=acc, device=weight.device)
            dlnb = torch.zeros(Ds, dtype=acc, device=weight.device)
    w_t = weight.t()
    h_NS = h_BVS.view(B * V, Ds)
    dh_NS = dh.view(B * V, Ds) if compute_grad else None
    for s, e in _chunks(B * V, chunk):
        hc = h_NS[s:e]
        if ln:
            hc, xhat, rstd = _ln_rows(hc, ln_weight, ln_bias, ln_eps)
        z = torch.addmm(bias, hc, w_t) if bias is not None else hc @ w_t
        # the gradient w.r.t. z is written over z itself: the chunk's only [R, Dt] buffer
        loss += rows(z, _target_rows(target_BVT, s, e), z if compute_grad else None, scale, False, pred_l2,
                     target_norm, dist, target_eps)  # fmt: skip
        if compute_grad:
            if dw.dtype == z.dtype:
                dw.addmm_(z.t(), hc)
            else:
                dw.add_(z.t() @ hc)
            if db is not None:
                db.add_(z.sum(0, dtype=acc))
            if ln:
                dh_NS[s:e] = _ln_backward_rows(z @ weight, xhat, rstd, ln_weight, dlnw, dlnb)
            else:
                torch.mm(z, weight, out=dh_NS[s:e])
    loss = (loss / max(1, B * V * Dt)).to(_out_dtype(h_BVS, weight, target_BVT))
    e = _empty(h_BVS)
    return tuple(x if x is not None else e for x in (loss, dh, dw, db, dlnw, dlnb))


def alignment_loss_z_forward(
    h_BVS, weight, bias, target_BVT, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps, chunk,
    backend,
):  # fmt: skip
    """-> (loss, z [B, V, Dt]): the projection is materialized (a generator reads it). The native twin runs the
    whole op in one call (csrc: alignment_loss_z_fwd, its GEMM split between threads as the loss-only pass's)."""
    if backend == "native":
        return tuple(_backend.native_module().alignment_loss_z_fwd(
            h_BVS, ln_weight, ln_bias, ln_eps, weight, bias, target_BVT, pred_l2, target_norm, dist, target_eps,
            NATIVE_THREADS,
        ))  # fmt: skip
    hn = F.layer_norm(h_BVS, (h_BVS.shape[-1],), ln_weight, ln_bias, ln_eps) if ln_weight is not None else h_BVS
    z = F.linear(hn, weight, bias)
    B, V, Dt = z.shape
    rows, z_NT = ROWS[backend], z.view(B * V, Dt)
    loss = sum(rows(z_NT[s:e], _target_rows(target_BVT, s, e), None, 0.0, False, pred_l2, target_norm, dist,
                    target_eps) for s, e in _chunks(B * V, chunk))  # fmt: skip
    return (loss / max(1, B * V * Dt)).to(_out_dtype(h_BVS, weight, target_BVT)), z


def alignment_loss_z_backward(
    grad_loss, grad_z, z_BVT, h_BVS, weight, bias, target_BVT, ln_weight, ln_bias, ln_eps, pred_l2, target_norm,
    dist, target_eps, chunk, backend,
):  # fmt: skip
    """grad_z (from the generator) + grad_loss * dloss/dz, then the input and weight GEMMs
    -> (dh, dw, db, dlnw, dlnb)."""
    if backend == "native":  # one call (csrc: alignment_loss_z_bwd)
        return tuple(_backend.native_module().alignment_loss_z_bwd(
            float(grad_loss), grad_z, z_BVT, h_BVS, ln_weight, ln_bias, ln_eps, weight, bias is not None, target_BVT,
            pred_l2, target_norm, dist, target_eps, NATIVE_THREADS,
        ))  # fmt: skip
    B, V, Dt = z_BVT.shape
    g = grad_z.clone() if grad_z is not None else torch.zeros_like(z_BVT)
    scale = (grad_loss.float() / max(1, B * V * Dt)).reshape(())
    rows, z_NT, g_NT = ROWS[backend], z_BVT.view(B * V, Dt), g.view(B * V, Dt)
    for s, e in _chunks(B * V, chunk):
        rows(z_NT[s:e], _target_rows(target_BVT, s, e), g_NT[s:e], scale, True, pred_l2, target_norm, dist,
             target_eps)  # fmt: skip
    h_NS = h_BVS.reshape(B * V, -1)
    dlnw = dlnb = None
    if ln_weight is not None:
        hn, xhat, rstd = _ln_rows(h_NS, ln_weight, ln_bias, ln_eps)
        acc = xhat.dtype
        dlnw = torch.zeros_like(ln_weight, dtype=acc)
        dlnb = torch.zeros_like(ln_weight, dtype=acc)
        dh = _ln_backward_rows(g_NT @ weight, xhat, rstd, ln_weight, dlnw, dlnb).to(h_BVS.dtype)
    else:
        hn = h_NS
        dh = g_NT @ weight
    dw = g_NT.t() @ hn
    db = g_NT.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)) if bias is not None else None
    e = _empty(h_BVS)
    return tuple(x if x is not None else e for x in (dh.view_as(h_BVS), dw, db, dlnw, dlnb))


def _out_dtype(h, w, t):
    return torch.promote_types(torch.promote_types(h.dtype, w.dtype), t.dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees one opaque node per launcher (no graph break at the Triton / C++ call)


@torch.library.custom_op("amd_fast::alignment_loss", mutates_args=())
def _alignment_loss_op(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, ln_eps: float, pred_l2: bool, target_norm: int,
    dist: int, target_eps: float, compute_grad: bool, chunk: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    out = alignment_loss_forward(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist,
                                 target_eps, compute_grad, chunk, backend)  # fmt: skip
    # a custom op's outputs may not alias each other: the empty placeholders must be distinct tensors
    return tuple(x if x.numel() or i == 0 else x.new_empty(0) for i, x in enumerate(out))


@_alignment_loss_op.register_fake
def _(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps, compute_grad,
      chunk, backend):  # fmt: skip
    acc = torch.promote_types(torch.promote_types(h.dtype, target.dtype), torch.float32)
    loss = h.new_empty((), dtype=_out_dtype(h, weight, target))
    e = h.new_empty(0)
    if not compute_grad:
        return loss, e, e.clone(), e.clone(), e.clone(), e.clone()
    db = weight.new_empty(weight.shape[0], dtype=acc) if bias is not None else e.clone()
    ln = ln_weight is not None
    dlnw = h.new_empty(h.shape[-1], dtype=acc) if ln else e.clone()
    dlnb = h.new_empty(h.shape[-1], dtype=acc) if ln else e.clone()
    return loss, torch.empty_like(h), weight.new_empty(weight.shape, dtype=acc), db, dlnw, dlnb


@torch.library.custom_op("amd_fast::alignment_loss_z", mutates_args=())
def _alignment_loss_z_op(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, ln_eps: float, pred_l2: bool, target_norm: int,
    dist: int, target_eps: float, chunk: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return alignment_loss_z_forward(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm,
                                    dist, target_eps, chunk, backend)  # fmt: skip


@_alignment_loss_z_op.register_fake
def _(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend):
    z = h.new_empty((*h.shape[:-1], weight.shape[0]), dtype=torch.promote_types(h.dtype, weight.dtype))
    return h.new_empty((), dtype=_out_dtype(h, weight, target)), z


@torch.library.custom_op("amd_fast::alignment_loss_z_backward", mutates_args=())
def _alignment_loss_z_backward_op(
    grad_loss: torch.Tensor, grad_z: torch.Tensor | None, z: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, target: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    ln_eps: float, pred_l2: bool, target_norm: int, dist: int, target_eps: float, chunk: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    out = alignment_loss_z_backward(grad_loss, grad_z, z, h, weight, bias, target, ln_weight, ln_bias, ln_eps,
                                    pred_l2, target_norm, dist, target_eps, chunk, backend)  # fmt: skip
    return tuple(x if x.numel() else x.new_empty(0) for x in out)


@_alignment_loss_z_backward_op.register_fake
def _(grad_loss, grad_z, z, h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist,
      target_eps, chunk, backend):  # fmt: skip
    acc = torch.promote_types(z.dtype, torch.float32)
    e = h.new_empty(0)
    db = weight.new_empty(weight.shape[0], dtype=acc) if bias is not None else e.clone()
    ln = ln_weight is not None
    dlnw = h.new_empty(h.shape[-1], dtype=acc) if ln else e.clone()
    dlnb = h.new_empty(h.shape[-1], dtype=acc) if ln else e.clone()
    return torch.empty_like(h), torch.empty_like(weight), db, dlnw, dlnb


# ---------------------------------------------------------------------------------------------
# Autograd


def _eager_or_op(op, impl):
    """The custom op under torch.compile (one opaque node); its implementation called directly otherwise, which
    saves the dispatcher's Python round trip (~80 us a call measured on the CPU box: ~2-3% of the loss at the
    paper's batch). Same function, same results."""
    return op if torch.compiler.is_compiling() else impl


def _unit(g: torch.Tensor) -> bool:
    """grad_output == 1 (a loss backpropagated as it is): the precomputed gradients need no scaling. Checked only
    on the CPU, where reading the value costs nothing; on a GPU that would be a sync, so they are scaled."""
    return g.device.type == "cpu" and not torch.compiler.is_compiling() and g.numel() == 1 and float(g) == 1.0


def _grad_for(g, param):
    if param is None or g.numel() == 0:
        return None
    return g.to(param.dtype)


class AlignmentLossFunction(torch.autograd.Function):
    """Loss only. With precomputed gradients the backward just scales them (in place, the first time)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ln_weight, ln_bias, cfg, compute_grad):
        ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend = cfg
        loss, dh, dw, db, dlnw, dlnb = _eager_or_op(_alignment_loss_op, alignment_loss_forward)(
            h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps,
            compute_grad, chunk, backend,
        )  # fmt: skip
        ctx.cfg, ctx.precomputed, ctx.has_bias, ctx.has_ln = cfg, compute_grad, bias is not None, ln_weight is not None
        ctx.scaled = False
        if compute_grad:
            ctx.save_for_backward(dh, dw, db, dlnw, dlnb, weight, bias, ln_weight)
        else:
            ctx.save_for_backward(h, weight, bias, target, ln_weight, ln_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.precomputed and not ctx.scaled:
            dh, dw, db, dlnw, dlnb, weight, bias, ln_weight = ctx.saved_tensors
            # Scaled in place: these buffers exist only for this backward, so no second [N, Ds] / weight-sized
            # copy is made. A second backward through a retained graph recomputes instead (below).
            ctx.scaled = True
            if _unit(grad_loss):
                grads = [dh, dw, db, dlnw, dlnb]
            else:
                g = grad_loss.to(dh.dtype)
                grads = [dh.mul_(g)] + [x.mul_(grad_loss.to(x.dtype)) if x.numel() else x for x in (dw, db, dlnw, dlnb)]
        else:
            if ctx.precomputed:
                raise RuntimeError("alignment loss: a second backward needs recompute=True")
            h, weight, bias, target, ln_weight, ln_bias = ctx.saved_tensors
            ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend = ctx.cfg
            _, dh, dw, db, dlnw, dlnb = _alignment_loss_op(
                h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps, True,
                chunk, backend,
            )  # fmt: skip
            g = grad_loss.to(dh.dtype)
            grads = [dh.mul_(g)] + [x.mul_(grad_loss.to(x.dtype)) if x.numel() else x for x in (dw, db, dlnw, dlnb)]
        dh, dw, db, dlnw, dlnb = grads
        return dh, dw.to(weight.dtype), _grad_for(db, bias), None, _grad_for(dlnw, ln_weight), \
            _grad_for(dlnb, ln_weight), None, None  # fmt: skip


class AlignmentLossZFunction(torch.autograd.Function):
    """Loss and the projection z (for AMD's generator); the backward adds both gradients w.r.t. z."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, ln_weight, ln_bias, cfg):
        ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend = cfg
        loss, z = _eager_or_op(_alignment_loss_z_op, alignment_loss_z_forward)(
            h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend
        )
        ctx.cfg = cfg
        ctx.save_for_backward(z, h, weight, bias, target, ln_weight, ln_bias)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        z, h, weight, bias, target, ln_weight, ln_bias = ctx.saved_tensors
        ln_eps, pred_l2, target_norm, dist, target_eps, chunk, backend = ctx.cfg
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=z.device)
        dh, dw, db, dlnw, dlnb = _eager_or_op(_alignment_loss_z_backward_op, alignment_loss_z_backward)(
            grad_loss, grad_z, z, h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_l2, target_norm, dist,
            target_eps, chunk, backend,
        )  # fmt: skip
        return dh, dw.to(weight.dtype), _grad_for(db, bias), None, _grad_for(dlnw, ln_weight), \
            _grad_for(dlnb, ln_weight), None  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Functional wrapper


def fused_alignment_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-6,
    pred_norm: str = "none",
    target_norm: str = "none",
    target_eps: float = 1e-6,
    distance: str = "mse",
    return_z: bool = False,
    recompute: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str | None = None,
):
    """`alignment_loss_reference` fused: h [..., Ds], weight [Dt, Ds], target [..., Dt] (may be a row-strided
    view) -> loss, or (loss, z) with return_z. backend None: `backend.resolve` (the selected one; auto: the
    fastest at this call's shape class, measured once)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance {distance!r} is unknown; allowed: {', '.join(DISTANCES)}")
    if target_norm not in TARGET_NORMS or pred_norm not in ("none", "l2"):
        raise ValueError(f"pred_norm {pred_norm!r} / target_norm {target_norm!r}: allowed none/l2, none/layernorm/l2")
    opts = (ln_eps, pred_norm, target_norm, target_eps, distance, return_z, recompute, chunk_size)
    dev = h.device
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else h.dtype  # what the op sees
    if backend is None and _backend.selected() != "auto":  # forced (objective.kernels): nothing to measure
        backend = _backend.resolve("alignment_loss", dev, dtype)
    if backend is None:  # auto: the fastest at this call's shape class
        grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (h, weight, bias, ln_weight, ln_bias)
        )
        shape = (f"r{next_pow2(h.numel() // h.shape[-1])}", f"s{h.shape[-1]}", f"t{weight.shape[0]}", distance,
                 f"{pred_norm}/{target_norm}", "ln" if ln_weight is not None else "", "z" if return_z else "",
                 "fwd+bwd" if grad else "fwd")  # fmt: skip

        def trials(names):
            xs = _backend.trial_inputs(h, weight, bias, target, ln_weight, ln_bias)
            return {n: lambda n=n: _backend.finish_trial(_call(n, *xs, *opts), grad) for n in names}

        backend = _backend.resolve("alignment_loss", dev, dtype, shape, trials)
    return _call(backend, h, weight, bias, target, ln_weight, ln_bias, *opts)


def _call(name, h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_norm, target_norm, target_eps, distance,
          return_z, recompute, chunk_size):  # fmt: skip
    """The loss on backend `name` (`reference`: plain PyTorch, which autocast sees op by op)."""
    if name == "reference":
        loss, z = alignment_loss_reference(h, weight, bias, target, ln_weight=ln_weight, ln_bias=ln_bias,
                                           ln_eps=ln_eps, pred_norm=pred_norm, target_norm=target_norm,
                                           target_eps=target_eps, distance=distance)  # fmt: skip
        return (loss, z) if return_z else loss
    dev = h.device.type
    # The op is opaque to autocast: its GEMM operands are cast as F.linear's would be, and the loss comes out in
    # fp32 as autocast's mse / l1 / smooth-l1 losses do (a low-precision target is read as fp32; the LayerNorm
    # parameters stay as they are). It then runs with autocast off, forward and backward alike.
    if ln_weight is not None and torch.is_autocast_enabled(dev):
        # autocast runs the LayerNorm in its input's precision and casts its output for the GEMM: done so here
        # (the op then projects the normalized rows), rather than rounding h before the normalization
        h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, ln_eps)
        ln_weight = ln_bias = None
    ac, (h, weight, bias) = _backend.autocast_inputs(dev, h, weight, bias)
    if ac is not None and target.dtype in (torch.float16, torch.bfloat16):
        target = target.float()
    with _backend.no_autocast(dev):
        return _fused(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_norm, target_norm, target_eps,
                      distance, return_z, recompute, chunk_size, name)  # fmt: skip


def _fused(h, weight, bias, target, ln_weight, ln_bias, ln_eps, pred_norm, target_norm, target_eps, distance,
           return_z, recompute, chunk_size, name):  # fmt: skip
    low = None
    if name == "native" and h.dtype not in (torch.float32, torch.float64):
        # The C++ twin is written for fp32 / fp64: bf16 / fp16 operands are cast to fp32 at its boundary and it
        # computes in fp32 inside (the loss comes back in fp32, z in the operands' dtype, gradients in theirs).
        low = h.dtype
        h, weight = h.float(), weight.float()
        bias = bias.float() if bias is not None else None
    if name == "native" and target.dtype not in (torch.float32, torch.float64):
        target = target.float()
    lead = h.shape[:-1]
    h3 = h.reshape(1, -1, h.shape[-1]) if h.dim() != 3 else h
    t3 = target.detach()
    t3 = t3.reshape(1, -1, t3.shape[-1]) if t3.dim() != 3 else t3
    if h3.stride(-1) != 1 or not h3.is_contiguous():
        h3 = h3.contiguous()
    if t3.stride(-1) != 1:
        t3 = t3.contiguous()
    chunk = chunk_rows(h3.shape[0] * h3.shape[1], chunk_size)
    cfg = (float(ln_eps), pred_norm == "l2", TARGET_NORMS[target_norm], DISTANCES[distance], float(target_eps),
           chunk, name)  # fmt: skip
    if return_z:
        loss, z = AlignmentLossZFunction.apply(h3, weight, bias, t3, ln_weight, ln_bias, cfg)
        z = z.view(*lead, weight.shape[0])
        return loss, (z if low is None else z.to(low))
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, weight, bias, ln_weight, ln_bias)
    )
    return AlignmentLossFunction.apply(h3, weight, bias, t3, ln_weight, ln_bias, cfg, needs_grad and not recompute)
