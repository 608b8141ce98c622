"""The DALI clip pipeline (data.loader=dali), run here on DALI's CPU operators over real VP9 files.

On a GPU the same pipeline decodes with NVDEC ("mixed"); that path is not exercised on this project's CPU machines.
"""

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from amd_fast.build import build_mask_generator
from amd_fast.config import ConfigError, MaskConfig, load_config
from amd_fast.data import DaliClips, SkipLog, build_dataset, collate_clips, file_worker_init, resolve_loader
from amd_fast.data.dali import ClipRequest
from amd_fast.data.decoders import available
from amd_fast.data.media import write_moving_clips
from amd_fast.pretraining import pretrain_task
from amd_fast.trainer import Trainer

pytest.importorskip("av", reason="the video extra is not installed (pip install -e .[video])")
pytestmark = pytest.mark.skipif(not available("dali"), reason="DALI is not installed (pip install nvidia-dali-cuda120)")

K = 2  # num_sample: two crops of each decoded clip


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_media")
    vp9 = write_moving_clips(root / "vp9", 6, codec="vp9", num_frames=24, height=48, width=64, gop=8)
    h264 = write_moving_clips(root / "h264", 1, codec="h264", num_frames=24, height=48, width=64, gop=8)
    return {"vp9": vp9, "h264": h264, "root": root}


def _clips(list_path, **kw):
    masks = build_mask_generator(MaskConfig(), "amd", (4, 4, 4))
    args = dict(split="train", input_size=32, num_frames=8, seed=3, train=True, mask_fn=masks, num_sample=K,
                list_file=str(list_path), frame_stride=2)  # fmt: skip
    return build_dataset("video_list", **{**args, **kw})


def test_pipeline_gives_the_torch_paths_clips(media):
    """Same samples, frames, crops and masks as the torch loader; pixels within DALI's YUV->RGB / resize rounding."""
    torch_ds, dali_ds = _clips(media["vp9"]), _clips(media["vp9"], defer_decode="cpu")
    assert dali_ds.decoder.name == "dali-cpu"
    dali = DaliClips(num_sample=K, input_size=32, max_batch=3)
    for start in (0, 3, 9):  # several batches through one pipeline
        g = list(range(start, start + 3))
        a = collate_clips([torch_ds[i] for i in g])
        b = dali(collate_clips([dali_ds[i] for i in g]))
        assert set(a) == set(b)
        for key in a:
            if key not in ("video", "skipped", "decode_notes"):
                assert torch.equal(a[key], b[key]), key
        assert b["video"].shape == a["video"].shape == (3 * K, 3, 8, 32, 32) and b["video"].dtype == torch.float32
        diff = (a["video"] - b["video"]).abs()
        # measured: mean 0.007, max 0.26 (normalized units; one uint8 level is ~0.017, the range ~4.6)
        assert diff.mean() < 0.03 and diff.max() < 0.6, (diff.mean(), diff.max())
        # and the two crops of a file differ (k crops of one decode, not one crop repeated)
        assert not torch.equal(b["video"][0], b["video"][1])


def test_bad_files_are_skipped_before_and_inside_dali(media, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    good = sorted(media["vp9"].parent.glob("clip_*.webm"))
    lines = [f"{p} 0" for p in good[:2]]
    (d / "random.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (d / "zero.webm").write_bytes(b"")
    h264 = next(media["h264"].parent.glob("clip_*.mp4"))
    lines += [f"{d / 'random.webm'} 0", f"{d / 'zero.webm'} 0", f"{h264} 0", f"{d / 'missing.webm'} 0"]
    lst = d / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    ds = _clips(lst, defer_decode="cpu")
    dali, skips = DaliClips(num_sample=K, input_size=32, max_batch=2, describe=ds.describe), SkipLog(ds.describe)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_clips, sampler=range(24), num_workers=1,
                        worker_init_fn=file_worker_init)  # fmt: skip
    batches = list(skips.track(map(dali, loader), epoch=0))
    assert len(batches) == 12 and all(b["video"].shape[0] == 2 * K for b in batches)
    assert {ds.describe(i) for b in batches for i in b["index"].tolist()} <= {str(p) for p in good[:2]}
    reasons = {ds.describe(i).rsplit("/", 1)[-1]: r for i, r in skips.reasons.items()}
    assert set(reasons) == {"random.webm", "zero.webm", h264.name, "missing.webm"}
    assert "codec h264 is not decoded by DALI's CPU variant" in reasons[h264.name]


def test_a_file_that_fails_inside_dali_is_replaced_and_counted(media, caplog):
    """A file whose container probes fine but whose decode fails: the batch is decoded file by file."""
    ds = _clips(media["vp9"], defer_decode="cpu")
    batch = collate_clips([ds[i] for i in range(3)])
    req = batch["request"][1]
    broken = ClipRequest(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8), req.frames, req.height,
                         req.width)  # fmt: skip
    batch["request"][1] = broken
    ids, index = batch["ids_vis_s"].clone(), batch["index"].clone()
    dali = DaliClips(num_sample=K, input_size=32, max_batch=3, describe=ds.describe)
    with caplog.at_level(logging.INFO, logger="amd_fast.data.dali"):
        out = dali(batch)
    assert "decoding its 3 files one by one" in caplog.text
    assert out["video"].shape == (3 * K, 3, 8, 32, 32)
    ((bad_index, reason),) = out["skipped"]
    assert bad_index == int(index[K]) and reason.startswith("DALI decode: Assert")
    assert "Failed to create video decoder" in reason
    # file 1's clips, masks, labels and index are file 2's now (the next good file of the batch)
    assert torch.equal(out["video"][K : 2 * K], out["video"][2 * K :])
    assert torch.equal(out["ids_vis_s"][K : 2 * K], ids[2 * K :]) and torch.equal(out["ids_vis_s"][:K], ids[:K])
    assert torch.equal(out["index"][K : 2 * K], out["index"][2 * K :])


