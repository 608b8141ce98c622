"""The decode check (amd_fast/data/decode_check.py) on the generated corpus of codec / container classes found in the
wild (amd_fast/data/corpus.py): every frame a read returns is the frame a sequential decode gives at that index, or
the window / file is skipped and reported."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_video import VIDEO_TINY as VIDEO_TINY_BASE
from torch.utils.data import DataLoader

from amd_fast.config import load_config
from amd_fast.data import (
    DamagedWindow,
    DecodeCheck,
    EpochSampler,
    FileClips,
    SkipLog,
    collate_clips,
    file_worker_init,
    parse_video_list,
    select_decoder,
)
from amd_fast.data import decode_check as dc
from amd_fast.data.corpus import sequential_frames, verify, windows, write_corpus
from amd_fast.data.decoders import PyAVDecoder, available
from amd_fast.pretraining import pretrain_task
from amd_fast.trainer import Trainer

pytest.importorskip("av", reason="the video extra is not installed (pip install -e .[video])")

DECODERS = [d for d in ("torchcodec", "decord", "pyav", "dali") if available(d)] + (
    ["dali pipeline"] if available("dali") else []
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> (path, every frame of a sequential decode); the corpus's list.txt."""
    root = tmp_path_factory.mktemp("corpus")
    files = {spec.name: (path, sequential_frames(path)) for spec, path in write_corpus(root)}
    return files, root / "list.txt"


def _decoder(name):
    from amd_fast.data.dali import RequestReader

    return RequestReader("cpu") if name == "dali pipeline" else select_decoder(name)


@pytest.mark.parametrize("name", DECODERS)
def test_every_window_of_every_file_is_the_frame_asked_for_or_skipped(corpus, name, tmp_path):
    """Random windows, a spread pick and the last frames of each file, through the decoder alone and checked."""
    files, _ = corpus
    dec = _decoder(name)
    cells = {}
    for fname, (path, ref) in files.items():
        v = verify(dec, path, ref, windows(len(ref), 6, seed=len(fname)), str(tmp_path))
        cells[fname] = v.cell
        assert v.checked_wrong == 0, (fname, v)  # the contract
        # Wrong frames the decoder alone returns, the check caught: another path for the file. (A decoder that only
        # fails now and then -- decord's read-ahead on a cut file -- is the contract's case: each checked read is
        # right or a reported skip.)
        if v.raw_wrong > v.raw_errors:
            assert v.mode != dec.name, (fname, v)
        if v.mode == "bad":
            assert v.note, v
        assert v.frames <= len(ref)
    print(name, json.dumps(cells, indent=1))


# ---------------------------------------------------------------------------------------------
# the check against decoders that are wrong in known ways (deterministic, whatever the installed builds do)


class _Wrong:
    """PyAV's sequential decoder, then made wrong: frames shifted by one, junk after frame 30, or no last frame."""

    def __init__(self, how: str) -> None:
        self.name, self.how, self.inner = f"wrong-{how}", how, PyAVDecoder()

    def read(self, path, pick):
        seen = {}

        def shifted(n):
            seen["idx"] = pick(n)
            seen["n"] = n
            return [min(i + 1, n - 1) for i in seen["idx"]] if self.how == "shift" else seen["idx"]

        frames = self.inner.read(path, shifted)
        if self.how == "junk":
            frames[torch.tensor(seen["idx"]) >= 30] = torch.tensor([28, 228, 28], dtype=torch.uint8)
        if self.how == "no-last" and seen["n"] - 1 in seen["idx"]:
            raise RuntimeError("Requested next frame while there are no more frames left to decode.")
        return frames


@pytest.mark.parametrize("how", ["shift", "junk", "no-last"])
def test_a_decoder_that_returns_other_frames_is_replaced_by_an_exact_path(corpus, how, tmp_path):
    files, _ = corpus
    path, ref = files["h264_420.mp4"]
    check = DecodeCheck(_Wrong(how), str(tmp_path))
    rec = check.check(str(path))
    assert rec.mode == "pyav-seek", rec  # PyAV's exact seek passes the probes (same build: exact)
    assert rec.why.startswith("does not give the frames of a sequential decode")
    if how == "shift":
        assert "looks like frame" in rec.why
    for idx in windows(len(ref), 8) + [[89, 3, 50, 50]]:  # out of order and repeated too
        assert np.array_equal(check.read(str(path), lambda n, idx=idx: idx).numpy(), ref[idx])
    assert "decoded by pyav-seek instead" in check.note(str(path)) and check.note(str(path)) == ""  # once


