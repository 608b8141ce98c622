"""AdamW with the reference parameter groups, LR scaled by global batch, warmup + per-step cosine."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from amd_fast.device import use_fused_adamw
from amd_fast.models.vit import no_weight_decay_names

log = logging.getLogger(__name__)


def scaled_lrs(cfg, global_batch: int) -> tuple[float, float, float]:
    """(lr, min_lr, warmup_lr), each scaled by global_batch / 256 as VideoMAE / AMD do."""
    s = global_batch / 256
    return cfg.base_lr * s, cfg.min_lr * s, cfg.warmup_lr * s


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / norms / 1-D params / tokens / tables without decay."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(groups: list[dict], cfg, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over a task's parameter groups; fused where the device has the kernel (`use_fused_adamw`)."""
    fused = use_fused_adamw(cfg.fused, device)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    log.info("optimizer: AdamW(fused=%s) lr=%.3g, %d groups, %d tensors", fused, lr, len(groups),
             sum(len(g["params"]) for g in groups))  # fmt: skip
    return opt


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float, warmup_lr: float) -> float:
    """Linear warmup from warmup_lr to lr, then cosine to min_lr, per step (VideoMAE's cosine_scheduler)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
