"""The three pre-training objectives: `mae`, `amd`, `dmae` (METHOD.md sections 3-5).

Shape legend: B batch, N tokens, K values per patch, V_s student-visible tokens, Dl teacher-only
tokens (AMD's Delta), M decoded tokens, D student width, D_t teacher width.

An objective is called with a batch dict (`video` [B, C, T, H, W] normalized, plus the mask index
tensors of masks.py) and returns `(loss, parts)`, parts being detached scalars for logging.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from amd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from amd_fast.models.pretrain import PretrainModel
from amd_fast.models.vit import VisionTransformer, patchify
from amd_fast.ops import _kernels as kernels
from amd_fast.ops import gather_tokens

log = logging.getLogger(__name__)


def reconstruction_target(
    patches_BNK: torch.Tensor, ids_BM: torch.Tensor, channels: int = 3, norm_pix: bool = True
) -> torch.Tensor:
    """VideoMAE's target at the decoded tokens -> [B, M, tubelet*p*p*C].

    Un-normalize to [0, 1]; per token and colour channel standardize over its tubelet*p*p values
    with the unbiased std + 1e-6; flatten in (tubelet, p, p, C) order. Computed only for the M
    rows that are reconstructed (patches are in Conv3d kernel order (C, tubelet, p, p)).
    """
    x = gather_tokens(patches_BNK, ids_BM)
    B, M, K = x.shape
    x = x.view(B, M, channels, K // channels)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 1, 3, 1)
    x = x * std + mean
    if norm_pix:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.transpose(2, 3).reshape(B, M, K)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"distance {kind!r} is unknown; allowed: mse, l1, smooth_l1")


def alignment_loss(
    h_BVD: torch.Tensor, head: nn.Module, target_BVT: torch.Tensor, kind: str, l2_norm: bool = False,
    need_z: bool = True,
):  # fmt: skip
    """distance(head(h), target), optionally with both sides L2-normalized per token (DMAE) -> (loss, z).

    A linear head runs the fused op (amd_fast.kernels.fused_alignment_loss): with need_z=False (no one
    reads the projection) it is chunked over tokens and never materializes z, returning (loss, None).
    Other heads (DMAE's MLP) run the reference below."""
    if isinstance(head, nn.Linear):
        norm = "l2" if l2_norm else "none"
        out = kernels.fused_alignment_loss(h_BVD, head.weight, head.bias, target_BVT, pred_norm=norm,
                                           target_norm=norm, distance=kind, return_z=need_z)  # fmt: skip
        return out if need_z else (out, None)
    z = head(h_BVD)
    if l2_norm:
        return distance(F.normalize(z, dim=-1), F.normalize(target_BVT, dim=-1), kind), z
    return distance(z, target_BVT, kind), z


class TeacherForward(nn.Module):
    """The teacher's forward as one module call -> raw block outputs at `layers`, in that order (a tuple: DeepSpeed's
    hooks walk outputs and take dict keys for names): what a ZeRO-3 engine wraps, so that it gathers each block's
    weights as the forward reaches it."""

    def __init__(self, encoder: VisionTransformer, layers: tuple[int, ...]):
        super().__init__()
        self.encoder, self.layers = encoder, layers

    def forward(self, patches_BNK: torch.Tensor, ids_BV: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.encoder.forward_features(patches_BNK, ids_BV, self.layers, stop_after=max(self.layers))[1]
        return tuple(feats[k] for k in self.layers)


class FrozenTeacher:
    """A frozen (Video)MAE encoder: eval mode, no grads, fastest inference dtype, stops early.

    Not an nn.Module on purpose: it must never reach the optimizer or the student's data-parallel engine.
    `partition` (teacher.zero3, from the engine module): turns `TeacherForward` into a ZeRO-3 inference engine
    whose weights are sharded over the ranks; without it every rank holds the whole teacher.
    """

    def __init__(self, encoder: VisionTransformer, layers: list[int], dtype: torch.dtype, partition=None):
        self.encoder = encoder.eval().requires_grad_(False).to(dtype)
        self.layers = tuple(layers)
        self.dtype = dtype
        if max(layers) > encoder.depth:
            raise ValueError(f"teacher layer {max(layers)} > teacher depth {encoder.depth}")
        self.forward = TeacherForward(self.encoder, self.layers)
        self.sharded = partition is not None
        if self.sharded:
            self.forward = partition(self.forward, dtype)

    def features(self, patches_BNK: torch.Tensor, ids_BV: torch.Tensor) -> dict[int, torch.Tensor]:
        """Raw block outputs at the aligned layers, at least fp32, [B, V, D_t] (CLS row dropped).

        The teacher runs in its own dtype (teacher.dtype), with the student's autocast off: an fp32 teacher stays
        fp32 under a bf16 student, and an int8 one gets the fp32 activations its quantized linears take."""
        # ZeRO-3's all-gathers write into parameter storage, which inference mode forbids: no_grad there
        dev = patches_BNK.device.type
        with torch.no_grad() if self.sharded else torch.inference_mode(), torch.autocast(dev, enabled=False):
            outs = self.forward(patches_BNK, ids_BV)
        feats = dict(zip(self.layers, outs))
        p = self.encoder.num_prefix
        # Leaving inference mode: inference tensors cannot be saved for backward, so the targets are
        # copied into normal fp32 tensors (small: [B, V_t, D_t] per layer).
        return {k: v[:, p:].to(torch.promote_types(v.dtype, torch.float32), copy=True) for k, v in feats.items()}


class MAEObjective:
    """Plain (Video)MAE: reconstruct the student-masked tokens. Also how a teacher is trained.

    What an objective needs is declared here, and the builders, the masks, the FLOP count and the config checks ask
    it: `needs_teacher` (a frozen teacher, aligned layer pairs, projection heads), `uses_delta` (the teacher also
    sees the Delta tokens: AMD's asymmetric mask), `has_generators` (AMD's generators of the teacher-only tokens).
    """

    needs_teacher = False
    uses_delta = False
    has_generators = False

    @staticmethod
    def head_kind(cfg) -> str:
        """The projection heads' kind (models/pretrain.py) for an objective that aligns features."""
        return cfg.dmae_head

    def __init__(self, model: PretrainModel, cfg, teacher: FrozenTeacher | None = None):
        self.model, self.cfg, self.teacher = model, cfg, teacher
        kernels.select(getattr(cfg, "kernels", "auto"))  # process-wide: the models' gathers dispatch through it
        self.student_layers = tuple(cfg.student_layers) if teacher is not None else ()

    def encode(self, batch):
        enc = self.model.encoder
        patches = patchify(batch["video"], enc.patch_size, enc.tubelet_size)
        x, feats = enc.forward_features(patches, batch["ids_vis_s"], collect=self.student_layers)
        p = enc.num_prefix
        return patches, x[:, p:], {k: v[:, p:] for k, v in feats.items()}

    def reconstruction(self, patches, x, batch) -> torch.Tensor:
        pred = self.model.forward_decoder(x, batch["ids_vis_s"], batch["ids_dec"])
        target = reconstruction_target(patches, batch["ids_dec"], norm_pix=self.cfg.norm_pix_loss)
        return F.mse_loss(pred, target)

    def __call__(self, batch: dict[str, torch.Tensor]):
        patches, x, _ = self.encode(batch)
        l_rec = self.reconstruction(patches, x, batch)
        return self.cfg.w_rec * l_rec, {"rec": l_rec.detach()}


class AMDObjective(MAEObjective):
    """AMD: reconstruction + direct alignment at V_s + generation alignment at Delta, per layer pair.

    L = w_rec L_rec + w_dir mean_k dist(P_k h_k, T_k[V_s]) + w_gen mean_k dist(G_k(z_k)[Delta], T_k[Delta]).
    """

    needs_teacher = True
    uses_delta = True
    has_generators = True

    @staticmethod
    def head_kind(cfg) -> str:
        return "amd"

    def __call__(self, batch):
        ids_s, ids_d = batch["ids_vis_s"], batch["ids_delta"]
        patches, x, feats = self.encode(batch)
        # the teacher sees [V_s ; Delta], so its first V_s rows line up with the student's tokens
        t_feats = self.teacher.features(patches, torch.cat((ids_s, ids_d), dim=1))
        v_s = ids_s.shape[1]
        l_rec = self.reconstruction(patches, x, batch)
        heads = self.model.encoder.projection_heads
        l_dir = l_gen = 0.0
        has_gen = self.model.generators is not None  # without generators nothing reads P_k h_k: loss-only op
        for k, (ls, lt) in enumerate(zip(self.cfg.student_layers, self.cfg.teacher_layers)):
            t = t_feats[lt]
            d, z = alignment_loss(feats[ls], heads[k], t[:, :v_s], self.cfg.distance, need_z=has_gen)
            l_dir = l_dir + d
            if has_gen:
                g = self.model.forward_generator(k, z, ids_s, ids_d)
                l_gen = l_gen + distance(g, t[:, v_s:], self.cfg.distance)
        n = len(self.cfg.student_layers)
        l_dir, l_gen = l_dir / n, torch.as_tensor(l_gen / n, dtype=l_dir.dtype)
        loss = self.cfg.w_rec * l_rec + self.cfg.w_dir * l_dir + self.cfg.w_gen * l_gen
        return loss, {"rec": l_rec.detach(), "dir": l_dir.detach(), "gen": l_gen.detach()}


class DMAEObjective(MAEObjective):
    """DMAE: one shared mask; L = w_rec L_rec + w_dir mean_k |n(T_k) - n(P_k h_k)| (n: per-token L2 norm)."""

    needs_teacher = True

    def __call__(self, batch):
        ids_s = batch["ids_vis_s"]
        patches, x, feats = self.encode(batch)
        t_feats = self.teacher.features(patches, ids_s)
        l_rec = self.reconstruction(patches, x, batch)
        heads = self.model.encoder.projection_heads
        kind = "l1" if self.cfg.dmae_distance == "l1" else "mse"
        l_dist = 0.0
        for k, (ls, lt) in enumerate(zip(self.cfg.student_layers, self.cfg.teacher_layers)):
            d, _ = alignment_loss(feats[ls], heads[k], t_feats[lt], kind, l2_norm=True, need_z=False)
            l_dist = l_dist + d
        l_dist = l_dist / len(self.cfg.student_layers)
        loss = self.cfg.w_rec * l_rec + self.cfg.w_dir * l_dist
        return loss, {"rec": l_rec.detach(), "dist": l_dist.detach()}


OBJECTIVES = {"mae": MAEObjective, "amd": AMDObjective, "dmae": DMAEObjective}
