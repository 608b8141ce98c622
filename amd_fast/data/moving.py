"""Moving Fashion-MNIST: real Fashion-MNIST garments moving on a black canvas, labelled by MOTION class.

Clips are generated on the fly, deterministically from the global sample index ``g``. Appearance carries no label
information (any garment can do any motion), so -- like Something-Something -- the class can only be recognized
from how the object moves across frames:

    0 right   object translates left -> right (x increases)
    1 left    object translates right -> left (x decreases)
    2 down    object translates top -> bottom (y increases)
    3 up      object translates bottom -> top (y decreases)
    4 grow    object approaches: its side grows geometrically (x0.5-0.7 -> x1.2-1.45 of the base side)
    5 shrink  object recedes: the reverse of grow

With ``num_classes=k < 6`` only the first k classes are used. ``invert_prob``: the share of clips drawn dark on a
bright canvas (the study's video task, where a linear read-out of the raw pixels must not solve the motion).
Geometry (canvas units, canvas side S): base object
side ``round(0.45 * S)``; translations travel 30-60% of S between the first and the last frame at constant speed,
starting so that the object stays mostly inside the canvas (at most a quarter of its side sticks out); grow/shrink
keep a fixed random center. Item i always shows garment i, the motion/label/crop come from the per-sample generator.

Train clips are rendered on a ``round(1.15 * input_size)`` canvas followed by VideoMAE's multi-scale crop back to
``input_size`` (no flip: it would swap left/right). The crop+resize is folded into the rendering transform: each
frame is ``A_y @ garment @ A_x^T`` with per-frame separable resampling matrices (bilinear, triangle-widened when
downscaling), which is geometrically identical to render-then-crop-resize but resamples once and builds all T
frames with two batched matmuls.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .fashion_mnist import DEFAULT_ROOT, MaskFn, _check_size, load_fashion_mnist, merge_masks
from .transforms import multi_scale_crop_params, normalize, sample_seed

# Shape suffixes: T frames, H/W output rows/columns, S source (garment) pixels along one axis.

MOTION_CLASSES: tuple[str, ...] = ("right", "left", "down", "up", "grow", "shrink")
NUM_MOTION_CLASSES = len(MOTION_CLASSES)
OBJECT_FRACTION = 0.45  # object side / canvas side
TRAIN_CANVAS_SCALE = 1.15  # train canvas side / input_size (before the multi-scale crop)
TRAVEL = (0.3, 0.6)  # translation distance over the clip, fraction of the canvas
GROW_START = (0.5, 0.7)  # grow: side factor at the first frame (shrink: at the last)
GROW_END = (1.2, 1.45)  # grow: side factor at the last frame (shrink: at the first)
MAX_OUTSIDE = 0.25  # fraction of the object's side allowed to stick out of the canvas


def motion_trajectory(
    gen: torch.Generator, label: int, num_frames: int, canvas: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a motion of class ``label`` -> (cx [T], cy [T], side [T]) in canvas pixels (pixel edges at integers)."""
    u0, u1, u2, u3 = torch.rand(4, generator=gen, dtype=torch.float64).tolist()  # always 4 draws
    tau = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)
    S = float(canvas)
    s0 = float(round(OBJECT_FRACTION * S))
    if label < 4:  # translations
        m = MAX_OUTSIDE * s0
        d = (TRAVEL[0] + (TRAVEL[1] - TRAVEL[0]) * u0) * S
        lo, hi = s0 / 2 - m, S + m - s0 / 2 - d
        start = lo + (hi - lo) * u1
        along = start + d * tau if label in (0, 2) else start + d * (1.0 - tau)
        perp = torch.full_like(tau, s0 / 2 + (S - s0) * u2)
        side = torch.full_like(tau, s0)
        cx, cy = (along, perp) if label in (0, 1) else (perp, along)
    else:  # grow / shrink
        a = GROW_START[0] + (GROW_START[1] - GROW_START[0]) * u0
        b = GROW_END[0] + (GROW_END[1] - GROW_END[0]) * u1
        t = tau if label == 4 else 1.0 - tau
        side = s0 * a * (b / a) ** t
        s_max = s0 * b
        lo, span = (0.5 - MAX_OUTSIDE) * s_max, S - (1.0 - 2 * MAX_OUTSIDE) * s_max
        cx = torch.full_like(tau, lo + span * u2)
        cy = torch.full_like(tau, lo + span * u3)
    return cx, cy, side


def axis_weights(center: torch.Tensor, extent: torch.Tensor, n_out: int, n_src: int) -> torch.Tensor:
    """Resampling matrices placing an ``n_src``-pixel axis at [center -/+ extent/2] of an ``n_out`` axis.

    center, extent: [T] in output pixels -> weights [T, n_out, n_src] (float32). Bilinear (align_corners=False,
    zero padding) when upscaling; the triangle is widened by the scale factor when downscaling (antialias), with
    each output pixel's weights normalized to sum to 1 over the zero-extended source axis.
    """
    pos = torch.arange(n_out, dtype=torch.float64) + 0.5  # output pixel centers
    step = n_src / extent  # source pixels per output pixel, [T]
    src = (pos[None, :] - (center - extent / 2)[:, None]) * step[:, None] - 0.5  # [T, n_out], pixel-center units
    support = step.clamp(min=1.0)[:, None, None]
    # Evaluate the kernel on the source axis extended by zero pixels, normalize each output pixel's weights to sum 1
    # (a widened triangle is not a partition of unity on its own), then keep the real source pixels.
    pad = int(support.max().ceil()) + 1
    k = torch.arange(-pad, n_src + pad, dtype=torch.float64)
    w = (1.0 - (src[:, :, None] - k).abs() / support).clamp_(min=0.0)
    w = w / w.sum(-1, keepdim=True).clamp_(min=1e-12)
    return w[:, :, pad : pad + n_src].to(torch.float32)


