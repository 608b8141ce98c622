"""Token gather by index with the position-embedding add fused in, and its backward (a scatter-add).

Shape legend: B batch, N tokens per sample, V gathered tokens per sample, D width (any), S source rows.

One launcher covers the gathers the models do (METHOD.md section 2: masks are index tensors):
- `gather_tokens(x [B, N, D], ids [B, V], pos [N, D] | None)` -> `x[b, ids[b, j]] (+ pos[ids[b, j]])`: encoder
  inputs (V_s, [V_s ; Delta]), decoded positions, reconstruction targets;
- `gather_rows(table [N, D], ids [B, V], base [B, V, D] | None)` -> `(base +) table[ids[b, j]]`: position
  tables shared by the batch, added to a projected token (`encoder_to_decoder(x) + E[V_s]`, `z + E_t[V_s]`,
  `mask_token + E[Delta]`) in one pass instead of an index_select and an add.

Both are `src[b * rps + ids[b, j]]` with rps (source rows per sample) N or 0. Indices are int32 or int64;
dtypes bf16 / fp16 / fp32 / fp64. Backward: grad_src is a scatter-add (ids may repeat), grad_pos a scatter-add
into the table, grad_base the incoming gradient itself.
"""

from __future__ import annotations

import torch
from amd_fast.kernels import backend as _backend
from amd_fast.kernels.triton_utils import LazyKernel, cdiv, next_pow2

tl = triton = None  # set by LazyKernel when a Triton kernel is first launched

# ---------------------------------------------------------------------------------------------
# Reference


def gather_reference(src_SD, ids_BV, rps: int, pos_ND=None, base_BVD=None):
    """`torch.gather` with an expanded index (the [B, V, D] index view costs no memory; no `.repeat`)."""
    B, V = ids_BV.shape
    D = src_SD.shape[-1]
    ids = ids_BV.long()
    if rps:
        out = torch.gather(src_SD.view(B, rps, D), 1, ids.unsqueeze(-1).expand(B, V, D))
    else:
        out = src_SD[ids]
    if pos_ND is not None:
        out = out + pos_ND[ids].to(out.dtype)
    if base_BVD is not None:
        out = base_BVD.to(out.dtype) + out
    return out


# ---------------------------------------------------------------------------------------------
# Twins


def _gather_torch(src_SD, ids_BV, rps, pos_ND, base_BVD):
    """One index_select on the flattened rows (faster than torch.gather on CPU), then the adds in place."""
    B, V = ids_BV.shape
    flat = ids_BV
    if rps:
        flat = ids_BV + torch.arange(B, device=ids_BV.device, dtype=ids_BV.dtype).mul_(rps).unsqueeze(1)
    out = src_SD.index_select(0, flat.reshape(-1)).view(B, V, src_SD.shape[-1])
    if pos_ND is not None:
        out += pos_ND.index_select(0, ids_BV.reshape(-1)).view_as(out)
    if base_BVD is not None:
        out += base_BVD
    return out


def _scatter_torch(g_BVD, ids_BV, rps, S):
    B, V = ids_BV.shape
    flat = ids_BV
    if rps:
        flat = ids_BV + torch.arange(B, device=ids_BV.device, dtype=ids_BV.dtype).mul_(rps).unsqueeze(1)
    out = g_BVD.new_zeros(S, g_BVD.shape[-1])
    return out.index_add_(0, flat.reshape(-1), g_BVD.reshape(-1, g_BVD.shape[-1]))


