"""Fashion-MNIST from the gzipped idx files (Debian package ``dataset-fashion-mnist``) as 1-frame videos."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import apply_crop_resize, normalize, random_resized_crop_params, sample_seed

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
RRC_SCALE = (0.2, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim
_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

MaskFn = Callable[[torch.Generator], dict[str, torch.Tensor]]


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Parse one gzipped idx file into a uint8 array shaped by its header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path} (install it with `apt-get install dataset-fashion-mnist`, "
            f"or point root at a directory holding the gzipped idx files)"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: truncated idx header")
    got = int.from_bytes(data[0:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad idx magic number {got}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise ValueError(f"{path}: payload has {len(data) - header} bytes, header dims {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str = DEFAULT_ROOT, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split -> (images uint8 [N, 28, 28], labels int64 [N]); cached per (root, split).

    The returned tensors are shared through the cache: treat them as read-only.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    key = (os.path.abspath(root), split)
    if key not in _CACHE:
        img_name, lbl_name = _FILES[split]
        images = _read_idx(os.path.join(root, img_name), _IMAGES_MAGIC)
        labels = _read_idx(os.path.join(root, lbl_name), _LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}/{split}: {images.shape[0]} images but {labels.shape[0]} labels")
        _CACHE[key] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _CACHE[key]


def _check_size(size: int, n: int) -> int:
    if size < 0 or size > n:
        raise ValueError(f"size must be in [0, {n}] (0 = whole split), got {size}")
    return size or n


def merge_masks(item: dict[str, torch.Tensor], mask_fn: MaskFn | None, gen: torch.Generator) -> None:
    """Merge ``mask_fn(gen)`` (int64 index tensors) into ``item`` in place; key clashes are an error."""
    if mask_fn is None:
        return
    masks = mask_fn(gen)
    clash = item.keys() & masks.keys()
    if clash:
        raise ValueError(f"mask_fn returned reserved keys {sorted(clash)}")
    item.update(masks)


class FashionMNISTImages(Dataset):
    """Fashion-MNIST images as 1-frame, 3-channel, ImageNet-normalized videos.

    Indexed by a *global sample index* ``g`` (see ``EpochSampler``): the item is image ``g % len(self)`` and all its
    randomness comes from ``torch.Generator().manual_seed(sample_seed(seed, g))``.
    Train: RandomResizedCrop(scale=(min_crop_scale, 1), ratio=(3/4, 4/3)) + horizontal flip (p=0.5); eval: plain
    resize.
    Item: ``{"video": float32 [3, 1, H, W], "label": int64 [], "index": int64 []}`` plus ``mask_fn(gen)`` entries.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        split: str = "train",
        input_size: int = 224,
        seed: int = 0,
        train: bool = True,
        mask_fn: MaskFn | None = None,
        size: int = 0,
        min_crop_scale: float = RRC_SCALE[0],
    ) -> None:
        images, labels = load_fashion_mnist(root, split)
        self.crop_scale = (float(min_crop_scale), 1.0)
        n = _check_size(size, images.shape[0])
        self.images = images[:n]  # uint8 [N, 28, 28]
        self.labels = labels[:n]  # int64 [N]
        self.input_size = int(input_size)
        self.seed = int(seed)
        self.train = train
        self.mask_fn = mask_fn

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        g = int(g)
        i = g % len(self)
        gen = torch.Generator().manual_seed(sample_seed(self.seed, g))
        h, w = self.images.shape[-2:]
        x = self.images[i].to(torch.float32).div_(255.0).view(1, 1, h, w)  # CTHW, C=T=1
        if self.train:
            top, left, ch, cw = random_resized_crop_params(gen, h, w, self.crop_scale, RRC_RATIO)
            x = apply_crop_resize(x, top, left, ch, cw, self.input_size)
            if torch.rand(1, generator=gen).item() < 0.5:
                x = x.flip(-1)
        else:
            x = apply_crop_resize(x, 0, 0, h, w, self.input_size)
        item = {
            "video": normalize(x),  # float32 [3, 1, H, W]
            "label": self.labels[i].clone(),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        merge_masks(item, self.mask_fn, gen)
        return item
