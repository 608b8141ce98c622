"""Tests for amd_fast.data: idx parsing, per-sample determinism, augmentations, sampler, moving clips."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amd_fast.data import (
    DATASETS,
    DEFAULT_ROOT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOTION_CLASSES,
    EpochSampler,
    FashionMNISTImages,
    MovingFashionMNIST,
    apply_crop_resize,
    build_dataset,
    load_fashion_mnist,
    multi_scale_crop_params,
    normalize,
    random_resized_crop_params,
    sample_seed,
)
from amd_fast.data.moving import motion_trajectory, render_clip

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def unnormalize(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] normalized -> [3, T, H, W] in pixel units [0, 1]."""
    return video * STD + MEAN


def _write_idx(path, magic: int, arr: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------------------------------------------------
# idx parsing


def test_load_real_splits():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(DEFAULT_ROOT, split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        # Fashion-MNIST is exactly class balanced.
        assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        mean = images.float().mean().item()
        assert 65.0 < mean < 80.0  # known pixel mean ~72.9 / 255 = 0.286
        assert images.max().item() == 255 and images.min().item() == 0
    # Cached: a second call returns the very same tensors.
    assert load_fashion_mnist(DEFAULT_ROOT, "test")[0] is load_fashion_mnist(DEFAULT_ROOT, "test")[0]


def test_idx_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    lbls = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, lbls)
    images, labels = load_fashion_mnist(str(tmp_path), "test")
    assert torch.equal(images, torch.from_numpy(imgs))
    assert labels.tolist() == lbls.astype(np.int64).tolist()

    # Missing files: clear message naming the path and the Debian package.
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as exc:
        load_fashion_mnist(str(tmp_path), "train")
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(exc.value)

    # Wrong magic (labels file where images are expected).
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_idx(bad / "t10k-images-idx3-ubyte.gz", 2049, lbls)
    _write_idx(bad / "t10k-labels-idx1-ubyte.gz", 2049, lbls)
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist(str(bad), "test")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(DEFAULT_ROOT, "val")


# ---------------------------------------------------------------------------------------------------------------------
# transforms


def test_sample_seed_stable_and_spread():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    seeds = {sample_seed(s, g) for s in range(4) for g in range(500)}
    assert len(seeds) == 2000
    assert all(0 <= x < 2**63 for x in seeds)
    # Pinned values: seeds must not change between versions/processes (unlike Python's salted hash()).
    assert sample_seed(1, 2) == 3611581043949166530
    assert sample_seed(0, 0) == 7120306904099482837
    assert sample_seed(1, 2) != sample_seed(2, 1)


def _allowed_256_to_224() -> tuple[set[tuple[int, int]], dict[tuple[int, int], set[tuple[int, int]]]]:
    # Hand-derived: crop sides int(256 * s) = 256, 224, 192, 168; pairs with |i - j| <= 1.
    sides = [256, 224, 192, 168]
    pairs = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}  # (crop_h, crop_w)
    grid13 = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    offsets = {}
    for ch, cw in pairs:
        ws, hs = (256 - cw) // 4, (256 - ch) // 4
        offsets[(ch, cw)] = {(b * hs, a * ws) for a, b in grid13}  # (top, left) from (w_units, h_units)
    return pairs, offsets


def test_multi_scale_crop_allowed_set_and_coverage():
    pairs, offsets = _allowed_256_to_224()
    assert len(pairs) == 10
    gen = torch.Generator().manual_seed(0)
    seen_pairs, seen_offsets = set(), set()
    for _ in range(3000):
        top, left, ch, cw = multi_scale_crop_params(gen, 256, 256, 224)
        assert (ch, cw) in pairs
        assert (top, left) in offsets[(ch, cw)]
        assert 0 <= top <= 256 - ch and 0 <= left <= 256 - cw
        seen_pairs.add((ch, cw))
        if (ch, cw) == (168, 168):
            seen_offsets.add((top, left))
    assert seen_pairs == pairs
    assert seen_offsets == offsets[(168, 168)] and len(seen_offsets) == 13
    # (top=0, left=step) is NOT one of the 13 fixed positions.
    assert (0, 22) not in offsets[(168, 168)]


