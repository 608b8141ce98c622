"""DALI clip pipeline: decode, crop, resize and normalize a batch of clips in one DALI pipeline (``data.loader=dali``).

On a CUDA machine the decode is DALI's ``mixed`` video decoder (NVDEC, every codec) and the crops, resizes and
normalization run on the GPU, in the training process: the loader workers only read bytes and draw the random
choices, so CPU decoding no longer starves the GPUs (the users' complaint about the references, VideoMAE issue 81).
Without a GPU the same pipeline runs on DALI's CPU operators, whose decoder has VP8, VP9 (Something-Something V2)
and MJPEG; other codecs are skipped and counted as bad input, naming the codec.

What each side does:
- loader workers (``FileClips(..., defer_decode=True)``, the same dataset, sampler and seeds as the torch path):
  per sample, demux the file to learn its codec, frame count and size, draw the frame indices (``ClipSampler``),
  the ``num_sample`` multi-scale crops and the masks from the sample's generator, exactly as the torch path draws
  them, and ship the file's bytes with them (``ClipRequest``). Per-rank sharding is ``EpochSampler``'s, as for
  the torch path, so the two loaders give every rank the same samples, crops and masks.
- training process (``DaliClips``): feeds a batch of requests to the pipeline -- ``decoders.video`` of exactly
  those frames, then for each of the k crops ``resize`` of the crop window (linear, antialiased, uint8) and
  ``crop_mirror_normalize`` to float ``[3, T, S, S]`` -- and puts ``video [B*k, 3, T, S, S]`` in the batch, in
  ``collate_clips``' order (the k clips of a file next to each other).

Bad input: what the demux catches (missing, empty, corrupt, short, unsupported codec) is skipped and replaced in
the workers like the torch path; a file that fails inside DALI's decoder (truncated after a valid index) fails the
batch, which is then decoded file by file: each failing file is counted and logged as skipped, and its clips are
replaced by the clips of the next good file of the batch (the batch keeps its size; the torch path draws a fresh
substitute file instead, which the training process cannot do without a second round trip to the workers).

Departures from the torch path, by design: DALI's YUV->RGB conversion and its resampling differ from FFmpeg's and
torch's by a few levels (tested: mean difference under 2% of the normalized range); the eval views of fine-tuning
(clips x crops) stay on the torch path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .decoders import DALI_CPU_CODECS, BadVideo, DaliDecoder, available, dali_cpu_refusal, probe_video
from .transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


@dataclass
class ClipRequest:
    """One file's decode request, made in a loader worker: its bytes, the frames to decode, its frame size."""

    encoded: np.ndarray  # uint8 [file bytes]
    frames: np.ndarray  # int32 [T] frame indices
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.frames), self.height, self.width, 3)


class RequestReader:
    """The "decoder" of a deferred-decode ``FileClips``: answers a read with a ``ClipRequest``, decoding nothing.

    For the decode check (amd_fast/data/decode_check.py) ``probe`` decodes a file's probe frames as the pipeline
    would: DALI's CPU decoder (on a GPU NVDEC runs in the training process only, so None: nothing is compared there);
    ``deferred``: the pipeline decodes every file, so a file it gets wrong has no other path and is skipped.
    """

    deferred = True

    def __init__(self, device: str) -> None:
        self.name = f"dali-{device}"
        self.device = device
        self._probe = None

    @property
    def probe(self):
        if self.device != "cpu":
            return None
        if self._probe is None:
            self._probe = DaliDecoder(fallback=None)
        return self._probe

    def refuse(self, path: str) -> str:
        """Why the pipeline cannot decode ``path`` ("" if it can): on the CPU, a codec DALI's CPU variant lacks."""
        codec = probe_video(path)[0]
        return dali_cpu_refusal(codec) if self.device == "cpu" and codec not in DALI_CPU_CODECS else ""

    def read(self, path: str, pick) -> ClipRequest:
        codec, n, h, w = probe_video(path)
        if self.device == "cpu" and codec not in DALI_CPU_CODECS:
            raise BadVideo(dali_cpu_refusal(codec))
        idx = pick(n)
        return ClipRequest(np.fromfile(path, dtype=np.uint8), np.asarray(idx, dtype=np.int32), h, w)


