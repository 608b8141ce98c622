"""Datasets, augmentations and samplers (all items indexed by global sample index, seeded per sample)."""

from __future__ import annotations

from torch.utils.data import Dataset

from .fashion_mnist import DEFAULT_ROOT, FashionMNISTImages, MaskFn, load_fashion_mnist
from .moving import MOTION_CLASSES, MovingFashionMNIST
from .sampler import EpochSampler
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_crop_resize,
    multi_scale_crop_params,
    normalize,
    random_resized_crop_params,
    sample_seed,
)

DATASETS: dict[str, int] = {"fashion_mnist": 10, "moving_fashion_mnist": len(MOTION_CLASSES)}  # name -> classes


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}")


def num_classes_of(name: str) -> int:
    """Number of classes of dataset ``name`` (10 for fashion_mnist, 6 for moving_fashion_mnist)."""
    _check_name(name)
    return DATASETS[name]


def build_dataset(
    name: str,
    *,
    root: str | None = None,
    split: str,
    input_size: int,
    num_frames: int,
    seed: int,
    train: bool,
    mask_fn: MaskFn | None = None,
    size: int = 0,
) -> Dataset:
    """Build a dataset by name; ``root=None`` means the Debian path. ``num_frames`` is ignored for images (T=1)."""
    _check_name(name)
    root = DEFAULT_ROOT if root is None else root
    if name == "fashion_mnist":
        return FashionMNISTImages(root, split, input_size, seed, train=train, mask_fn=mask_fn, size=size)
    return MovingFashionMNIST(root, split, num_frames, input_size, seed, train=train, mask_fn=mask_fn, size=size)


__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOTION_CLASSES",
    "EpochSampler",
    "FashionMNISTImages",
    "MaskFn",
    "MovingFashionMNIST",
    "apply_crop_resize",
    "build_dataset",
    "load_fashion_mnist",
    "multi_scale_crop_params",
    "normalize",
    "num_classes_of",
    "random_resized_crop_params",
    "sample_seed",
]
