"""Video files and image folders from dataset lists: sampling, augmentation, repeated augmentation, bad-file skips.

Items are indexed by a global sample index ``g`` (``EpochSampler``); all randomness -- frame sampling, crops, the
substitute for a bad file, masks -- comes from ``torch.Generator().manual_seed(sample_seed(seed, g))``, so an item
is reproducible wherever it is made. With ``num_sample = k`` a clip is decoded once and gives k crops and masks
(METHOD.md section 6, VideoMAE / AMD ``num_sample``); ``collate_clips`` flattens a batch of B items into B*k clips.

Bad input loses nothing: a file that cannot give a clip (missing, empty, truncated, corrupt, unsupported codec,
shorter than the sampling window) is recorded and replaced by another entry drawn from the same generator (the
reference substitutes a random index silently). Every read goes through the decode check (``decode_check.py``): a
file is verified once against a sequential decode, decoded an exact way if the decoder returns other frames,
sampled within the frames that decode, and a window touching frames FFmpeg reported damaged is skipped like a bad
file (the rest of the file is used). The skips travel with the item (``"skipped"``: a list of ``(list index,
reason)``), and the check's note on a file (``"decode_notes"``), to the main process, where ``SkipLog`` names
each file once and sums the skips up per epoch.

Layout: frames are decoded as ``uint8 [T, H, W, 3]``; crops are resized in uint8 (PIL-style antialiased bilinear,
as the reference's per-frame PIL resize), then normalized once into ``float32 [3, T, S, S]`` per clip.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from .dali import ClipRequest, RequestReader
from .decode_check import DecodeCheck
from .decoders import BadVideo, DamagedWindow, available, reason_of, select_decoder
from .fashion_mnist import MaskFn
from .lists import Entry
from .transforms import IMAGENET_MEAN, IMAGENET_STD, multi_scale_crop_params, random_resized_crop_params, sample_seed

log = logging.getLogger(__name__)

MAX_TRIES = 32  # substitutes per item before giving up; with half the list bad, failing all is p = 2^-32
MSC_SCALES = (1, 0.875, 0.75, 0.66)  # VideoMAE GroupMultiScaleCrop scales (METHOD.md section 6)
RRC_SCALE = (0.2, 1.0)  # images: RandomResizedCrop scale of MAE / AMD image pre-training
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


@dataclass(frozen=True)
class ClipSampler:
    """Which frames of an ``n``-frame video make a clip of ``num_frames``.

    ``dense``: consecutive frames at ``stride`` from a uniform random start (VideoMAE Kinetics: 16 x 4; SSv2-like
    motion data: 16 x 2); ``segments``: TSN -- the video cut into ``num_frames`` equal segments, one random frame
    from each (VideoMAE's SSv2 loader). Eval (``train=False``) takes the centered window / segment centers.
    A video shorter than the window (dense: ``(T-1)*stride+1`` frames; segments: ``T``) is a ``BadVideo``.
    """

    num_frames: int = 16
    stride: int = 4
    mode: str = "dense"

    @property
    def window(self) -> int:
        return (self.num_frames - 1) * self.stride + 1 if self.mode == "dense" else self.num_frames

    def _available(self, n: int, start: int, end: int) -> int:
        """Frames in [start, end] of an n-frame video; a range shorter than the window is a BadVideo."""
        last = n - 1 if end < 0 else min(end, n - 1)
        avail = last - start + 1
        if avail < self.window:
            raise BadVideo(f"too short: {avail} frames < sampling window {self.window}")
        return avail

    def __call__(self, n: int, gen: torch.Generator | None, start: int = 0, end: int = -1) -> list[int]:
        avail = self._available(n, start, end)
        T = self.num_frames
        if self.mode == "dense":
            slack = avail - self.window
            off = int(torch.randint(0, slack + 1, (1,), generator=gen)) if gen is not None else slack // 2
            return [start + off + self.stride * t for t in range(T)]
        seg = avail // T
        jitter = torch.randint(0, seg, (T,), generator=gen) if gen is not None else torch.full((T,), seg // 2)
        return [start + seg * t + int(j) for t, j in enumerate(jitter)]

    def views(self, n: int, clips: int, start: int = 0, end: int = -1) -> list[list[int]]:
        """Test views: ``clips`` clips spread over the video (VideoMAE's test sampling) -> clips x [num_frames].

        dense: window starts evenly spaced over the slack (one clip: the centered window); segments: the same
        segments, the frame taken at ``clips`` evenly spaced offsets inside each (VideoMAE's SSv2 test loader).
        """
        avail = self._available(n, start, end)
        T = self.num_frames
        if self.mode == "dense":
            slack = avail - self.window
            offs = [slack // 2] if clips == 1 else [round(slack * c / (clips - 1)) for c in range(clips)]
            return [[start + o + self.stride * t for t in range(T)] for o in offs]
        seg = avail / T
        return [[start + int(seg * t + seg * (c + 0.5) / clips) for t in range(T)] for c in range(clips)]


def view_crops(h: int, w: int, crops: int) -> list[tuple[int, int, int, int]]:
    """``crops`` squares of side min(h, w) spread along the long side (VideoMAE's 3-crop test; 1: the center)."""
    side = min(h, w)
    slack_h, slack_w = h - side, w - side
    fr = [0.5] if crops == 1 else [c / (crops - 1) for c in range(crops)]
    return [(round(slack_h * f), round(slack_w * f), side, side) for f in fr]


def _norm_params(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    # (x/255 - mean) / std == x * scale + bias, applied in one fused pass to the uint8 crop
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(3, 1, 1, 1)
    bias = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float32) / std).view(3, 1, 1, 1)
    return scale, bias


_SCALE, _BIAS = _norm_params()


def crop_resize_normalize(
    frames_THWC: torch.Tensor, crop: tuple[int, int, int, int], size: int, flip: bool = False
) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> crop (top, left, h, w), resize to ``size``, flip, normalize -> f32 [3, T, S, S].

    The resize runs on uint8 in channels-last layout (torch's vectorized antialiased bilinear, matching PIL's
    BILINEAR resize to within 1 level), so the float clip is made once, at output size.
    """
    top, left, ch, cw = crop
    x = frames_THWC[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2)  # [T, 3, h, w] view, channels-last
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    # uint8 -> float with the transpose to [3, T] in one copy, then an in-place affine: 2x faster than one
    # addcmul reading the channels-last uint8 (measured: 2.8 vs 5.3 ms for 16 x 224^2 on one thread).
    out = torch.empty((3, x.shape[0], size, size), dtype=torch.float32)
    out.copy_(x.permute(1, 0, 2, 3))
    return out.mul_(_SCALE).add_(_BIAS)


class FileClips(Dataset):
    """Clips (or images, T=1) from a list of files; see the module docstring.

    Item: ``{"video": k x f32 [3, T, S, S], "label": i64 [k], "index": i64 [k], <mask ids> [k, ...],
    "skipped": [(list index, reason), ...], "decode_notes": [(list index, note)]}``; use ``collate_clips`` to batch.
    ``decode_check`` (video): reads go through ``DecodeCheck``, whose verdicts are cached in ``check_cache``
    (None: ``~/.cache/amd_fast/decode_check``, or ``$AMD_FAST_CACHE/decode_check``).
    """

    def __init__(
        self,
        entries: list[Entry],
        *,
        kind: str = "video",
        input_size: int = 224,
        sampler: ClipSampler | None = None,
        seed: int = 0,
        train: bool = True,
        mask_fn: MaskFn | None = None,
        num_sample: int = 1,
        decoder: str = "auto",
        check: bool = True,
        test_views: tuple[int, int] | None = None,
        min_crop_scale: float = RRC_SCALE[0],
        defer_decode: str | None = None,
        decode_check: bool = True,
        check_cache: str | None = None,
    ) -> None:
        if kind not in ("video", "image"):
            raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
        if num_sample < 1:
            raise ValueError(f"num_sample must be >= 1, got {num_sample}")
        self.entries = entries
        self.kind = kind
        self.input_size = int(input_size)
        self.sampler = sampler or ClipSampler()
        self.seed = int(seed)
        self.train = train
        self.mask_fn = mask_fn
        self.num_sample = int(num_sample)
        # eval only: (clips, crops) views per file, returned as the item's clips (as num_sample's k crops)
        self.test_views = test_views if not train else None
        self.crop_scale = (float(min_crop_scale), 1.0)  # images: RandomResizedCrop's area range
        if self.test_views is not None and kind == "image" and self.test_views[0] != 1:
            raise ValueError(f"images have one temporal view; got test_views={test_views}")
        if defer_decode is not None and (kind != "video" or self.test_views is not None):
            raise ValueError("defer_decode (the DALI pipeline) makes training clips of videos, not images or views")
        # defer_decode "cpu" / "gpu": items carry ClipRequests that DaliClips decodes in the training process
        self.decoder = self.reader = None
        if kind == "video":
            self.decoder = RequestReader(defer_decode) if defer_decode else select_decoder(decoder)
            # reads go through the per-file decode check (decode_check.py), which needs PyAV's sequential decode
            self.reader = self.decoder
            if decode_check and available("pyav"):
                self.reader = DecodeCheck(self.decoder, check_cache)
            elif decode_check:
                log.warning("decode check off: it needs PyAV (pip install av); frames are not verified")
        self._bad: dict[int, str] = {}  # per process: entries known bad, not decoded again
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, i: int) -> str:
        return self.entries[i].path

    # -- loading --------------------------------------------------------------------------------

    def _load(self, i: int, gen: torch.Generator | None) -> torch.Tensor:
        """Entry i -> uint8 frames [T, H, W, 3]; raises on any bad input."""
        e = self.entries[i]
        try:
            size = os.path.getsize(e.path)
        except OSError:
            raise BadVideo("missing file") from None
        if size == 0:
            raise BadVideo("empty file")
        if self.kind == "image":
            from PIL import Image

            with Image.open(e.path) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).unsqueeze(0)
        if self.test_views is not None:  # all clips' frames in one decode, clip after clip
            clips = self.test_views[0]
            frames = self.reader.read(e.path, lambda n: sum(self.sampler.views(n, clips, e.start, e.end), []))
            want = clips * self.sampler.num_frames
        else:
            sample_gen = gen if self.train else None  # eval: the centered window
            frames = self.reader.read(e.path, lambda n: self.sampler(n, sample_gen, e.start, e.end))
            want = self.sampler.num_frames
        if frames.shape[0] != want:
            raise BadVideo(f"decoder returned {frames.shape[0]} frames, expected {want}")
        return frames

    def _try_load(self, i: int, gen: torch.Generator | None) -> tuple[torch.Tensor | None, str]:
        if i in self._bad:
            return None, self._bad[i]
        try:
            return self._load(i, gen), ""
        except Exception as exc:  # noqa: BLE001 -- any decoder failure is a bad file, never a dead run
            reason = reason_of(exc)
            if not isinstance(exc, DamagedWindow):  # a damaged window: other windows of the file are fine
                self._bad[i] = reason
            return None, reason

    def _note(self, i: int) -> list[tuple[int, str]]:
        """The decode check's note on entry i, the first time this process uses it (see SkipLog)."""
        note = self.reader.note(self.entries[i].path) if isinstance(self.reader, DecodeCheck) else ""
        return [(i, note)] if note else []

    def check(self) -> None:
        """Fail at start if no entry gives a clip: stat every file, then decode until one works."""
        missing = [i for i, e in enumerate(self.entries) if not os.path.isfile(e.path) or os.path.getsize(e.path) == 0]
        if missing:
            names = ", ".join(self.entries[i].path for i in missing[:5])
            log.warning("%d of %d list entries are missing or empty (skipped when drawn): %s%s",
                        len(missing), len(self), names, ", ..." if len(missing) > 5 else "")  # fmt: skip
        reasons = {}
        bad = set(missing)
        for i in range(len(self)):
            if i in bad:
                continue
            frames, reason = self._try_load(i, torch.Generator().manual_seed(self.seed))
            if frames is not None:
                self._bad.clear()  # re-checked (and counted) when drawn in training
                return
            reasons[i] = reason
        reasons.update({i: "missing or empty" for i in missing})
        shown = "; ".join(f"{self.entries[i].path}: {r}" for i, r in sorted(reasons.items())[:5])
        raise ValueError(
            f"none of the {len(self)} list entries can be read ({len(missing)} missing or empty"
            f"{'; ' + shown if shown else ''}). Check data.list_file / data.prefix / data.root and data.decoder."
        )

    # -- items ----------------------------------------------------------------------------------

    def _crop(self, gen: torch.Generator | None, h: int, w: int) -> tuple[tuple[int, int, int, int], bool]:
        S = self.input_size
        if not self.train:  # center square, resized
            side = min(h, w)
            return ((h - side) // 2, (w - side) // 2, side, side), False
        if self.kind == "image":
            crop = random_resized_crop_params(gen, h, w, self.crop_scale, RRC_RATIO)
            return crop, bool(torch.rand(1, generator=gen) < 0.5)
        return multi_scale_crop_params(gen, h, w, S, MSC_SCALES), False  # no flip for video (METHOD.md s6)

    def __getitem__(self, g: int) -> dict:
        g = int(g)
        gen = torch.Generator().manual_seed(sample_seed(self.seed, g))
        i = g % len(self)
        skipped = []
        for _ in range(MAX_TRIES):
            frames, reason = self._try_load(i, gen)
            if frames is not None:
                break
            skipped.append((i, reason))
            i = int(torch.randint(0, len(self), (1,), generator=gen))  # the substitute: deterministic in g
        else:
            raise RuntimeError(f"{MAX_TRIES} bad files in a row for sample {g}: {skipped[-3:]}; check the list")
        h, w = frames.shape[1:3]
        clips, masks = [], []
        if isinstance(frames, ClipRequest):  # the DALI pipeline decodes and crops; draw the same crops and masks
            crops = []
            for _ in range(self.num_sample):
                crops.append(self._crop(gen, h, w)[0])
                if self.mask_fn is not None:
                    masks.append(self.mask_fn(gen))
            item = self._item([None] * self.num_sample, masks, i, skipped)
            del item["video"]
            item["request"], item["crops"] = [frames], torch.tensor(crops, dtype=torch.int64)
            return item
        if self.test_views is not None:  # clips x crops views, each a clip of the item
            n_clips, n_crops = self.test_views
            T = frames.shape[0] // n_clips
            for c in range(n_clips):
                for crop in view_crops(h, w, n_crops):
                    clips.append(crop_resize_normalize(frames[c * T : (c + 1) * T], crop, self.input_size))
            return self._item(clips, [], i, skipped)
        for _ in range(self.num_sample):
            crop, flip = self._crop(gen, h, w)
            clips.append(crop_resize_normalize(frames, crop, self.input_size, flip))
            if self.mask_fn is not None:
                masks.append(self.mask_fn(gen))
        return self._item(clips, masks, i, skipped)

    def _item(self, clips: list[torch.Tensor], masks: list[dict], i: int, skipped: list) -> dict:
        k = len(clips)
        item = {
            "video": clips,  # k x float32 [3, T, S, S]; collate_clips stacks them once, into the batch
            "label": torch.full((k,), self.entries[i].label, dtype=torch.int64),
            "index": torch.full((k,), i, dtype=torch.int64),
        }
        for key in masks[0] if masks else ():
            if key in item:
                raise ValueError(f"mask_fn returned reserved key {key!r}")
            item[key] = torch.stack([m[key] for m in masks])
        item["skipped"] = skipped
        item["decode_notes"] = self._note(i) if self.kind == "video" else []
        return item


def file_worker_init(_worker_id: int = 0) -> None:
    """Loader-worker setup for file datasets: one torch thread, and keep freed memory in the worker's heap.

    Every clip allocates ~10 MB of float32 output (16 x 3 x 224^2), above glibc's mmap threshold, so each one would
    be fresh pages from the kernel, zero-filled and faulted in on first touch; with the thresholds raised the
    heap reuses them. Measured on this project's CPU box: 24 -> 13 ms per clip (k=1), 18 -> 8 ms (k=4).
    """
    torch.set_num_threads(1)  # workers are the parallelism; the training process keeps its threads for GEMMs
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)


def collate_clips(items: list[dict]) -> dict:
    """B items of k clips -> one batch of B*k clips (clips stacked, other tensors concatenated on dim 0).

    In a loader worker the video batch is written straight into shared memory (as ``default_collate`` does), so
    the clips are copied once on their way to the training process, not twice.
    """
    out = {}
    if "request" in items[0]:  # deferred decode: the DALI pipeline makes the clips (amd_fast/data/dali.py)
        out["request"] = [r for it in items for r in it["request"]]
    else:
        clips = [c for it in items for c in it["video"]]
        out_video = None
        if get_worker_info() is not None:
            storage = clips[0]._typed_storage()._new_shared(len(clips) * clips[0].numel(), device=clips[0].device)
            out_video = clips[0].new(storage).resize_(len(clips), *clips[0].shape)
        out["video"] = torch.stack(clips, out=out_video)
    for key in items[0]:
        if key not in ("video", "skipped", "request", "decode_notes"):
            out[key] = torch.cat([it[key] for it in items])
    out["skipped"] = [s for it in items for s in it["skipped"]]
    out["decode_notes"] = [n for it in items for n in it.get("decode_notes", ())]
    return out


class SkipLog:
    """Main-process record of skipped files and decode-check notes: each file logged once, summaries per epoch and run.

    A file's first skip is logged with its reason; later skips of it are counted (the summaries show the counts and
    the latest reason), so a bad file drawn every epoch costs one line, not one per draw. The decode check's note
    on a file (decoded another way, fewer frames than declared, damaged stretches; ``decode_check.py``) arrives
    with the file's first item from each worker and is logged once.
    """

    def __init__(self, describe) -> None:
        self.describe = describe
        self.total = 0
        self.epoch_counts: Counter = Counter()
        self.run_counts: Counter = Counter()
        self.reasons: dict[int, str] = {}
        self.notes: dict[int, str] = {}

    def track(self, loader: Iterable[dict], epoch: int) -> Iterator[dict]:
        """Yield the batches without ``skipped`` and ``decode_notes``; log them; at the end of the epoch a summary."""
        self.epoch_counts = Counter()
        for batch in loader:
            for i, note in batch.pop("decode_notes", ()):
                if i not in self.notes:
                    self.notes[i] = note
                    log.warning("decode check: %s: %s", self.describe(i), note)
            for i, reason in batch.pop("skipped"):
                self.total += 1
                self.epoch_counts[i] += 1
                if not self.run_counts[i]:
                    log.warning("skipped bad file %s: %s (replaced by another clip)", self.describe(i), reason)
                self.run_counts[i] += 1
                self.reasons[i] = reason
            yield batch
        log.info("epoch %d data summary: %s", epoch, self.summary(self.epoch_counts))

    def summary(self, counts: Counter | None = None) -> str:
        """The skips in ``counts`` (default: the whole run); the run's summary also names the files with check notes."""
        run = counts is None
        counts = self.run_counts if run else counts
        out = "no bad files skipped"
        if counts:
            parts = ", ".join(f"{self.describe(i)} x{c} ({self.reasons[i]})" for i, c in counts.most_common(10))
            more = f", and {len(counts) - 10} more" if len(counts) > 10 else ""
            out = f"skipped {sum(counts.values())} times, {len(counts)} distinct bad files: {parts}{more}"
        if run and self.notes:
            names = ", ".join(self.describe(i) for i in list(self.notes)[:10])
            more = f", and {len(self.notes) - 10} more" if len(self.notes) > 10 else ""
            out += f"; decode check notes on {len(self.notes)} files (logged above): {names}{more}"
        return out