def test_mismatch_tolerates_conversion_noise_not_a_neighbour_frame(corpus):
    path, ref = corpus[0]["h264_420.mp4"]
    scan = dc.reference_scan(str(path))
    p = scan.targets[1]
    noisy = np.clip(ref[p].astype(int) + np.random.default_rng(0).integers(-4, 5, ref[p].shape), 0, 255)
    assert dc.mismatch(noisy.astype(np.uint8), scan, p, exact=False) == ""  # within TOL_MEAN
    assert dc.mismatch(noisy.astype(np.uint8), scan, p, exact=True) != ""  # the same build: exact
    assert "looks like frame" in dc.mismatch(ref[p + 1], scan, p, exact=False)
    assert dc.mismatch(np.zeros_like(ref[p]), scan, p, exact=False).startswith(f"frame {p}: mean |diff|")


# ---------------------------------------------------------------------------------------------
# frame counts, damage, the cache


def test_frame_count_is_what_decodes_not_what_the_container_declares(corpus, tmp_path):
    """An AVI cut at 2/3 of its bytes: its header declares 90 frames; the windows stay within those that decode."""
    path, ref = corpus[0]["mjpeg_truncated.avi"]
    with pytest.raises(Exception, match="Invalid data found"):  # unchecked: the last declared frames do not decode
        PyAVDecoder().read(str(path), lambda n: list(range(n - 8, n)))
    check = DecodeCheck(PyAVDecoder(), str(tmp_path))
    rec = check.check(str(path))
    assert (rec.declared, rec.frames) == (90, len(ref)) and len(ref) < 80
    assert f"the container declares 90 frames, {len(ref)} decode" in rec.note("pyav")
    counts = []
    got = check.read(str(path), lambda n: counts.append(n) or list(range(n - 8, n)))
    assert counts == [len(ref)] and np.array_equal(got.numpy(), ref[-8:])


def test_damaged_windows_are_skipped_named_and_logged_once(corpus, tmp_path, caplog):
    """The damaged slice: windows touching it are skipped with the frames and FFmpeg's message; the rest is used."""
    files, _ = corpus
    path, ref = files["h264_corrupt_slice.mp4"]
    check = DecodeCheck(select_decoder(DECODERS[0] if DECODERS[0] != "dali pipeline" else "pyav"), str(tmp_path))
    rec = check.check(str(path))
    assert rec.mode == check.name and rec.damaged and any(e.startswith("h264:") for e in rec.errors), rec
    a, b = rec.damaged[0]
    assert a <= 32 <= b  # the damaged packet is frame 32's
    with pytest.raises(DamagedWindow, match=rf"touches frames {a}-{b}: decode errors reach frames {a}-{b} \(h264:"):
        check.read(str(path), lambda n: [a, a + 2])
    clean = [0, 2, 4, 6] if a > 6 else [b + 1, b + 3]
    assert np.array_equal(check.read(str(path), lambda n: clean).numpy(), ref[clean])
    # through the loader: the window is replaced, the file stays in use, the skip is logged once
    lst = tmp_path / "list.txt"
    lst.write_text(f"{path} 0\n{files['h264_420.mp4'][0]} 1\n")
    ds = FileClips(parse_video_list(lst), input_size=16, sampler=dc_sampler(), seed=0, check_cache=str(tmp_path))
    skips = SkipLog(ds.describe)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_clips, sampler=range(0, 40, 2), num_workers=1,
                        worker_init_fn=file_worker_init)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="amd_fast.data.video"):
        batches = list(skips.track(loader, epoch=0))
    assert skips.run_counts[0] >= 3  # drawn 20 times: a window of 15 frames in 90 often touches frames a-b
    assert 0 in {i for b_ in batches for i in b_["index"].tolist()}  # and the file is still trained on
    assert caplog.text.count(f"skipped bad file {path}: window") == 1  # once per file, counted in the summary
    assert f"decode check: {path}: decode errors reach frames {a}-{b}" in caplog.text
    assert f"{path} x{skips.run_counts[0]} (window" in caplog.text  # the epoch summary