def test_multi_scale_crop_snap_and_bounds():
    gen = torch.Generator().manual_seed(1)
    # 258 * 0.875 = 225.75 -> int 225, snapped to 224 (within 3 px).
    sizes = {multi_scale_crop_params(gen, 258, 258, 224)[2] for _ in range(500)}
    assert sizes == {258, 224, 193, 170}
    for h, w, out in ((300, 400, 224), (37, 37, 32), (64, 48, 40), (30, 30, 32)):
        for _ in range(500):
            top, left, ch, cw = multi_scale_crop_params(gen, h, w, out)
            assert 0 <= top <= h - ch and 0 <= left <= w - cw
            assert min(ch, cw) >= min(int(min(h, w) * 0.66), out)  # smallest scale (or snapped to out)
            assert abs(ch - cw) <= int(min(h, w) * 0.875) - int(min(h, w) * 0.66) + 3  # max_distort=1


def test_random_resized_crop_params():
    gen = torch.Generator().manual_seed(2)
    for _ in range(1000):
        top, left, ch, cw = random_resized_crop_params(gen, 28, 28, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 28 - ch and 0 <= left <= 28 - cw
        # Rounding to whole pixels loosens the bounds a little on a 28 px image.
        assert 0.2 * 784 * 0.8 <= ch * cw <= 784
        assert 3 / 4 * 0.8 <= cw / ch <= 4 / 3 / 0.8
    # Impossible scale -> torchvision's center-crop fallback (whole square image).
    assert random_resized_crop_params(gen, 28, 28, (2.0, 3.0), (3 / 4, 4 / 3)) == (0, 0, 28, 28)
    # Wide image, impossible scale -> center crop at the max ratio.
    assert random_resized_crop_params(gen, 10, 40, (2.0, 3.0), (3 / 4, 4 / 3)) == (0, 13, 10, 13)


def test_apply_crop_resize_and_normalize():
    video = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    same = apply_crop_resize(video, 2, 1, 4, 5, (4, 5))
    assert torch.equal(same, video[:, :, 2:6, 1:6])
    up = apply_crop_resize(video, 0, 0, 4, 4, 8)
    assert up.shape == (2, 3, 8, 8)
    # Bilinear upsampling of a linear ramp stays within the crop's value range.
    assert up.min() >= video[:, :, :4, :4].min() and up.max() <= video[:, :, :4, :4].max()
    with pytest.raises(ValueError):
        apply_crop_resize(video, 6, 0, 4, 4, 4)
    x = torch.rand(1, 2, 4, 4)
    y = normalize(x)
    assert y.shape == (3, 2, 4, 4)
    for c in range(3):
        assert torch.allclose(y[c], (x[0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST images


def test_images_shapes_and_determinism():
    ds = FashionMNISTImages(DEFAULT_ROOT, "test", input_size=32, seed=3, train=True)
    n = len(ds)
    assert n == 10000
    a, b = ds[17], FashionMNISTImages(DEFAULT_ROOT, "test", input_size=32, seed=3, train=True)[17]
    assert a["video"].shape == (3, 1, 32, 32) and a["video"].dtype == torch.float32
    assert a["label"].dtype == torch.int64 and a["label"].dim() == 0
    assert a["index"].dtype == torch.int64 and a["index"].item() == 17
    for k in a:
        assert torch.equal(a[k], b[k])
    # Same image in later epochs (g = i + e * n): same label/index, different augmentation.
    views = [ds[17 + e * n] for e in range(8)]
    assert all(v["index"].item() == 17 and v["label"].item() == a["label"].item() for v in views)
    distinct = {v["video"].numpy().tobytes() for v in views}
    assert len(distinct) == 8
    # A different seed changes the augmentation of the same g.
    other = FashionMNISTImages(DEFAULT_ROOT, "test", input_size=32, seed=4, train=True)[17]
    assert not torch.equal(other["video"], a["video"])
    # Channels are the replicated grayscale image.
    raw = unnormalize(a["video"])
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)


def test_images_eval_exact_and_normalization_stats():
    ds = FashionMNISTImages(DEFAULT_ROOT, "test", input_size=28, seed=0, train=False, size=500)
    assert len(ds) == 500
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    videos = torch.stack([ds[i]["video"] for i in range(500)])  # [B, 3, 1, 28, 28]
    # Eval at native size is the exact image, normalized.
    assert torch.allclose(unnormalize(videos[7])[:, 0], images[7].float().div(255).expand(3, 28, 28), atol=1e-5)
    assert ds[7]["label"].item() == labels[7].item()
    # Fashion-MNIST pixel stats ~ mean 0.286, std 0.353 -> normalized channel stats.
    for c in range(3):
        ch = videos[:, c]
        assert abs(ch.mean().item() - (0.286 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]) < 0.05
        assert abs(ch.std().item() - 0.353 / IMAGENET_STD[c]) < 0.05
    # Resized eval view keeps the same global statistics.
    big = FashionMNISTImages(DEFAULT_ROOT, "test", input_size=56, seed=0, train=False, size=50)
    v56 = torch.stack([big[i]["video"] for i in range(50)])
    assert v56.shape == (50, 3, 1, 56, 56)
    assert abs(v56[:, 0].mean().item() - videos[:50, 0].mean().item()) < 0.02
    with pytest.raises(ValueError):
        FashionMNISTImages(DEFAULT_ROOT, "test", input_size=28, size=10001)


def test_mask_fn_merged():
    def mask_fn(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"ids_vis": torch.randperm(64, generator=gen)[:16].sort().values}

    for ds in (
        FashionMNISTImages(DEFAULT_ROOT, "test", input_size=32, seed=0, mask_fn=mask_fn),
        MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=4, input_size=32, seed=0, mask_fn=mask_fn),
    ):
        a, b, c = ds[3], ds[3], ds[4]
        assert set(a) == {"video", "label", "index", "ids_vis"}
        assert a["ids_vis"].dtype == torch.int64 and a["ids_vis"].shape == (16,)
        assert torch.equal(a["ids_vis"], b["ids_vis"]) and not torch.equal(a["ids_vis"], c["ids_vis"])
    clash = FashionMNISTImages(DEFAULT_ROOT, "test", input_size=32, seed=0, mask_fn=lambda g: {"label": torch.zeros(1)})
    with pytest.raises(ValueError, match="label"):
        clash[0]


# ---------------------------------------------------------------------------------------------------------------------
# sampler


def test_sampler_partitions_epoch():
    n, world = 103, 4
    shares = []
    for rank in range(world):
        s = EpochSampler(n, seed=7, rank=rank, world_size=world)
        s.set_epoch(2)
        idx = list(s)
        assert len(idx) == len(s) == n // world
        assert all(2 * n <= g < 3 * n for g in idx)
        shares.append(idx)
    flat = [g for share in shares for g in share]
    assert len(set(flat)) == len(flat) == (n // world) * world  # disjoint, 3 samples dropped
    # Interleaving the rank shares rebuilds the (truncated) shared permutation.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + 2))[:100]
    rebuilt = [shares[j % world][j // world] - 2 * n for j in range(100)]
    assert rebuilt == perm.tolist()


def test_sampler_epochs_differ_and_resume():
    s = EpochSampler(50, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(50)) and sorted(g - 50 for g in e1) == list(range(50))
    assert [g - 50 for g in e1] != e0
    assert list(EpochSampler(50, seed=0)) == e0  # reproducible across instances
    for k in (0, 1, 17, 50):
        s.set_epoch(1)
        s.set_start(k)
        assert list(s) == e1[k:] and len(s) == 50 - k
    s.set_epoch(1)  # resets the start offset
    assert list(s) == e1
    with pytest.raises(ValueError):
        s.set_start(51)
    ordered = EpochSampler(10, seed=0, rank=1, world_size=3, shuffle=False)
    ordered.set_epoch(1)
    assert list(ordered) == [11, 14, 17]


def test_loader_workers_match_main_process():
    ds = MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=4, input_size=32, seed=5, train=True, size=12)
    sampler = EpochSampler(len(ds), seed=5)
    sampler.set_epoch(3)
    ref = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0))
    got = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2))
    assert len(ref) == len(got) == 3
    assert ref[0]["video"].shape == (4, 3, 4, 32, 32)
    for a, b in zip(ref, got, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------------------------------
# moving Fashion-MNIST


def _frame_stats(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """video [3, T, H, W] -> per-frame (mass, com_x, com_y)."""
    frames = unnormalize(video)[0].clamp(min=0)  # [T, H, W]
    mass = frames.sum((1, 2))
    ys = torch.arange(frames.shape[1], dtype=torch.float32) + 0.5
    xs = torch.arange(frames.shape[2], dtype=torch.float32) + 0.5
    com_x = (frames.sum(1) * xs).sum(-1) / mass
    com_y = (frames.sum(2) * ys).sum(-1) / mass
    return mass, com_x, com_y


def _items_per_class(ds: MovingFashionMNIST, per_class: int) -> dict[int, list[dict[str, torch.Tensor]]]:
    found: dict[int, list[dict[str, torch.Tensor]]] = {c: [] for c in range(ds.num_classes)}
    for g in range(400):
        item = ds[g]
        c = item["label"].item()
        if len(found[c]) < per_class:
            found[c].append(item)
        if all(len(v) == per_class for v in found.values()):
            return found
    raise AssertionError(f"not all classes found: { {c: len(v) for c, v in found.items()} }")


@pytest.mark.parametrize("train", [False, True])
def test_moving_motion_matches_label(train):
    size, T = 64, 8
    ds = MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=T, input_size=size, seed=11, train=train)
    for label, items in _items_per_class(ds, per_class=4 if not train else 2).items():
        for item in items:
            assert item["video"].shape == (3, T, size, size) and item["video"].dtype == torch.float32
            mass, cx, cy = _frame_stats(item["video"])
            assert (mass > 0).all()
            dx, dy = (cx[-1] - cx[0]).item(), (cy[-1] - cy[0]).item()
            ratio = (mass[-1] / mass[0]).item()
            name = MOTION_CLASSES[label]
            if name in ("right", "left", "down", "up"):
                along, perp = (dx, dy) if name in ("right", "left") else (dy, dx)
                sign = 1 if name in ("right", "down") else -1
                assert sign * along > 0.1 * size, (name, dx, dy)
                assert abs(perp) < 0.3 * abs(along), (name, dx, dy)
                if not train:  # train crops may cut off the part of the object leaving the view
                    assert 0.6 < ratio < 1 / 0.6, (name, ratio)
            else:
                grow = ratio if name == "grow" else 1 / ratio
                assert grow > (1.5 if not train else 1.2), (name, ratio)
                assert abs(dx) < 0.1 * size and abs(dy) < 0.1 * size, (name, dx, dy)


def test_moving_determinism_and_label_independent_of_garment():
    ds = MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=4, input_size=32, seed=0, train=True, size=100)
    assert len(ds) == 100
    a, b = ds[42], MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=4, input_size=32, seed=0, size=100)[42]
    for k in a:
        assert torch.equal(a[k], b[k])
    # The same garment (i = 42) shows every kind of motion across epochs: labels are not appearance.
    labels = {ds[42 + e * 100]["label"].item() for e in range(40)}
    assert labels == set(range(6))
    assert all(ds[42 + e * 100]["index"].item() == 42 for e in range(3))
    # Pixels are a sub-pixel-rendered garment on black: background is exactly 0, values within [0, 1].
    raw = unnormalize(ds[7]["video"])
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    assert (raw[0].abs() < 1e-5).float().mean() > 0.3
    eval_ds = MovingFashionMNIST(DEFAULT_ROOT, "test", num_frames=4, input_size=32, seed=0, train=False, num_classes=4)
    assert {eval_ds[g]["label"].item() for g in range(60)} == {0, 1, 2, 3}


