"""Tensor-only, generator-driven augmentations for image/video clips.

All randomness is drawn from an explicit ``torch.Generator`` so that an item is a pure function of its per-sample
seed (see :func:`sample_seed`), independent of DataLoader workers or processes.

Layout convention: videos are ``video_CTHW`` float tensors (channels, frames, height, width).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, g: int) -> int:
    """Stable 63-bit seed for global sample index ``g`` under run seed ``seed`` (blake2b, not ``hash()``)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(g)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high, generator=gen).item()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=gen).item())


def random_resized_crop_params(
    gen: torch.Generator,
    h: int,
    w: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` (10 tries, then center-crop fallback) -> (top, left, ch, cw)."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = _randint(gen, 0, h - ch + 1)
            left = _randint(gen, 0, w - cw + 1)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw = w
        ch = round(cw / min(ratio))
    elif in_ratio > max(ratio):
        ch = h
        cw = round(ch * max(ratio))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def fill_fix_offset(more_fix_crop: bool, image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """Fixed crop offsets as (w_offset, h_offset): 5 positions, or 13 with ``more_fix_crop`` (VideoMAE/TSN)."""
    ws = (image_w - crop_w) // 4
    hs = (image_h - crop_h) // 4
    ret = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)]
    if more_fix_crop:
        ret += [
            (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
            (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs),
        ]  # fmt: skip
    return ret


def multi_scale_crop_params(
    gen: torch.Generator,
    h: int,
    w: int,
    out_size: int | tuple[int, int],
    scales: Sequence[float] = (1, 0.875, 0.75, 0.66),
    max_distort: int = 1,
    more_fix_crop: bool = True,
) -> tuple[int, int, int, int]:
    """VideoMAE ``GroupMultiScaleCrop`` crop sampling (fix_crop=True) -> (top, left, crop_h, crop_w).

    Reproduces ``GroupMultiScaleCrop._sample_crop_size`` / ``fill_fix_offset`` from VideoMAE's ``transforms.py``
    (Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
    Pre-Training", NeurIPS 2022; code inherited from TSN/TSM): crop sides are ``int(min(h, w) * s)``, snapped to the
    output size when within 3 px, (w, h) scale indices may differ by at most ``max_distort``, and the offset is one
    of the fixed grid positions. ``random.choice`` is replaced by draws from ``gen``. Departure: a crop side that
    the 3 px snap pushed past the image (only when the image is smaller than ``out_size + 3``) is clamped to it.
    """
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    base = min(h, w)
    crop_sizes = [int(base * s) for s in scales]
    crop_h = [out_h if abs(x - out_h) < 3 else x for x in crop_sizes]
    crop_w = [out_w if abs(x - out_w) < 3 else x for x in crop_sizes]
    pairs = [(cw, ch) for i, ch in enumerate(crop_h) for j, cw in enumerate(crop_w) if abs(i - j) <= max_distort]
    cw, ch = pairs[_randint(gen, 0, len(pairs))]
    cw, ch = min(cw, w), min(ch, h)
    offsets = fill_fix_offset(more_fix_crop, w, h, cw, ch)
    w_off, h_off = offsets[_randint(gen, 0, len(offsets))]
    return h_off, w_off, ch, cw


def apply_crop_resize(
    video_CTHW: torch.Tensor, top: int, left: int, ch: int, cw: int, out_size: int | tuple[int, int]
) -> torch.Tensor:
    """Crop ``[top:top+ch, left:left+cw]`` of every frame and bilinearly resize to ``out_size`` -> [C, T, oh, ow]."""
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    x = video_CTHW[..., top : top + ch, left : left + cw]
    if x.shape[-2:] != (ch, cw):
        raise ValueError(f"crop {(top, left, ch, cw)} exceeds frame size {tuple(video_CTHW.shape[-2:])}")
    if (ch, cw) == (out_h, out_w):
        return x.contiguous()
    # A CTHW tensor is a valid NCHW input for interpolate (N=C, channels=T): all frames resized at once.
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` over dim 0; a 1-channel ``x`` is broadcast to ``len(mean)`` channels.

    x: [C, ...] with C == len(mean) or C == 1 -> [len(mean), ...] float32.
    """
    if x.shape[0] not in (1, len(mean)):
        raise ValueError(f"expected 1 or {len(mean)} channels, got {x.shape[0]}")
    view = (len(mean),) + (1,) * (x.dim() - 1)
    scale = 1.0 / torch.tensor(std, dtype=torch.float32).view(view)
    bias = -torch.tensor(mean, dtype=torch.float32).view(view) * scale
    # addcmul is one fused broadcasting kernel (much faster than (x - m) / s on large clips).
    return torch.addcmul(bias, x.to(torch.float32), scale)