def _repeat_cut_packet(src, dst, first: int) -> None:
    """``src`` remuxed with every packet from ``first`` on replaced by packet ``first`` cut to 4/5 of its bytes: the
    file's last frames each decode with the same FFmpeg error line."""
    import av

    with av.open(str(src)) as c:
        packets = [(bytes(p), p.pts, p.dts, p.time_base, p.is_keyframe) for p in c.demux(video=0) if p.size]
    cut = packets[first][0][: len(packets[first][0]) * 4 // 5]
    with av.open(str(src)) as ic, av.open(str(dst), mode="w") as oc:
        out = oc.add_stream_from_template(ic.streams.video[0])
        for j, (raw, pts, dts, tb, key) in enumerate(packets):
            p = av.Packet(cut if j >= first else raw)
            p.pts, p.dts, p.time_base, p.is_keyframe, p.stream = pts, dts, tb, key, out
            oc.mux(p)


def test_ffmpeg_messages_in_a_verdict_are_the_files_own(corpus, tmp_path):
    """PyAV's log handler is process-wide and holds back a line that repeats the one before, counting it, until
    another arrives: a file whose decode ended in repeated errors put them into the next file's verdict (cached, and
    shown in training's skip logs), and a file whose errors repeated the last ones logged reported none."""
    import av.logging

    files, _ = corpus
    repeats = tmp_path / "mjpeg_repeated_error.avi"
    _repeat_cut_packet(files["mjpeg.avi"][0], repeats, first=60)
    damaged = str(files["h264_corrupt_slice.mp4"][0])
    own = DecodeCheck(PyAVDecoder(), str(tmp_path / "a")).check(str(repeats)).errors
    assert own and all(e.startswith("mjpeg: ") for e in own), own
    assert DecodeCheck(PyAVDecoder(), str(tmp_path / "b")).check(str(repeats)).errors == own  # the same file again
    check = DecodeCheck(PyAVDecoder(), str(tmp_path / "c"))
    rec = check.check(damaged)
    assert rec.damaged and rec.errors and all(e.startswith("h264: ") for e in rec.errors), rec.errors
    assert "mjpeg" not in rec.note(check.name)
    # PyAV's logging turned on by the user: a decode outside the check leaves repeats held back; still the file's own
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        sequential_frames(repeats)
    finally:
        av.logging.set_level(level)
    assert DecodeCheck(PyAVDecoder(), str(tmp_path / "d")).check(damaged).errors == rec.errors


def dc_sampler():
    from amd_fast.data import ClipSampler

    return ClipSampler(8, 2)


def test_verdicts_are_shared_by_workers_and_reused_until_the_file_changes(corpus, tmp_path, monkeypatch):
    files, lst = corpus
    cache = tmp_path / "cache"
    ds = FileClips(parse_video_list(lst), input_size=16, sampler=dc_sampler(), seed=0, check_cache=str(cache),
                   decoder="pyav", check=False)  # fmt: skip
    list(DataLoader(ds, batch_size=1, collate_fn=collate_clips, sampler=range(len(ds)), num_workers=1))
    assert len(list(cache.glob("*.json"))) == len(files)  # written by the worker
    calls = []
    real = dc.reference_scan
    monkeypatch.setattr(dc, "reference_scan", lambda p: calls.append(p) or real(p))
    fresh = DecodeCheck(select_decoder("pyav"), str(cache))
    path = str(files["mpeg2_ps.mpg"][0])
    assert fresh.check(path).mode == "pyav" and calls == []  # from the worker's verdict
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1000))
    fresh.check(path)
    assert calls == [path]  # a changed file is checked again
    off = FileClips(parse_video_list(lst), input_size=16, sampler=dc_sampler(), decode_check=False, check=False)
    assert off.reader is off.decoder


# ---------------------------------------------------------------------------------------------
# a training run on the whole corpus

VIDEO_TINY = [*VIDEO_TINY_BASE, "train.log_interval=2"]  # tests/test_video.py's, logged more often


def test_training_on_the_whole_corpus_sees_only_the_frames_of_a_sequential_decode(corpus, tmp_path, caplog):
    """The trainer's own batches (default decoder, loader worker, skip log) == the clips of the sequential reference.

    The reference dataset decodes every file with PyAV from the start (``decoder=pyav``: frame i is the i-th frame
    decoded) and draws the same frames, crops and masks from the same seeds; the batches must be identical.
    """
    files, lst = corpus
    cfg = load_config(None, VIDEO_TINY + [f"data.list_file={lst}", f"train.output_dir={tmp_path}", "train.steps=6"])
    trainer = Trainer(cfg, pretrain_task)
    ds = trainer.dataset
    ref = FileClips(ds.entries, input_size=ds.input_size, sampler=ds.sampler, seed=ds.seed, mask_fn=ds.mask_fn,
                    num_sample=ds.num_sample, decoder="pyav", check=False)  # fmt: skip
    sampler = EpochSampler(len(ds), seed=cfg.train.seed)
    data = getattr(trainer, "task", trainer)  # what owns the loader (the pre-training task)
    fpb, seen = data.files_per_batch, set()
    batches = trainer.batches()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        gs = list(sampler)
        for b in range(data.batches_per_epoch):
            batch = next(batches)
            want = collate_clips([ref[g] for g in gs[b * fpb : (b + 1) * fpb]])
            assert torch.equal(batch["index"], want["index"])
            assert torch.equal(batch["video"], want["video"]), (epoch, b, batch["index"].tolist())
            seen.update(batch["index"].tolist())
    assert len(seen) >= len(files) // 2
    with caplog.at_level(logging.INFO):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run data summary"))
    print(summary)
    assert "decode check notes on" in summary
    assert f"decode check: {Path(lst).parent / 'mpeg2_ps.mpg'}: {select_decoder('auto').name}" in caplog.text or (
        select_decoder("auto").name == "pyav"
    )