class DaliClips:
    """Decodes the requests of a collated batch into ``video`` with one DALI pipeline (see the module docstring).

    ``device``: ``gpu`` (mixed decode, GPU ops; outputs are CUDA tensors on ``device_id``) or ``cpu``.
    ``max_batch``: files per batch (batches may be smaller, not larger).
    """

    def __init__(
        self, *, num_sample: int, input_size: int, max_batch: int, device: str = "cpu", device_id: int | None = None,
        num_threads: int = 2, describe=str,
    ) -> None:  # fmt: skip
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI pipeline device must be 'cpu' or 'gpu', got {device!r}")
        self.k, self.size, self.max_batch, self.device = int(num_sample), int(input_size), int(max_batch), device
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) if device == "gpu" else None
        self.num_threads = int(num_threads)
        self.describe = describe
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        k, size = self.k, self.size
        decode_on = "mixed" if self.device == "gpu" else "cpu"
        mean = [255.0 * m for m in IMAGENET_MEAN]
        std = [255.0 * s for s in IMAGENET_STD]

        @pipeline_def(
            batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id, exec_dynamic=True,
            prefetch_queue_depth=1,
        )  # fmt: skip
        def clips():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            video = fn.decoders.video(encoded, device=decode_on, frames=frames)  # uint8 [T, H, W, 3]
            outs = []
            for j in range(k):
                start = fn.external_source(name=f"roi_start{j}", dtype=types.FLOAT, ndim=1)  # (top, left)
                end = fn.external_source(name=f"roi_end{j}", dtype=types.FLOAT, ndim=1)  # (bottom, right)
                x = fn.resize(video, size=[size, size], roi_start=start, roi_end=end, antialias=True,
                              interp_type=types.INTERP_LINEAR)  # fmt: skip
                outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CFHW", mean=mean, std=std))
            return tuple(outs)

        pipe = clips()
        pipe.build()
        return pipe

    # The pipeline runs with DALI's scheduled API: ``_submit`` feeds a batch and schedules it, ``_fetch`` waits for
    # the oldest scheduled one, so ``stream`` can decode batch i+1 on DALI's threads (or the GPU) while the caller
    # trains on batch i. An error invalidates the pipeline: it is rebuilt and whatever was in flight resubmitted.

    def _submit(self, requests: list[ClipRequest], crops_BK4: torch.Tensor) -> None:
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        c = crops_BK4.to(torch.float32).numpy()  # (top, left, h, w) per file and crop
        try:
            pipe.feed_input("encoded", [r.encoded for r in requests])
            pipe.feed_input("frames", [r.frames for r in requests])
            for j in range(self.k):
                pipe.feed_input(f"roi_start{j}", [np.ascontiguousarray(c[b, j, :2]) for b in range(len(requests))])
                pipe.feed_input(f"roi_end{j}", [c[b, j, :2] + c[b, j, 2:] for b in range(len(requests))])
            pipe.schedule_run()
        except Exception:
            self._pipe = None  # as in _fetch: an invalid pipeline is rebuilt for the next batch
            raise

    def _try_submit(self, item) -> bool:
        """Submit (batch, requests, crops); False if DALI refused it (the batch is then decoded file by file)."""
        try:
            self._submit(item[1], item[2])
            return True
        except Exception:  # noqa: BLE001 -- surfaces when this batch is finished
            return False

    def _fetch(self) -> torch.Tensor:
        """The oldest scheduled batch -> float32 [B*k, 3, T, S, S] (on the GPU for device gpu)."""
        try:
            outs = self._pipe.outputs()
        except Exception:
            self._pipe = None  # DALI invalidates a pipeline after an error: rebuild for the next batch
            raise
        return torch.stack([self._to_torch(o) for o in outs], dim=1).flatten(0, 1)

    def _decode_now(self, requests: list[ClipRequest], crops_BK4: torch.Tensor) -> torch.Tensor:
        self._submit(requests, crops_BK4)
        return self._fetch()

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self.device == "cpu":
            return torch.from_numpy(np.array(t))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
        return dst

    def _take(self, batch: dict) -> tuple[dict, list[ClipRequest], torch.Tensor]:
        requests, crops = batch.pop("request"), batch.pop("crops")
        return batch, requests, crops.view(len(requests), self.k, 4)

    def __call__(self, batch: dict) -> dict:
        """A collated batch of requests (``request``, ``crops``) -> the same batch with ``video`` and no requests."""
        batch, requests, crops = self._take(batch)
        try:
            batch["video"] = self._decode_now(requests, crops)
            return batch
        except Exception as exc:  # noqa: BLE001 -- find the file(s) that broke the batch, one at a time
            return self._file_by_file(batch, requests, crops, exc)

    def stream(self, batches):
        """Decode an iterable of request batches with one batch in flight ahead of the one returned."""
        ahead = None  # (batch, requests, crops, submitted)
        for nxt in batches:
            nxt = self._take(nxt)
            ok = self._try_submit(nxt)
            if ahead is not None:
                out, lost = self._finish(ahead)
                if lost:  # the pipeline failed and was rebuilt: the batch behind it is resubmitted
                    ok = self._try_submit(nxt)
                yield out
            ahead = (*nxt, ok)
        if ahead is not None:
            yield self._finish(ahead)[0]

    def _finish(self, item) -> tuple[dict, bool]:
        """-> (the decoded batch, whether the pipeline was rebuilt on the way)."""
        batch, requests, crops, submitted = item
        if submitted and self._pipe is not None:
            try:
                batch["video"] = self._fetch()
                return batch, False
            except Exception as exc:  # noqa: BLE001
                return self._file_by_file(batch, requests, crops, exc), True
        return self._file_by_file(batch, requests, crops, RuntimeError("pipeline invalid at submit")), True

    def _file_by_file(self, batch, requests, crops, exc) -> dict:
        log.info("DALI failed on a batch (%s); decoding its %d files one by one", _short(exc), len(requests))
        self._pipe = None
        index = batch["index"].view(len(requests), self.k)[:, 0].tolist()
        per_file: list[torch.Tensor | None] = []
        for b, r in enumerate(requests):
            try:
                per_file.append(self._decode_now([r], crops[b : b + 1]))
            except Exception as exc:  # noqa: BLE001 -- a bad file is a skip, never a dead run
                per_file.append(None)
                batch["skipped"].append((index[b], f"DALI decode: {_short(exc)}"))
        good = [b for b, v in enumerate(per_file) if v is not None]
        if not good:
            names = ", ".join(self.describe(i) for i in index[:3])
            raise RuntimeError(f"DALI could decode none of the {len(requests)} files of a batch ({names}, ...)")
        fill = {}
        for b, v in enumerate(per_file):  # a failed file takes the clips (and label / masks) of the next good one
            if v is None:
                fill[b] = next((g for g in good if g > b), good[0])
        for key, val in batch.items():
            if torch.is_tensor(val) and val.shape[:1] == (len(requests) * self.k,):
                rows = val.view(len(requests), self.k, *val.shape[1:]).clone()
                for b, src in fill.items():
                    rows[b] = rows[src]
                batch[key] = rows.flatten(0, 1)
        batch["video"] = torch.cat([per_file[fill.get(b, b)] for b in range(len(requests))])
        return batch