def test_folded_crop_matches_render_then_crop_resize():
    # The train path folds the multi-scale crop into rendering; it must match rendering the full canvas and then
    # cropping + resizing it (up to the second resampling's blur).
    garment_SS = load_fashion_mnist(DEFAULT_ROOT, "test")[0][3].float() / 255
    gen = torch.Generator().manual_seed(0)
    canvas, out = 74, 64
    for label in range(6):
        cx, cy, side = motion_trajectory(gen, label, 5, canvas)
        crop = multi_scale_crop_params(gen, canvas, canvas, out)
        folded = render_clip(garment_SS, cx, cy, side, out, crop)
        full = render_clip(garment_SS, cx, cy, side, canvas)  # [T, canvas, canvas]
        explicit = apply_crop_resize(full.unsqueeze(0), *crop, out)[0]
        assert folded.shape == explicit.shape == (5, out, out)
        assert (folded - explicit).abs().mean() < 0.01
        assert torch.allclose(folded.sum((1, 2)), explicit.sum((1, 2)), rtol=0.04)


def test_build_dataset_dispatch():
    kw = {"root": DEFAULT_ROOT, "split": "test", "input_size": 32, "num_frames": 4, "seed": 0, "train": False}
    kw["size"] = 10
    img = build_dataset("fashion_mnist", **kw)
    vid = build_dataset("moving_fashion_mnist", **kw)
    assert isinstance(img, FashionMNISTImages) and isinstance(vid, MovingFashionMNIST)
    assert img[0]["video"].shape == (3, 1, 32, 32) and vid[0]["video"].shape == (3, 4, 32, 32)
    assert DATASETS == {"fashion_mnist": 10, "moving_fashion_mnist": 6}  # classes per synthetic dataset
    with pytest.raises(ValueError, match="moving_fashion_mnist"):
        build_dataset("kinetics", **kw)
    assert len(vid) == len(img) == 10
