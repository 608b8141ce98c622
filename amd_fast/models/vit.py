"""ViT encoder for video (tubelet embedding) and images (tubelet 1, one frame), VideoMAE naming.

Shape legend: B batch, N tokens (= t*h*w), V gathered (visible) tokens, D width, H heads,
hd head dim, K values per patch (= C*tubelet*p*p), C channels, T frames.

Parameter names follow timm / VideoMAE (`patch_embed.proj.weight` is a Conv3d kernel
[D, C, tubelet, p, p], `blocks.{i}.attn.qkv.weight`, `blocks.{i}.attn.q_bias`, `...v_bias`, `norm`),
so official checkpoints load without conversion (see `checkpoint_io.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from amd_fast.attention import check_backend, get_attention
from amd_fast.ops import autocast_inputs, gather_rows, gather_tokens, no_autocast

# name -> (embed_dim, depth, num_heads)
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}

LN_EPS = 1e-6  # VideoMAE / MAE use partial(nn.LayerNorm, eps=1e-6)


def resolve_arch(arch: str, embed_dim: int = 0, depth: int = 0, num_heads: int = 0) -> tuple[int, int, int]:
    """Arch preset with per-field overrides (0 keeps the preset value). `custom` needs all three."""
    if arch == "custom":
        if not (embed_dim and depth and num_heads):
            raise ValueError("arch=custom needs embed_dim, depth and num_heads")
        return embed_dim, depth, num_heads
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is unknown; allowed: {', '.join(ARCHS)}, custom")
    d, n, h = ARCHS[arch]
    embed_dim, depth = embed_dim or d, depth or n
    if not num_heads:
        num_heads = h if embed_dim == d else max(1, embed_dim // 64)  # head dim 64 for other widths
    return embed_dim, depth, num_heads


def sincos_table(n_position: int, dim: int) -> torch.Tensor:
    """VideoMAE's 1-D sine-cosine table [n_position, dim]: sin on even channels, cos on odd ones."""
    pos = torch.arange(n_position, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty(n_position, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def patchify(video_BCTHW: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, C*tubelet*p*p], tokens in (t, h, w) order, values in Conv3d kernel order."""
    B, C, T, H, W = video_BCTHW.shape
    p, u = patch_size, tubelet_size
    x = video_BCTHW.reshape(B, C, T // u, u, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # B t h w C u p p
    return x.reshape(B, (T // u) * (H // p) * (W // p), C * u * p * p)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's bias layout: q and v biases, no key bias."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.attn_fn = get_attention(attn_backend)

    def forward(self, x_BND: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        """keep_last: only the last `keep_last` rows are queried (the rows a caller reads afterwards)."""
        B, N, D = x_BND.shape
        H = self.num_heads
        if keep_last is None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
            if isinstance(self.qkv, nn.Linear):
                qkv = F.linear(x_BND, self.qkv.weight, bias)  # bias fused into the GEMM
            else:  # an int8 dynamically quantized teacher: the module runs its own kernel
                qkv = self.qkv(x_BND) + bias
            qkv = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
            Nq = N
        else:
            Nq = keep_last
            w = self.qkv.weight
            q = F.linear(x_BND[:, N - Nq :], w[:D], self.q_bias).view(B, Nq, H, D // H).transpose(1, 2)
            kv_bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
            kv = F.linear(x_BND, w[D:], kv_bias).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        o = self.attn_fn(q, k, v)  # [B, H, Nq, hd]
        return self.proj(o.transpose(1, 2).reshape(B, Nq, D))


class _MlpRecomputeGelu(torch.autograd.Function):
    """fc2(gelu(fc1(x))) that saves x and the pre-activation only, and recomputes gelu in backward.

    Autograd would also keep gelu's output for fc2's weight gradient: one [rows, 4D] tensor per block (~10 MB per
    generator or decoder block in the paper's video step, ~100 MB of the step's peak). Recomputing it costs one
    elementwise pass; the forward is the same ops, so the values are the same.

    Autocast cannot see into a Function, and autograd runs its backward outside autocast: `mlp_recompute_gelu`
    casts the operands as autocast would cast F.linear's and runs it with autocast off, so both passes see one
    dtype (bf16 / fp16 GEMMs under autocast, as nn.Linear's; the casts carry the fp32 weight gradients back).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, g_out):
        x, h, w1, w2 = ctx.saved_tensors
        a = F.gelu(h)
        g2 = g_out.reshape(-1, g_out.shape[-1])
        g_w2 = g2.t() @ a.reshape(-1, a.shape[-1])
        g_b2 = g2.sum(0)
        g_h = torch.ops.aten.gelu_backward(g_out @ w2, h)
        g_h2 = g_h.reshape(-1, g_h.shape[-1])
        g_w1 = g_h2.t() @ x.reshape(-1, x.shape[-1])
        g_b1 = g_h2.sum(0)
        return g_h @ w1, g_w1, g_b1, g_w2, g_b2


def mlp_recompute_gelu(x, w1, b1, w2, b2):
    """fc2(gelu(fc1(x))) through `_MlpRecomputeGelu`, under autocast too (operands cast at its boundary)."""
    dev = x.device.type
    _, args = autocast_inputs(dev, x, w1, b1, w2, b2)
    with no_autocast(dev):
        return _MlpRecomputeGelu.apply(*args)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if torch.is_grad_enabled() and type(fc1) is nn.Linear and type(fc2) is nn.Linear:
            return mlp_recompute_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return fc2(self.act(fc1(x)))  # inference (the teacher, possibly int8-quantized)


class Block(nn.Module):
    """Pre-norm transformer block (timm / VideoMAE names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, attn_backend="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x_BND: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        """With keep_last, returns only the last `keep_last` rows: same values, fewer FLOPs."""
        a = self.attn(self.norm1(x_BND), keep_last)
        x = x_BND if keep_last is None else x_BND[:, x_BND.shape[1] - keep_last :]
        x = x + drop_path(a, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    """Tubelet embedding. The weight is stored as the references' Conv3d kernel; since stride equals
    the kernel the Conv3d is a linear map of each flattened tubelet, so it runs as one GEMM over
    only the tokens that are needed (cheaper on CPU than convolving the whole clip)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, patches_BVK: torch.Tensor) -> torch.Tensor:
        return F.linear(patches_BVK, self.proj.weight.flatten(1), self.proj.bias)


class VisionTransformer(nn.Module):
    """A ViT encoder over a fixed token grid. Images: num_frames=1, tubelet_size=1."""

    def __init__(
        self,
        *,
        img_size: int,
        num_frames: int,
        patch_size: int,
        tubelet_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        cls_token: bool = False,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(
                f"input {num_frames}x{img_size}x{img_size} does not divide into "
                f"{tubelet_size}x{patch_size}x{patch_size}"
                " tubelets"
            )
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)  # (t, h, w)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        # the requested backend; `auto` is resolved per device and dtype when attention first runs on them
        self.attn_backend = check_backend(attn_backend)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, tubelet_size)
        # Fixed sine-cosine table, re-made rather than saved (as VideoMAE). A checkpoint that saves a
        # table (MAE) overwrites it at load time, see checkpoint_io.
        self.register_buffer("pos_embed", sincos_table(self.num_patches, embed_dim), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.register_buffer("cls_pos", torch.zeros(1, 1, embed_dim), persistent=False)
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth)]  # stochastic depth decay rule (timm)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, dpr[i], self.attn_backend) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_prefix(self) -> int:
        return 0 if self.cls_token is None else 1

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: the model takes its inputs in it. Not the buffers' (the position tables): DeepSpeed's
        bf16 / fp16 mode casts the parameters only, so the tables stay fp32 under bf16 weights. (A ZeRO-3 parameter
        is an empty shard outside its module's forward; its dtype is still the weights'.)"""
        return self.patch_embed.proj.weight.dtype

    def embed(self, patches_BNK: torch.Tensor, ids_BV: torch.Tensor | None) -> torch.Tensor:
        """Patch-embed only the tokens at ids (all tokens if None), add positions, prepend CLS -> [B, V(+1), D].

        The boundary: pixels (fp32 from the loader) and position tables are cast to the weights' dtype here, so a
        DeepSpeed bf16 engine (bf16 weights, fp32 batch and buffers) runs. Under autocast the weights are fp32 and
        nothing changes."""
        dt = self.dtype
        if ids_BV is None:
            x = self.patch_embed(patches_BNK.to(dt)) + self.pos_embed.to(dt)
        else:
            # cast after the gather: a low-precision teacher converts only the rows it reads
            rows = gather_tokens(patches_BNK, ids_BV).to(dt)
            x = gather_rows(self.pos_embed.to(dt), ids_BV, self.patch_embed(rows))  # + pos[ids], fused
        if self.cls_token is not None:
            cls = (self.cls_token + self.cls_pos.to(dt)).expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1)
        return x

    def forward_features(
        self,
        patches_BNK: torch.Tensor,
        ids_BV: torch.Tensor | None = None,
        collect: tuple[int, ...] = (),
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Run the blocks on the tokens at ids.

        collect: 1-indexed blocks whose raw outputs (no final norm, CLS row included if any) are returned,
        keyed by block.
        stop_after: run only the first `stop_after` blocks and skip the final norm (returns None for x):
        a teacher needs nothing past its deepest aligned block.
        """
        x = self.embed(patches_BNK, ids_BV)
        feats = {}
        n_blocks = self.depth if stop_after is None else stop_after
        for i in range(n_blocks):
            x = self.blocks[i](x)
            if i + 1 in collect:
                feats[i + 1] = x
        if stop_after is not None:
            return None, feats
        return self.norm(x), feats

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """All tokens, final norm -> [B, N(+1), D]."""
        x, _ = self.forward_features(patchify(video_BCTHW, self.patch_size, self.tubelet_size))
        return x


