"""Datasets, augmentations and samplers (all items indexed by global sample index, seeded per sample)."""

from __future__ import annotations

from torch.utils.data import Dataset

from .dali import LOADERS, DaliClips, resolve_loader
from .decode_check import DecodeCheck, FileCheck
from .decoders import DECODERS, BadVideo, DamagedWindow, select_decoder
from .fashion_mnist import DEFAULT_ROOT, FashionMNISTImages, MaskFn, load_fashion_mnist
from .lists import Entry, parse_video_list, scan_image_folder
from .moving import MOTION_CLASSES, MovingFashionMNIST
from .sampler import EpochSampler, epoch_batches
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_crop_resize,
    multi_scale_crop_params,
    normalize,
    random_resized_crop_params,
    sample_seed,
)
from .video import ClipSampler, FileClips, SkipLog, collate_clips, file_worker_init

DATASETS: dict[str, int] = {"fashion_mnist": 10, "moving_fashion_mnist": len(MOTION_CLASSES)}  # name -> classes
FILE_DATASETS = ("video_list", "image_folder")  # classes come from the list / the folder names


def _check_name(name: str) -> None:
    if name not in DATASETS and name not in FILE_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {sorted([*DATASETS, *FILE_DATASETS])}")


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
    list_file: str = "",
    prefix: str = "",
    sampling: str = "dense",
    frame_stride: int = 4,
    num_sample: int = 1,
    decoder: str = "auto",
    test_views: tuple[int, int] = (1, 1),
    min_crop_scale: float = 0.2,
    invert_prob: float = 0.0,
    defer_decode: str | None = None,
    decode_check: bool = True,
) -> Dataset:
    """Build a dataset by name; ``root=None`` means the Debian path. ``num_frames`` is ignored for images (T=1).

    ``video_list`` reads ``list_file`` (paths relative to ``prefix``); ``image_folder`` scans ``root``. Those two
    return ``FileClips`` items of ``num_sample`` clips each: batch them with ``collate_clips``.
    ``defer_decode`` (``cpu`` / ``gpu``, video_list training only): items carry decode requests for ``DaliClips``.
    ``decode_check`` (video_list): verify each file once against a sequential decode (``data/decode_check.py``).
    ``test_views=(clips, crops)`` (eval only): each item gives clips x crops views (file datasets: as its clips;
    moving_fashion_mnist: crops only, ``video`` [V, 3, T, H, W]); (1, 1) is the plain eval view.
    """
    views = None if train or tuple(test_views) == (1, 1) else tuple(test_views)
    if views is not None and (name == "fashion_mnist" or (name == "moving_fashion_mnist" and views[0] != 1)):
        raise ValueError(f"dataset {name!r} has no test views {views} (moving_fashion_mnist: crops only)")
    _check_name(name)
    if name in FILE_DATASETS:
        if name == "video_list":
            entries, kind = parse_video_list(list_file, prefix), "video"
            sampler = ClipSampler(num_frames, frame_stride, sampling)
        else:
            entries, kind, sampler = scan_image_folder(root)[0], "image", None
        if size:
            entries = entries[:size]
        return FileClips(
            entries, kind=kind, input_size=input_size, sampler=sampler, seed=seed, train=train, mask_fn=mask_fn,
            num_sample=num_sample, decoder=decoder, test_views=views, min_crop_scale=min_crop_scale,
            defer_decode=defer_decode, decode_check=decode_check,
        )  # fmt: skip
    root = DEFAULT_ROOT if root is None else root
    if name == "fashion_mnist":
        return FashionMNISTImages(
            root, split, input_size, seed, train=train, mask_fn=mask_fn, size=size, min_crop_scale=min_crop_scale
        )
    crops = 1 if views is None else views[1]
    return MovingFashionMNIST(
        root, split, num_frames, input_size, seed, train=train, mask_fn=mask_fn, size=size, test_crops=crops,
        invert_prob=invert_prob,
    )  # fmt: skip


def dataset_for(d, *, split: str, seed: int, train: bool, root: str | None = None, list_file: str | None = None,
                size: int | None = None, mask_fn: MaskFn | None = None, test_views: tuple[int, int] = (1, 1),
                defer_decode: str | None = None) -> Dataset:  # fmt: skip
    """`build_dataset` from a `DataConfig` section (`d`): every caller's data settings come from the config, and
    only what differs between splits is given (a test split's root / list / size, the views, the masks)."""
    return build_dataset(
        d.dataset, root=d.root if root is None else root, split=split, input_size=d.input_size,
        num_frames=d.num_frames, seed=seed, train=train, mask_fn=mask_fn, size=d.size if size is None else size,
        list_file=d.list_file if list_file is None else list_file, prefix=d.prefix, sampling=d.sampling,
        frame_stride=d.frame_stride, num_sample=d.num_sample if train else 1, decoder=d.decoder,
        test_views=test_views, min_crop_scale=d.min_crop_scale, invert_prob=d.invert_prob, defer_decode=defer_decode,
        decode_check=d.decode_check,
    )  # fmt: skip


__all__ = [
    "DECODERS",
    "LOADERS",
    "DaliClips",
    "resolve_loader",
    "FILE_DATASETS",
    "BadVideo",
    "DamagedWindow",
    "DecodeCheck",
    "FileCheck",
    "ClipSampler",
    "Entry",
    "FileClips",
    "SkipLog",
    "collate_clips",
    "file_worker_init",
    "parse_video_list",
    "scan_image_folder",
    "select_decoder",
    "DATASETS",
    "DEFAULT_ROOT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOTION_CLASSES",
    "EpochSampler",
    "epoch_batches",
    "FashionMNISTImages",
    "MaskFn",
    "MovingFashionMNIST",
    "apply_crop_resize",
    "build_dataset",
    "dataset_for",
    "load_fashion_mnist",
    "multi_scale_crop_params",
    "normalize",
    "random_resized_crop_params",
    "sample_seed",
]
