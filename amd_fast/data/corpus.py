"""A corpus of small video files in the codecs and containers found in the wild, generated on demand.

Each file is 64x48 and 60-90 frames of a moving colour pattern with the frame number stamped in its bottom rows
(8 bits as 8x8 black / white blocks, ``frame_number``), so a wrong frame is visible and nameable. The files are
written with PyAV's bundled FFmpeg, and with Debian's ``ffmpeg`` for the one encoder PyAV lacks (Theora); a class
whose encoder is missing is left out (``write_corpus`` returns what it wrote). Nothing here is committed: tests and
``benchmarks/decode_corpus.py`` write the corpus into a temporary or cache folder. ``verify`` judges a decoder on
a file: random windows read through it alone and through the decode check, against a sequential decode.

    python -m amd_fast.data.corpus --out /tmp/corpus      # -> the files and list.txt

Classes (``CORPUS``: name -> what the file is, and what it exercises):
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 64, 48


@dataclass(frozen=True)
class CorpusFile:
    name: str  # file name, extension included
    what: str  # one line for tables
    codec: str  # PyAV encoder name (or the ffmpeg CLI's, for `cli` files)
    frames: int = 90
    fmt: str | None = None  # container format when the extension does not say it
    pix_fmt: str = "yuv420p"
    options: tuple[tuple[str, str], ...] = ()
    codec_tag: str | None = None
    cli: tuple[str, ...] = ()  # encode with Debian's ffmpeg and these output options instead of PyAV
    vfr: bool = False  # irregular frame durations
    corrupt: bool = False  # one packet damaged after encoding, so the decoder reports errors
    truncate: bool = False  # cut at 2/3 of its bytes, as an interrupted download: the header over-declares


CORPUS = (
    CorpusFile("h264_420.mp4", "H.264 High 4:2:0, B-frames, GOP 16 (.mp4)", "libx264",
               options=(("g", "16"), ("threads", "1"))),
    CorpusFile("h264_444.mp4", "H.264 High 4:4:4 (yuv444p), one GOP (.mp4)", "libx264", pix_fmt="yuv444p",
               options=(("threads", "1"),)),
    CorpusFile("h264_444_intra_refresh.mp4", "H.264 4:4:4, periodic intra refresh: no IDR after frame 0 (.mp4)",
               "libx264", pix_fmt="yuv444p", options=(("x264-params", "intra-refresh=1:keyint=30"), ("threads", "1"))),
    CorpusFile("h264_open_gop.mp4", "H.264 open GOP, 3 B-frames, GOP 20 (.mp4)", "libx264",
               options=(("x264-params", "open-gop=1:keyint=20:min-keyint=20:bframes=3:scenecut=0"), ("threads", "1"))),
    CorpusFile("h264_bframes.mp4", "H.264 8 B-frames, B-pyramid, GOP 30 (.mp4)", "libx264",
               options=(("x264-params", "bframes=8:b-pyramid=normal:b-adapt=0:keyint=30"), ("threads", "1"))),
    CorpusFile("h264_vfr.mp4", "H.264 variable frame rate (every third frame lasts 3x) (.mp4)", "libx264",
               options=(("g", "16"), ("bf", "2"), ("threads", "1")), vfr=True),
    CorpusFile("h264_corrupt_slice.mp4", "H.264 with one damaged slice in frame 32's packet (.mp4)", "libx264",
               options=(("g", "16"), ("bf", "0"), ("threads", "1")), corrupt=True),
    CorpusFile("mpeg2_ps.mpg", "MPEG-2 video, 2 B-frames, GOP 15, in a program stream (.mpg)", "mpeg2video",
               fmt="vob", options=(("g", "15"), ("bf", "2"), ("qscale", "3"))),
    CorpusFile("mpeg4_xvid.avi", "MPEG-4 part 2 (XVID tag), 2 B-frames, GOP 30, in AVI", "mpeg4", codec_tag="XVID",
               options=(("g", "30"), ("bf", "2"), ("qscale", "3"))),
    CorpusFile("vp9.webm", "VP9 with alt-ref (hidden) frames, GOP 30 (.webm)", "libvpx-vp9",
               options=(("g", "30"), ("crf", "30"), ("b", "0"), ("auto-alt-ref", "1"), ("lag-in-frames", "16"))),
    CorpusFile("vp9.avi", "VP9 with alt-ref frames in AVI", "libvpx-vp9",
               options=(("g", "30"), ("crf", "30"), ("b", "0"), ("auto-alt-ref", "1"), ("lag-in-frames", "16"))),
    CorpusFile("theora.ogv", "Theora in Ogg (Debian ffmpeg, libtheora)", "libtheora",
               cli=("-c:v", "libtheora", "-g", "30", "-q:v", "7")),
    CorpusFile("mjpeg.avi", "Motion JPEG (full-range yuvj420p) in AVI", "mjpeg", pix_fmt="yuvj420p"),
    CorpusFile("mjpeg_truncated.avi", "Motion JPEG in AVI cut at 2/3 of its bytes: the header declares 90 frames",
               "mjpeg", pix_fmt="yuvj420p", truncate=True),
    CorpusFile("cinepak.avi", "Cinepak in AVI", "cinepak", frames=60, pix_fmt="rgb24"),
)  # fmt: skip
__doc__ += "".join(f"\n- ``{c.name}``: {c.what}" for c in CORPUS) + "\n"


def frame_number(rgb_HWC: np.ndarray) -> int:
    """The frame number stamped by ``pattern`` (bits of 8 blocks, 8 px wide, in the bottom 8 rows)."""
    rows = rgb_HWC[HEIGHT - 6 : HEIGHT - 2].astype(np.float32).mean(axis=(0, 2))
    return sum(1 << b for b in range(8) if rows[b * 8 + 2 : b * 8 + 6].mean() > 128)


def pattern(num_frames: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, 48, 64, 3]: moving colour waves + fixed texture + a moving square; frame number in the bottom rows.

    Every channel varies (so a chroma error shows) and consecutive frames differ everywhere (so does a shift).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    texture = rng.integers(0, 40, (HEIGHT, WIDTH, 1)).astype(np.float32)  # luma detail; smooth chroma, as in footage
    out = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        img = np.stack([128 + 90 * np.sin(x / 6 + t / 4), 128 + 90 * np.sin(y / 5 - t / 3),
                        128 + 90 * np.sin((x + y) / 8 + t / 5)], -1) + texture  # fmt: skip
        cx, cy = 4 + (3 * t) % (WIDTH - 20), 4 + (2 * t) % (HEIGHT - 24)
        img[cy : cy + 12, cx : cx + 12] = (250, 30, 200)
        for b in range(8):
            img[HEIGHT - 8 :, 8 * b : 8 * b + 8] = 255 if (t >> b) & 1 else 0
        out[t] = np.clip(img, 0, 255)
    return out


def _vfr_pts(num_frames: int) -> list[int]:
    """Milliseconds: every third frame lasts 120 ms, the others 40 ms."""
    pts, t = [], 0
    for i in range(num_frames):
        pts.append(t)
        t += 120 if i % 3 == 2 else 40
    return pts


def _encode_pyav(path: Path, spec: CorpusFile, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), mode="w", format=spec.fmt) as container:
        stream = container.add_stream(spec.codec, rate=Fraction(25))
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = spec.pix_fmt
        stream.options = dict(spec.options)
        if spec.codec_tag:
            stream.codec_context.codec_tag = spec.codec_tag
        pts = _vfr_pts(len(frames)) if spec.vfr else None
        if pts:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _encode_cli(path: Path, spec: CorpusFile, frames: np.ndarray) -> None:
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{WIDTH}x{HEIGHT}", "-r", "25", "-i", "-", *spec.cli, str(path)]  # fmt: skip
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)


def _corrupt(src: Path, dst: Path, packet_index: int = 32) -> None:
    """Copy ``src`` with 16 bytes of one packet overwritten, at the first position where FFmpeg then reports an error.

    Random bytes in CABAC data often decode "validly" into a wrong picture with no error at all, which no decoder
    can report; the file is meant to exercise the error path, so positions are tried until a sequential decode flags
    a frame (``is_corrupt``: the decoder concealed damage). Deterministic for a given encoder and decoder build.
    """
    import av

    with av.open(str(src)) as c:
        packets = [(bytes(p), p.pts, p.dts, p.time_base, p.is_keyframe) for p in c.demux(video=0) if p.size]
    for attempt in range(32):
        rng = np.random.default_rng(attempt)
        data = bytearray(packets[packet_index][0])
        pos = 8 + int(rng.integers(0, max(1, len(data) - 24)))
        data[pos : pos + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        with av.open(str(src)) as ic, av.open(str(dst), mode="w") as oc:
            out = oc.add_stream_from_template(ic.streams.video[0])
            for j, (raw, pts, dts, tb, key) in enumerate(packets):
                p = av.Packet(bytes(data) if j == packet_index else raw)
                p.pts, p.dts, p.time_base, p.is_keyframe, p.stream = pts, dts, tb, key, out
                oc.mux(p)
        with av.open(str(dst)) as c:
            if any(f.is_corrupt for f in c.decode(video=0)):
                return
    raise RuntimeError(f"could not make a packet of {src} decode with an error")


def available(spec: CorpusFile) -> bool:
    """Whether this machine has the encoder for ``spec``."""
    if spec.cli:
        return shutil.which("ffmpeg") is not None
    import av

    return spec.codec in av.codecs_available


def write_corpus(out_dir: str | os.PathLike, names: list[str] | None = None) -> list[tuple[CorpusFile, Path]]:
    """Write the corpus (or the named files) into ``out_dir`` -> [(spec, path)] for the classes this machine encodes.

    Files already there are kept (a second call is free); a ``list.txt`` (``name 0`` lines) is written too. Missing
    files are encoded in a fresh interpreter: once a process has loaded decord (its bundled FFmpeg 4.1), PyAV's
    libvpx-vp9 encoder no longer opens there (``avcodec_open2`` returns EINVAL; measured with decord 0.6, PyAV 18.1).
    """
    out = Path(out_dir)
    wanted = [s for s in CORPUS if (names is None or s.name in names) and available(s)]
    if any(not (out / s.name).exists() for s in wanted):
        cmd = [sys.executable, "-m", "amd_fast.data.corpus", "--out", str(out), "--names", *[s.name for s in wanted]]
        subprocess.run(cmd, check=True, capture_output=True)
    written = [(s, out / s.name) for s in wanted]
    (out / "list.txt").write_text("".join(f"{spec.name} 0\n" for spec, _ in written))
    return written


def _write_here(out: Path, specs: list[CorpusFile]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        path = out / spec.name
        if path.exists():
            continue
        frames = pattern(spec.frames)
        tmp = out / f".tmp_{spec.name}"
        if spec.cli:
            _encode_cli(tmp, spec, frames)
        elif spec.corrupt:
            clean = out / f".clean_{spec.name}"
            _encode_pyav(clean, spec, frames)
            _corrupt(clean, tmp)
            clean.unlink()
        else:
            _encode_pyav(tmp, spec, frames)
        if spec.truncate:
            data = tmp.read_bytes()
            tmp.write_bytes(data[: 2 * len(data) // 3])
        os.replace(tmp, path)  # a killed run never leaves a half-written file under the final name


# ---------------------------------------------------------------------------------------------
# judging a decoder on a file


def sequential_frames(path: str | os.PathLike) -> np.ndarray:
    """Every frame of ``path`` in order (PyAV, ``container.decode``, one thread) -> uint8 [N, H, W, 3]: the truth.

    A decode error ends the file (as in ``reference_scan``)."""
    import av

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        try:
            for f in container.decode(stream):
                frames.append(f.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:  # a truncated last packet: what decoded before it is the file
            pass
    return np.stack(frames)


def windows(n: int, count: int, seed: int = 0, length: int = 8, stride: int = 2) -> list[list[int]]:
    """``count`` dense windows at random starts, one TSN-style spread pick, and the last frames of an n-frame file."""
    rng = np.random.default_rng(seed)
    span = (length - 1) * stride + 1
    out = [[int(s) + stride * t for t in range(length)] for s in rng.integers(0, n - span + 1, count)]
    out.append([int(n * (t + 0.5) / length) for t in range(length)])
    out.append(list(range(n - length, n)))
    return out


def same_frames(got: np.ndarray, ref: np.ndarray, idx: list[int]) -> bool:
    """``got`` is frames ``idx`` of ``ref``: stamped numbers equal, pixels within the decode check's tolerance."""
    from .decode_check import TOL_MEAN

    if got.shape != (len(idx), *ref.shape[1:]):
        return False
    for g, i in zip(got, idx):
        if frame_number(g) != frame_number(ref[i]):
            return False
        if np.abs(g.astype(np.int16) - ref[i].astype(np.int16)).mean() > TOL_MEAN:
            return False
    return True


