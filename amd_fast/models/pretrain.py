"""The trainable pre-training model: student encoder, decoder, AMD generators and projection heads.

Names follow the VideoMAE / AMD pre-training layout (`encoder.*`, `encoder_to_decoder`, `mask_token`,
`decoder.blocks.*`, `decoder.norm`, `decoder.head`, `encoder.projection_heads.{k}`,
`generators.{k}.blocks.{j}`), so their checkpoints load as they are.

Shape legend: B batch, N tokens, V_s student-visible, M decoded (masked) tokens, D student width,
D_t teacher width, D_d decoder width, K_out values predicted per token (3*tubelet*p*p).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from amd_fast.models.vit import LN_EPS, Block, VisionTransformer, init_weights, sincos_table
from amd_fast.ops import gather_rows


class Decoder(nn.Module):
    """VideoMAE's pre-training decoder: blocks, norm, a linear head to pixels."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, out_dim: int, attn_backend: str):
        super().__init__()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, attn_backend=attn_backend) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, x_BLD: torch.Tensor, n_out: int) -> torch.Tensor:
        """Predict the last n_out rows -> [B, n_out, K_out]. The last block computes only those rows
        (same values as VideoMAE's `head(norm(x[:, -n_out:]))`, without the dead rows' queries and MLP)."""
        for blk in self.blocks[:-1]:
            x_BLD = blk(x_BLD)
        x_BLD = self.blocks[-1](x_BLD, keep_last=n_out)
        return self.head(self.norm(x_BLD))


class Generator(nn.Module):
    """AMD's feature generator for one aligned layer: blocks of width D_t and a learnable mask token.

    Departure (METHOD.md quirk): the reference keeps the mask token in a plain list, so it is never
    trained, saved, or shared across ranks. Here it is a registered parameter.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, attn_backend: str):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, attn_backend=attn_backend) for _ in range(depth)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x_BLD: torch.Tensor, n_out: int) -> torch.Tensor:
        """Raw output of the last n_out rows (no final norm: the reference's generator norm is unused)."""
        for blk in self.blocks[:-1]:
            x_BLD = blk(x_BLD)
        return self.blocks[-1](x_BLD, keep_last=n_out)


class MLPHead(nn.Module):
    """DMAE's optional 2-layer projection."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PretrainModel(nn.Module):
    """Everything that trains. The frozen teacher lives outside (see objectives.py)."""

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        *,
        teacher_dim: int = 0,
        num_aligned: int = 0,
        generator_depth: int = 0,
        head_kind: str = "amd",
    ):
        super().__init__()
        self.encoder = encoder
        out_dim = 3 * encoder.tubelet_size * encoder.patch_size**2
        self.encoder_to_decoder = nn.Linear(encoder.embed_dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = Decoder(decoder_dim, decoder_depth, decoder_heads, out_dim, encoder.attn_backend)
        self.register_buffer("decoder_pos_embed", sincos_table(encoder.num_patches, decoder_dim), persistent=False)
        self.encoder_to_decoder.apply(init_weights)
        self.decoder.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if num_aligned:
            # AMD: bias-free linear P_k; DMAE: a linear (or MLP) with bias. Kept under `encoder.` as in AMD's files.
            if head_kind == "amd":
                heads = [nn.Linear(encoder.embed_dim, teacher_dim, bias=False) for _ in range(num_aligned)]
            elif head_kind == "linear":
                heads = [nn.Linear(encoder.embed_dim, teacher_dim) for _ in range(num_aligned)]
            else:
                heads = [MLPHead(encoder.embed_dim, teacher_dim) for _ in range(num_aligned)]
            encoder.projection_heads = nn.ModuleList(heads)
            encoder.projection_heads.apply(init_weights)
        self.generators = None
        if generator_depth:
            heads_t = max(1, teacher_dim // 64)
            self.generators = nn.ModuleList(
                [Generator(teacher_dim, generator_depth, heads_t, encoder.attn_backend) for _ in range(num_aligned)]
            )
            for g in self.generators:
                g.blocks.apply(init_weights)
            self.register_buffer("teacher_pos_embed", sincos_table(encoder.num_patches, teacher_dim), persistent=False)

    def forward_decoder(self, enc_BVD: torch.Tensor, ids_vis_BV: torch.Tensor, ids_dec_BM: torch.Tensor):
        """Encoder output at V_s + a mask token per decoded position -> pixel predictions [B, M, K_out]."""
        pos = self.decoder_pos_embed.to(self.mask_token.dtype)  # an fp32 buffer under DeepSpeed's bf16 weights
        x = gather_rows(pos, ids_vis_BV, self.encoder_to_decoder(enc_BVD))
        m = self.mask_token + gather_rows(pos, ids_dec_BM)
        return self.decoder(torch.cat((x, m), dim=1), n_out=ids_dec_BM.shape[1])

    def forward_generator(self, k: int, z_BVT: torch.Tensor, ids_vis_BV, ids_delta_BD) -> torch.Tensor:
        """G_k([z + E_t[V_s] ; m_k + E_t[Delta]]) at the Delta rows -> [B, Delta, D_t]."""
        g = self.generators[k]
        pos = self.teacher_pos_embed.to(g.mask_token.dtype)  # as in forward_decoder
        x = gather_rows(pos, ids_vis_BV, z_BVT)
        m = g.mask_token + gather_rows(pos, ids_delta_BD)
        return g(torch.cat((x, m), dim=1), n_out=ids_delta_BD.shape[1])