def render_clip(
    garment_SS: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    side: torch.Tensor,
    out_size: int,
    crop: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Draw the garment (values in [0, 1]) on a black canvas per frame -> frames_THW [T, out_size, out_size].

    cx, cy, side: [T] canvas pixels. ``crop=(top, left, ch, cw)`` of the canvas is resized to ``out_size``; it is folded
    into the placement (x_out = (x - left) * out_size / cw), so no canvas is materialized. Without a crop the canvas
    is the output.
    """
    top, left, ch, cw = crop if crop is not None else (0, 0, out_size, out_size)
    sx, sy = out_size / cw, out_size / ch
    ay_THS = axis_weights((cy - top) * sy, side * sy, out_size, garment_SS.shape[0])
    ax_TWS = axis_weights((cx - left) * sx, side * sx, out_size, garment_SS.shape[1])
    return torch.bmm(torch.matmul(ay_THS, garment_SS), ax_TWS.transpose(1, 2))


class MovingFashionMNIST(Dataset):
    """Synthetic motion-classification clips made from Fashion-MNIST garments (see module docstring).

    Indexed by a global sample index ``g``; item ``i = g % len(self)`` shows garment i and all randomness comes from
    ``torch.Generator().manual_seed(sample_seed(seed, g))``.
    Item: ``{"video": float32 [3, T, H, W], "label": int64 [] (motion class), "index": int64 []}`` plus ``mask_fn``.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        split: str = "train",
        num_frames: int = 16,
        input_size: int = 224,
        seed: int = 0,
        train: bool = True,
        mask_fn: MaskFn | None = None,
        size: int = 0,
        num_classes: int = NUM_MOTION_CLASSES,
        test_crops: int = 1,
        invert_prob: float = 0.0,
    ) -> None:
        if not 2 <= num_classes <= NUM_MOTION_CLASSES:
            raise ValueError(f"num_classes must be in [2, {NUM_MOTION_CLASSES}], got {num_classes}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        images, _ = load_fashion_mnist(root, split)
        n = _check_size(size, images.shape[0])
        self.images = images[:n]  # uint8 [N, 28, 28]
        self.num_frames = int(num_frames)
        self.input_size = int(input_size)
        self.seed = int(seed)
        self.train = train
        self.mask_fn = mask_fn
        self.num_classes = int(num_classes)
        # eval with test_crops > 1: the training canvas, cut into input_size crops along its diagonal
        self.test_crops = 1 if train else int(test_crops)
        if not 0.0 <= invert_prob <= 1.0:
            raise ValueError(f"invert_prob must be in [0, 1], got {invert_prob}")
        self.invert_prob = float(invert_prob)
        self.canvas = round(self.input_size * TRAIN_CANVAS_SCALE) if train or self.test_crops > 1 else self.input_size

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        g = int(g)
        i = g % len(self)
        gen = torch.Generator().manual_seed(sample_seed(self.seed, g))
        label = int(torch.randint(0, self.num_classes, (1,), generator=gen).item())
        cx, cy, side = motion_trajectory(gen, label, self.num_frames, self.canvas)
        crop = multi_scale_crop_params(gen, self.canvas, self.canvas, self.input_size) if self.train else None
        garment_SS = self.images[i].to(torch.float32).div_(255.0)
        # Dark-on-bright with probability invert_prob (drawn only when asked, so the default stream is unchanged).
        # Translation and growth are linear in the pixels for a bright object on black (the brightness-weighted
        # centre moves, the total brightness grows): a linear probe on raw pixels solves them (~100%). With random
        # polarity the sign of that read-out flips per clip, so recognizing the motion needs a nonlinear model.
        invert = self.invert_prob > 0 and bool(torch.rand(1, generator=gen) < self.invert_prob)
        if self.test_crops > 1:  # views [V, 3, T, H, W]: crops of the canvas from top-left to bottom-right
            S, slack = self.input_size, self.canvas - self.input_size
            offs = [round(slack * c / (self.test_crops - 1)) for c in range(self.test_crops)]
            frames = [render_clip(garment_SS, cx, cy, side, S, (o, o, S, S)) for o in offs]
            video = torch.stack([normalize(((1 - f) if invert else f).unsqueeze(0)) for f in frames])
        else:
            frames_THW = render_clip(garment_SS, cx, cy, side, self.input_size, crop)
            video = normalize(((1 - frames_THW) if invert else frames_THW).unsqueeze(0))
        item = {
            "video": video,  # float32 [3, T, H, W] (test views: [V, 3, T, H, W])
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        merge_masks(item, self.mask_fn, gen)
        return item