@dataclass
class Verdict:
    """How ``decoder`` does on one file: alone, and through the decode check. See ``verify``."""

    file: str
    decoder: str
    mode: str  # the check's path for the file, or "bad"
    note: str  # the check's note (why another path / frame count / damage), or why the file is bad
    windows: int
    raw_wrong: int  # undamaged windows the decoder alone returned wrong frames for, or failed on
    raw_damaged: int  # windows touching damaged frames: without the check they are decoded with no report
    checked_wrong: int  # windows the checked read returned wrong frames for: the contract is 0
    skipped: int  # windows the checked read skipped, reported (damaged window, bad file, a decoder error)
    seconds: float  # what the check cost on this file
    frames: int  # frames sampled from (what decodes)
    declared: int  # what the decoder's container read declares
    raw_errors: int = 0  # of raw_wrong, the windows the decoder alone failed on (an error, not wrong frames)

    @property
    def cell(self) -> str:
        if self.checked_wrong:
            return f"WRONG ({self.checked_wrong}/{self.windows} windows)"
        if self.mode == "bad":
            return f"skipped ({self.note.split(';')[0]})"
        out = "exact" if self.mode == self.decoder else f"fixed by {self.mode}"
        if self.declared and self.declared != self.frames:
            out += f" ({self.declared} declared, {self.frames} decode)"
        if self.raw_wrong:
            out += f" (alone: {self.raw_wrong}/{self.windows} windows wrong)"
        if self.skipped:
            out += f"; {self.skipped} windows skipped ({'damaged' if self.raw_damaged else 'decoder error'})"
        return out