def test_loader_choice_and_config_checks(caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="amd_fast.data.dali"):
        assert resolve_loader("auto", "video_list", cpu) is None  # auto: DALI only on CUDA
        assert resolve_loader("dali", "video_list", cpu) == "cpu"
    assert "data loader: torch DataLoader workers" in caplog.text
    assert "data loader: DALI pipeline on the cpu (CPU decode: mjpeg/vp8/vp9 only; forced" in caplog.text
    with pytest.raises(ConfigError, match="data.loader=dali decodes video files: it needs data.dataset=video_list"):
        load_config(None, ["data.loader=dali", "data.dataset=moving_fashion_mnist"])
    with pytest.raises(ConfigError, match="data.loader='nvdec' is not allowed"):
        load_config(None, ["data.loader=nvdec"])


TINY = [
    "data.dataset=video_list", "data.input_size=16", "data.num_frames=4", "data.frame_stride=2", "data.batch_size=4",
    f"data.num_sample={K}", "data.num_workers=1", "model.arch=custom", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.patch_size=8", "model.tubelet_size=2", "decoder.embed_dim=16", "decoder.depth=1",
    "decoder.num_heads=2", "objective.name=mae", "mask.student_ratio=0.75", "optim.base_lr=0.02",
    "train.warmup_steps=1", "train.log_interval=1", "train.tensorboard=false", "train.progress=false",
    "train.threads=1", "train.save_interval=100", "train.steps=3",
    # forced, never `auto` (bf16 on a CPU with AMX, fp32 without): the test must not depend on the CPU
    "train.autocast=off", "teacher.dtype=float32",
]  # fmt: skip


def test_trainer_with_the_dali_loader_matches_the_torch_loader(media, tmp_path):
    losses = {}
    for loader in ("torch", "dali"):
        out = tmp_path / loader
        cfg = load_config(None, TINY + [f"data.list_file={media['vp9']}", f"data.loader={loader}",
                                        f"train.output_dir={out}", "objective.norm_pix_loss=false"])  # fmt: skip
        trainer = Trainer(cfg, pretrain_task)
        assert (trainer.task.dali is not None) == (loader == "dali")
        trainer.train()
        losses[loader] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["dali"]) == 3
    # same samples, crops and masks; the pixels differ by DALI's rounding only (raw-pixel targets: per-patch
    # standardized ones magnify that rounding in the flat black background)
    np.testing.assert_allclose(losses["dali"], losses["torch"], rtol=2e-2)  # measured: 0.7% apart


def test_stream_decodes_ahead_and_recovers_from_a_failed_batch(media):
    """stream (one batch in flight) == batch by batch; a broken batch in the middle costs nothing after it."""
    ds = _clips(media["vp9"], defer_decode="cpu")

    def batches():
        out = [collate_clips([ds[g], ds[g + 1]]) for g in (0, 2, 4, 6)]
        r = out[1]["request"][0]
        out[1]["request"][0] = ClipRequest(np.zeros(3000, dtype=np.uint8), r.frames, r.height, r.width)
        return out

    one = DaliClips(num_sample=K, input_size=32, max_batch=2, describe=ds.describe)
    expected = [one(b) for b in batches()]
    streamed = list(DaliClips(num_sample=K, input_size=32, max_batch=2, describe=ds.describe).stream(batches()))
    assert len(streamed) == 4
    for a, b in zip(expected, streamed):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
        assert a["skipped"] == b["skipped"]
    assert [len(b["skipped"]) for b in streamed] == [0, 1, 0, 0]