def _gather_kernel(
    src_ptr, ids_ptr, pos_ptr, base_ptr, out_ptr, R, V, D, rps, TUNE_KEY,
    HAS_POS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_R, BLOCK_D] tile of output rows: out[r] = src[(r // V) * rps + ids[r]] (+ pos[ids[r]]) (+ base[r])."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < R
    m = rm[:, None] & (cols < D)[None, :]
    ids = tl.load(ids_ptr + rows, mask=rm, other=0).to(tl.int64)
    src_rows = (rows // V).to(tl.int64) * rps + ids
    x = tl.load(src_ptr + src_rows[:, None] * D + cols[None, :], mask=m, other=0.0)
    if HAS_POS or HAS_BASE:  # adds in fp32, rounded once (bf16 arithmetic is also wrong under the interpreter)
        x = x.to(tl.float32)
    if HAS_POS:
        x = x + tl.load(pos_ptr + ids[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = tl.load(base_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32) + x
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=m)


def _scatter_add_kernel(
    g_ptr, ids_ptr, out_ptr, R, V, D, rps, TUNE_KEY, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[(r // V) * rps + ids[r]] += g[r]; atomics, since ids may repeat (and a shared table always does)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < R
    m = rm[:, None] & (cols < D)[None, :]
    ids = tl.load(ids_ptr + rows, mask=rm, other=0).to(tl.int64)
    dst_rows = (rows // V).to(tl.int64) * rps + ids
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + dst_rows[:, None] * D + cols[None, :], g, mask=m)


def _tile_gpu_configs():
    import triton

    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (1, 2, 4, 8, 16, 32, 64) for w in (4, 8)]


def _prune_tiles(configs, block_d):
    """Tiles of 2K or 8K elements (8-32 KiB of fp32 a program), 4 or 8 warps: 4 configs a shape, so the first
    step's tuning (a compile and a 25 ms benchmark each) stays short. Rows so narrow that 64 of them make a
    smaller tile take the 64-row configs."""
    keep = [c for c in configs if c.kwargs["BLOCK_R"] * block_d in (2048, 8192)]
    return keep or [c for c in configs if c.kwargs["BLOCK_R"] == 64]


# TUNE_KEY (rows bucketed), D and what the launch fuses key the tuning; the scatter accumulates into `out`
# (atomics into a zeroed buffer), so the tuner zeroes it around each of its launches. The interpreter runs
# untuned with 16 rows a program (it wants few, large programs).
_KEY = ("D", "TUNE_KEY")
_gather_jit = LazyKernel(_gather_kernel, _tile_gpu_configs, (*_KEY, "HAS_POS", "HAS_BASE"), prune=_prune_tiles,
                         cpu_meta={"BLOCK_R": 16})  # fmt: skip
_scatter_jit = LazyKernel(_scatter_add_kernel, _tile_gpu_configs, _KEY, reset_to_zero=["out_ptr"],
                          prune=_prune_tiles, cpu_meta={"BLOCK_R": 16})  # fmt: skip


def _grid(R, D, block_d):
    return lambda meta: (cdiv(R, meta["BLOCK_R"]), cdiv(D, block_d))


def _gather_triton(src_SD, ids_BV, rps, pos_ND, base_BVD):
    B, V = ids_BV.shape
    D = src_SD.shape[-1]
    out = torch.empty(B, V, D, dtype=src_SD.dtype, device=src_SD.device)
    if out.numel():
        block_d = min(next_pow2(D), 1024)  # whole rows up to 1024 wide
        pos = pos_ND.to(src_SD.dtype).contiguous() if pos_ND is not None else src_SD
        base = base_BVD.to(src_SD.dtype).contiguous() if base_BVD is not None else src_SD
        _gather_jit[_grid(B * V, D, block_d)](
            src_SD.contiguous(), ids_BV.contiguous(), pos, base, out, B * V, V, D, rps, next_pow2(B * V),
            HAS_POS=pos_ND is not None, HAS_BASE=base_BVD is not None, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def _scatter_triton(g_BVD, ids_BV, rps, S):
    B, V = ids_BV.shape
    D = g_BVD.shape[-1]
    out = torch.zeros(S, D, dtype=torch.float32, device=g_BVD.device)  # fp32 atomics for every input dtype
    if g_BVD.numel():
        block_d = min(next_pow2(D), 1024)
        _scatter_jit[_grid(B * V, D, block_d)](g_BVD.contiguous(), ids_BV.contiguous(), out, B * V, V, D, rps,
                                               next_pow2(B * V), BLOCK_D=block_d)  # fmt: skip
    return out.to(g_BVD.dtype)


def _gather_native(src_SD, ids_BV, rps, pos_ND, base_BVD):
    return _backend.native_module().gather_rows(src_SD, ids_BV, rps, pos_ND, base_BVD)


def _scatter_native(g_BVD, ids_BV, rps, S):
    return _backend.native_module().scatter_add_rows(g_BVD, ids_BV, rps, S)


# `compiled` is the chunked twin as it is: a gather is one index_select, nothing for inductor to fuse
GATHER = {"chunked": _gather_torch, "compiled": _gather_torch, "triton": _gather_triton, "native": _gather_native}
SCATTER = {"chunked": _scatter_torch, "compiled": _scatter_torch, "triton": _scatter_triton, "native": _scatter_native}


# ---------------------------------------------------------------------------------------------
# Launchers and custom ops


def gather_forward(src_SD, ids_BV, rps, pos_ND, base_BVD, backend):
    return GATHER[backend](src_SD, ids_BV, rps, pos_ND, base_BVD)


def gather_backward(g_BVD, ids_BV, rps, S, backend):
    """-> grad of the source rows [S, D]."""
    return SCATTER[backend](g_BVD, ids_BV, rps, S)


@torch.library.custom_op("amd_fast::gather", mutates_args=())
def _gather_op(
    src: torch.Tensor, ids: torch.Tensor, rps: int, pos: torch.Tensor | None, base: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return gather_forward(src, ids, rps, pos, base, backend)


@_gather_op.register_fake
def _(src, ids, rps, pos, base, backend):
    return src.new_empty(*ids.shape, src.shape[-1])


@torch.library.custom_op("amd_fast::scatter_add", mutates_args=())
def _scatter_add_op(g: torch.Tensor, ids: torch.Tensor, rps: int, S: int, backend: str) -> torch.Tensor:
    return gather_backward(g, ids, rps, S, backend)


@_scatter_add_op.register_fake
def _(g, ids, rps, S, backend):
    return g.new_empty(S, g.shape[-1])


class GatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_SD, ids_BV, rps, pos_ND, base_BVD, backend):
        ctx.save_for_backward(ids_BV)
        ctx.rps, ctx.S, ctx.backend = rps, src_SD.shape[0], backend
        # The output has src's dtype; pos and base may have others (an fp32 position table added to bf16 tokens
        # under autocast): each gradient is returned in its own input's dtype.
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (src_SD, pos_ND, base_BVD))
        ctx.pos_shape = None if pos_ND is None else pos_ND.shape
        return _gather_op(src_SD, ids_BV, rps, pos_ND, base_BVD, backend)

    @staticmethod
    def backward(ctx, g_BVD):
        (ids,) = ctx.saved_tensors
        need_src, _, _, need_pos, need_base, _ = ctx.needs_input_grad
        src_dt, pos_dt, base_dt = ctx.dtypes
        g_BVD = g_BVD.contiguous()
        d_src = _scatter_add_op(g_BVD, ids, ctx.rps, ctx.S, ctx.backend).to(src_dt) if need_src else None
        d_pos = None
        if need_pos:  # scattered in the wider of the two dtypes, so an fp32 table gets fp32 sums
            g = g_BVD.to(torch.promote_types(g_BVD.dtype, pos_dt))
            d_pos = _scatter_add_op(g, ids, 0, ctx.pos_shape[0], ctx.backend).to(pos_dt)
        return d_src, None, None, d_pos, g_BVD.to(base_dt) if need_base else None, None


# ---------------------------------------------------------------------------------------------
# Functional wrappers (what amd_fast.ops calls)


def _call(name, src_SD, ids_BV, rps, pos_ND, base_BVD):
    """The gather on backend `name` (`reference`: plain PyTorch)."""
    if name == "reference":
        return gather_reference(src_SD, ids_BV, rps, pos_ND, base_BVD)
    if base_BVD is not None and base_BVD.shape != (*ids_BV.shape, src_SD.shape[-1]):
        base_BVD = base_BVD.expand(*ids_BV.shape, src_SD.shape[-1])  # a broadcast mask token
        return GatherFunction.apply(src_SD, ids_BV, rps, pos_ND, None, name) + base_BVD
    return GatherFunction.apply(src_SD, ids_BV, rps, pos_ND, base_BVD, name)


def _dispatch(src_SD, ids_BV, rps, pos_ND, base_BVD, backend):
    if backend is None and _backend.selected() != "auto":  # forced (objective.kernels): nothing to measure
        backend = _backend.resolve("gather", src_SD.device, src_SD.dtype)
    if backend is None:  # auto: the fastest at this call's shape class
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (src_SD, pos_ND, base_BVD))
        shape = (
            "tokens" if rps else "rows",
            f"r{next_pow2(ids_BV.numel())}",
            f"d{src_SD.shape[-1]}",
            "+pos" * (pos_ND is not None) + "+base" * (base_BVD is not None),
            "fwd+bwd" if grad else "fwd",
        )

        def trials(names):
            s, p, b = _backend.trial_inputs(src_SD, pos_ND, base_BVD)
            return {n: lambda n=n: _backend.finish_trial(_call(n, s, ids_BV, rps, p, b), grad) for n in names}

        backend = _backend.resolve("gather", src_SD.device, src_SD.dtype, shape, trials)
    return _call(backend, src_SD, ids_BV, rps, pos_ND, base_BVD)


def gather_tokens(x_BND, ids_BV, pos_ND=None, *, backend: str | None = None):
    """`x[b, ids[b, j]] (+ pos[ids[b, j]])` -> [B, V, D]. backend None: `backend.resolve` (auto: measured)."""
    B, N, D = x_BND.shape
    return _dispatch(x_BND.reshape(B * N, D), ids_BV, N, pos_ND, None, backend)


def gather_rows(table_ND, ids_BV, base_BVD=None, *, backend: str | None = None):
    """`(base +) table[ids[b, j]]` for a table shared by the batch -> [B, V, D]."""
    return _dispatch(table_ND, ids_BV, 0, None, base_BVD, backend)