def verify(decoder, path: str | os.PathLike, ref: np.ndarray, picks: list[list[int]], cache_dir: str) -> Verdict:
    """Read every window of ``picks`` through ``decoder`` alone and through ``DecodeCheck``; compare with ``ref``."""
    from .dali import ClipRequest
    from .decode_check import DecodeCheck

    path = str(path)
    check = DecodeCheck(decoder, cache_dir)
    rec = check.check(path)
    alone = getattr(decoder, "probe", decoder)  # the DALI pipeline: its CPU decoder stands in for it
    raw_wrong = raw_errors = raw_damaged = checked_wrong = skipped = 0
    for idx in picks:
        damaged = rec.damaged_in(idx) is not None
        raw_damaged += damaged
        if alone is not None and not damaged:
            try:
                raw_wrong += not same_frames(np.asarray(alone.read(path, lambda n, idx=idx: idx)), ref, idx)
            except Exception:  # noqa: BLE001 -- a decoder error counts as a wrong window
                raw_wrong += 1
                raw_errors += 1
        try:
            got = check.read(path, lambda n, idx=idx: idx)
        except Exception:  # noqa: BLE001 -- FileClips reports any read error as a skip (BadVideo: by the check)
            skipped += 1
            continue
        if isinstance(got, ClipRequest):  # the DALI pipeline decodes these frames: decode them as it would
            if alone is None:
                continue
            got = alone.read(path, lambda n, got=got: got.frames.tolist())
        checked_wrong += not same_frames(np.asarray(got), ref, idx)
    note = rec.why if rec.mode == "bad" else rec.note(decoder.name)
    return Verdict(Path(path).name, decoder.name, rec.mode, note, len(picks), raw_wrong, raw_damaged, checked_wrong,
                   skipped, rec.seconds, rec.frames, rec.declared, raw_errors)  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--names", nargs="*", help="only these files (default: every class this machine encodes)")
    a = p.parse_args(argv)
    specs = [s for s in CORPUS if (a.names is None or s.name in a.names) and available(s)]
    _write_here(Path(a.out), specs)
    for spec, path in write_corpus(a.out, [s.name for s in specs]):
        print(f"{path}  {spec.what}")


if __name__ == "__main__":
    main()