def _short(exc: Exception) -> str:
    """DALI's error without its pipeline traceback and C++ context: the part after "encountered:"."""
    msg = str(exc)
    msg = msg.split("encountered:", 1)[-1].split("C++ context:", 1)[0].split("Current pipeline object", 1)[0]
    return " ".join(msg.split())[:200] or type(exc).__name__


LOADERS = ("auto", "torch", "dali")


def resolve_loader(name: str, dataset: str, device: torch.device) -> str | None:
    """``data.loader`` -> the DALI pipeline's device (``gpu`` / ``cpu``), or None for the torch path; logged.

    auto: the DALI pipeline on a CUDA device when DALI is installed and the data are video files; else torch.
    """
    if name not in LOADERS:
        raise ValueError(f"data.loader={name!r}; allowed: {', '.join(map(repr, LOADERS))}")
    on_cuda = device.type == "cuda"
    if name == "torch" or (name == "auto" and not (on_cuda and dataset == "video_list" and available("dali"))):
        why = "forced by data.loader" if name == "torch" else "auto: DALI runs on CUDA video lists"
        log.info("data loader: torch DataLoader workers decode on the CPU (%s)", why)
        return None
    if dataset != "video_list":
        raise ValueError(f"data.loader=dali decodes video files: it needs data.dataset=video_list, not {dataset!r}")
    if not available("dali"):
        raise RuntimeError("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or -cuda130)")
    where = "gpu" if on_cuda else "cpu"
    log.info(
        "data loader: DALI pipeline on the %s (%s; %s)", where,
        "mixed NVDEC decode, every codec" if on_cuda else f"CPU decode: {'/'.join(sorted(DALI_CPU_CODECS))} only",
        "forced by data.loader" if name == "dali" else "auto",
    )  # fmt: skip
    return where