def init_weights(m: nn.Module) -> None:
    """VideoMAE pre-training init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_encoder(cfg, *, img_size: int, num_frames: int) -> VisionTransformer:
    """ModelConfig section -> encoder."""
    dim, depth, heads = resolve_arch(cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_heads)
    if dim % heads:
        raise ValueError(f"model.embed_dim={dim} is not divisible by model.num_heads={heads}")
    return VisionTransformer(
        img_size=img_size,
        num_frames=num_frames,
        patch_size=cfg.patch_size,
        tubelet_size=cfg.tubelet_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=cfg.mlp_ratio,
        cls_token=cfg.cls_token,
        drop_path=cfg.drop_path,
        attn_backend=cfg.attn_backend,
    )


def flops_block(n_q: int, n_kv: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one block (2 per multiply-add): qkv, attention, proj, MLP."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * n_q * dim * dim + 2 * 2 * n_kv * dim * dim + 2 * n_q * dim * dim + 2 * 2 * n_q * dim * hidden
    attn = 2 * 2 * n_q * n_kv * dim
    return float(linear + attn)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay, as the reference groups: 1-D tensors, biases, tokens, tables. The one rule
    for pre-training and fine-tuning (optim.param_groups, classifier.layer_decay_groups)."""
    skip = set()
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name.endswith("token") or "pos_embed" in name:
            skip.add(name)
    return skip
