"""Decode check: every decoded frame is the frame asked for, or the file is skipped and reported.

Frame ``i`` of a video is the i-th frame a sequential decode from the start gives (PyAV's ``container.decode``,
what FFmpeg's own tools count). The fast decoders seek and number frames from the container's index and
timestamps instead, and on whole classes of real files that goes wrong silently (measured on the generated
corpus, ``amd_fast/data/corpus.py``, with this project's builds): MPEG-2 in a program stream and MPEG-4 part 2 in
AVI with B-frames come back shifted (torchcodec by one frame in AVI, decord by up to 28), torchcodec cannot give
their last declared frame, frames after a seek into H.264 with periodic intra refresh are junk (torchcodec,
decord), and decord returns wrong frames around the keyframes of open-GOP H.264.

So the first time a process opens a file (``DecodeCheck.check``; cached by path, size and mtime, in memory and in
a folder shared by workers, epochs and runs):

1. ``reference_scan``: one sequential PyAV decode of the whole file, converting only a few probe frames to RGB
   (each side of two container seek points, the middle and the last frame) and their neighbours.
   It gives the frame count (what decodes, not what the container declares), every frame's timestamp, and the
   frames the decoder flags as damaged (``is_corrupt``: FFmpeg concealed an error), with FFmpeg's error lines.
2. The probe frames are decoded the way training decodes a window (the configured decoder, one read per frame, so
   each is a fresh open and seek) and compared with the reference (``mismatch``): exactly where the same build
   decodes both (PyAV's exact seek), else within ``TOL_MEAN`` levels and nearer to the frame asked for than to its
   neighbours.
3. On a mismatch the next path is tried: DALI's CPU fallback decoder, PyAV's exact seek (the timestamps of the
   sequential decode name the frames), PyAV's sequential decode (the reference itself). The first that matches
   decodes that file from then on; the reason is logged once (``SkipLog``). No matching path (only the DALI
   pipeline has no per-file alternative), or no sequential decode at all: the file is skipped like any bad file.

Reads then sample from the checked frame count, and a window that touches a damaged stretch (from the keyframe
before a damaged frame to the next one: errors spread through the references) is skipped, naming the frames and
FFmpeg's message; the rest of the file is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .decoders import BadVideo, DamagedWindow, Pick, PyAVDecoder, reason_of

log = logging.getLogger(__name__)

CHECK_VERSION = 2  # bump when the check's logic changes: cached verdicts of older versions are not reused
# Mean |difference| (uint8 levels) allowed between two correct decodes of a frame by different libraries. Measured
# on the corpus: torchcodec (Debian's FFmpeg 5.1), decord (its bundled FFmpeg 4.1) and PyAV (its bundled libavcodec
# 62) are bit-identical on every 8-bit file; on a 10-bit H.264 clip (lavfi testsrc2) their RGB conversions differ by
# a mean of 1.9-2.3 (max 164); DALI's YUV->RGB differs by a mean of 4.5 (max 96) on the corpus's saturated colours.
# Wrong frames measured >= 18 (a shift by one frame), junk (grey / green) >= 38.
TOL_MEAN = 6.0
SHIFT_SLACK = 0.5  # a frame nearer (by more than this mean) to a neighbour of the frame asked for is a shifted frame
SEEK_GAP = 64  # PyAV exact seek: the next wanted frame further ahead than this is sought, not decoded up to


def default_cache_dir() -> str:
    """``$AMD_FAST_CACHE/decode_check`` (default ``~/.cache/amd_fast``): verdicts shared by workers, epochs, runs."""
    root = os.environ.get("AMD_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "amd_fast"
    )
    return os.path.join(root, "decode_check")


# ---------------------------------------------------------------------------------------------
# the reference: one sequential decode


@dataclass
class Reference:
    """What a sequential PyAV decode of a file gives; see ``reference_scan``."""

    frames: int  # frames decoded
    declared: int  # frames the container declares (0: not declared)
    pts: list  # display-order timestamps (None where a frame has none)
    keys: list[int]  # frames the decoder marks as keyframes (clean random-access points)
    rgb: dict[int, np.ndarray]  # probe frames and their neighbours: index -> uint8 [H, W, 3]
    targets: list[int]  # the probe frames, ascending
    damaged: list[tuple[int, int]]  # inclusive frame ranges a decode error reaches
    errors: list[str]  # FFmpeg's error lines (first few, deduplicated)
    stopped: str = ""  # the error that ended the decode before the container's end


def _damage_ranges(corrupt: list[int], keys: list[int], n: int) -> list[tuple[int, int]]:
    """Each damaged frame -> [keyframe at or before it, next keyframe - 1], merged: references carry the damage."""
    out: list[tuple[int, int]] = []
    for d in corrupt:
        start = max((k for k in keys if k <= d), default=0)
        end = min((k for k in keys if k > d), default=n) - 1
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


@contextlib.contextmanager
def _ffmpeg_log():
    """-> the list of FFmpeg's error lines, ``(level, name, message)``, logged on this thread inside the block, and
    only those (a loader worker is a process of its own).

    PyAV's log handler is process-wide and holds back a line that repeats the one before, counting it, until another
    line arrives: the tally then lands in whatever capture is open, the next file's, and that file's own lines, when
    they repeat the last ones, are counted and never emitted. So inside the block every line is emitted as logged (the
    caller deduplicates), and a tally held back from before (a decode elsewhere with PyAV's logging on) is flushed
    into a capture that is dropped.
    """
    import av.logging

    level, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's error lines go to the capture, not to stderr
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture():
            av.logging.log(av.logging.PANIC, "", "")  # unlike any line before: emits a held-back tally here
        with av.logging.Capture() as logs:
            yield logs
    finally:
        av.logging.set_skip_repeated(skip)
        av.logging.set_level(level)


def reference_scan(path: str) -> Reference:
    """Decode ``path`` from start to end with PyAV on one thread; convert only the probe frames to RGB.

    Probe frames: each side of the first and the middle container seek point after frame 0 (keyframe packets, from
    a demux pass first: where open-GOP, intra-refresh and index errors show), the middle frame (of the packet
    count) and the last frame; their neighbours are kept too, for the shift test. Damage: frames the decoder flags
    ``is_corrupt`` (it concealed an error) and FFmpeg's error lines.
    """
    import av

    with av.open(path) as container:  # demux pass: seek points and a frame estimate, no decoding
        stream = container.streams.video[0]
        declared = stream.frames
        key_pts, packets = [], 0
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
                if packet.is_keyframe and packet.pts is not None:
                    key_pts.append(packet.pts)
    key_pts = sorted(set(key_pts))[1:]  # the first is the start of the file
    chosen = {key_pts[0], key_pts[len(key_pts) // 2]} if key_pts else set()
    middle = packets // 2

    kept: dict[int, object] = {}
    targets: set[int] = set()
    pts: list = []
    keys: list[int] = []
    corrupt: list[int] = []
    ring: deque = deque(maxlen=2)
    keep_until = -1
    stopped = ""
    with _ffmpeg_log() as logs:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "NONE"  # loader workers are the parallelism
            i = -1
            try:
                for i, frame in enumerate(container.decode(stream)):
                    pts.append(frame.pts)
                    if frame.key_frame:
                        keys.append(i)
                    if frame.is_corrupt:
                        corrupt.append(i)
                    if frame.pts in chosen:  # a probed seek point: the frames each side of it
                        chosen.discard(frame.pts)
                        targets.update((i - 1, i + 1))
                        kept.update(ring)
                        keep_until = i + 2
                    if i <= keep_until or abs(i - middle) <= 1:
                        kept[i] = frame
                    ring.append((i, frame))
            except av.error.FFmpegError as exc:  # a decode error that ends the stream: what decoded so far counts
                stopped = f"decoding stopped after frame {i}: {exc}"
            n = i + 1
            kept.update(ring)  # the last two frames
    if n == 0:
        raise BadVideo(stopped or "no frame decodes")
    targets.update((min(middle, n - 1), n - 1))
    targets = {t for t in targets if 0 <= t < n}
    need = {t + d for t in targets for d in (-1, 0, 1)} & kept.keys()
    errors = list(dict.fromkeys(f"{name}: {msg.strip()}" for lvl, name, msg in logs))
    rgb = {j: kept[j].to_ndarray(format="rgb24") for j in sorted(need)}
    return Reference(
        frames=n, declared=declared, pts=pts, keys=keys, rgb=rgb, targets=sorted(targets),
        damaged=_damage_ranges(corrupt, keys, n), errors=errors[:3], stopped=stopped,
    )  # fmt: skip


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def mismatch(got: np.ndarray, ref: Reference, p: int, exact: bool) -> str:
    """An empty string if ``got`` is frame ``p`` of the reference, else what is wrong with it.

    ``exact``: the same build decoded both, so the frames must be identical. Otherwise the mean |difference| must be
    within ``TOL_MEAN`` (junk and distant frames are far above it) and no neighbour of ``p`` may match better (a
    frame shifted by one can sit within the tolerance when the picture moves slowly).
    """
    want = ref.rgb[p]
    if got.shape != want.shape:
        return f"frame {p}: shape {tuple(got.shape)}, the sequential decode's {tuple(want.shape)}"
    if exact:
        return "" if np.array_equal(got, want) else f"frame {p}: differs (mean |diff| {_mean_diff(got, want):.1f})"
    e = _mean_diff(got, want)
    near = min(((_mean_diff(got, ref.rgb[q]), q) for q in (p - 1, p + 1) if q in ref.rgb), default=(np.inf, p))
    if e > TOL_MEAN or e > near[0] + SHIFT_SLACK:
        looks = f", looks like frame {near[1]} ({near[0]:.1f})" if near[0] < min(e, TOL_MEAN) else ""
        return f"frame {p}: mean |diff| {e:.1f} levels{looks}"
    return ""


# ---------------------------------------------------------------------------------------------
# PyAV's exact seek


class PyAVSeekReader:
    """Seek to a keyframe before a frame, decode forward, and name frames by the sequential decode's timestamps.

    A decode is only trusted from a frame the sequential decode marked as a keyframe: a seek whose first frame is
    another one (a container seek point that is no clean random-access point, as in intra-refresh H.264, or an
    open GOP's leading frames) or comes after the frame asked for (a coarse program-stream seek) is retried
    further back, then from the start. Exact where the timestamps are unique (``usable``); the check still
    compares it with the sequential decode on the probe frames.
    """

    name = "pyav-seek"

    def __init__(self, pts: list, keys: list[int]) -> None:
        self.pts = pts
        self.index = {p: i for i, p in enumerate(pts)}
        self.keys = set(keys)

    @staticmethod
    def usable(pts: list) -> bool:
        return None not in pts and len(set(pts)) == len(pts)

    def read(self, path: str, pick: Pick) -> torch.Tensor:
        import av

        idx = pick(len(self.pts))
        want = sorted(set(idx))
        got: dict[int, np.ndarray] = {}
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "NONE"
            k = 0
            while k < len(want):
                got_before = len(got)
                for back in (0, 8, 64, None):  # how far before the wanted frame to seek; None: the start
                    t = want[k]
                    if back is None:
                        container.seek(0)
                    else:
                        container.seek(self.pts[max(0, t - back)], stream=stream, backward=True)
                    k = self._decode(container, stream, want, k, got)
                    if len(got) > got_before:
                        break
                else:
                    raise BadVideo(f"PyAV seek: frame {want[k]} not found")
        return torch.from_numpy(np.stack([got[i] for i in idx]))

    def _decode(self, container, stream, want: list[int], k: int, got: dict) -> int:
        """Decode from the current position, collecting wanted frames; -> the next wanted position in ``want``."""
        first = True
        for frame in container.decode(stream):
            i = self.index.get(frame.pts)
            if i is None:
                raise BadVideo(f"PyAV seek: a frame with timestamp {frame.pts}, unknown to the sequential decode")
            if first and (i > want[k] or i not in self.keys):
                return k  # no clean start before the wanted frame: the caller seeks further back
            first = False
            if i == want[k]:
                got[i] = frame.to_ndarray(format="rgb24")
                k += 1
                if k == len(want) or want[k] - i > SEEK_GAP:
                    return k
        return k


# ---------------------------------------------------------------------------------------------
# the per-file verdict


@dataclass
class FileCheck:
    """The check's verdict for one file and one configured decoder (JSON in the cache folder)."""

    mode: str  # the path that decodes this file (a decoder's name, "pyav-seek", "pyav"), or "bad"
    frames: int = 0  # frames sampled from: what decodes, within what the path can address
    declared: int = 0  # what the configured decoder's container read declares (0: unknown)
    why: str = ""  # why the configured decoder is not used / why the file is bad
    damaged: list = field(default_factory=list)  # inclusive [first, last] frame ranges with decode errors
    errors: list = field(default_factory=list)  # FFmpeg's error lines
    pts: list | None = None  # the sequential decode's timestamps and keyframes (PyAV exact seek only)
    keys: list | None = None
    seconds: float = 0.0  # what the check cost

    def note(self, configured: str) -> str:
        """One line for the log, or "" when the configured decoder reads the file as declared, undamaged."""
        parts = []
        if self.mode != configured:
            parts.append(f"{configured} {self.why}; decoded by {self.mode} instead")
        if self.declared and self.declared != self.frames:
            parts.append(f"the container declares {self.declared} frames, {self.frames} decode: sampling uses "
                         f"{self.frames}")  # fmt: skip
        if self.damaged:
            parts.append(f"{_damage_text(self)}: windows touching them are skipped")
        return "; ".join(parts)

    def damaged_in(self, idx: list[int]) -> tuple[int, int] | None:
        for a, b in self.damaged:
            if any(a <= i <= b for i in idx):
                return a, b
        return None


def _damage_text(rec: FileCheck) -> str:
    spans = ", ".join(f"{a}-{b}" for a, b in rec.damaged)
    return f"decode errors reach frames {spans} ({'; '.join(rec.errors) or 'frames flagged corrupt'})"


class DecodeCheck:
    """Reads through ``decoder`` with the per-file check of the module docstring; same ``read(path, pick)`` API.

    ``cache_dir`` (None: ``default_cache_dir()``) holds one JSON verdict per file and decoder build; an unwritable
    folder leaves the cache in memory only.
    """

    def __init__(self, decoder, cache_dir: str | None = None) -> None:
        self.decoder = decoder
        self.name = decoder.name
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self._paths = self._candidates(decoder)
        self._ident = f"{CHECK_VERSION}|{self.name}|{_versions()}"
        self._mem: dict[tuple, FileCheck] = {}
        self._noted: set[str] = set()
        self._disk = True

    @staticmethod
    def _candidates(decoder) -> list[tuple[str, object]]:
        """(name, reader) in the order tried. ``probe``: what stands in for a decoder that decodes elsewhere."""
        own = getattr(decoder, "probe", decoder)  # the DALI pipeline: its CPU decoder, or None (GPU)
        paths = [(decoder.name, own)]
        fallback = getattr(decoder, "fallback", None)  # DALI: the CPU decoder for codecs its CPU variant lacks
        if fallback is not None:
            paths.append((fallback.name, fallback))
        if not getattr(decoder, "deferred", False):  # the DALI pipeline decodes every file itself: no alternative
            paths += [(PyAVSeekReader.name, PyAVSeekReader), ("pyav", PyAVDecoder())]
        return paths

    # -- reading --------------------------------------------------------------------------------

    def read(self, path: str, pick: Pick):
        rec = self.check(path)
        if rec.mode == "bad":
            raise BadVideo(rec.why)

        def checked(n: int) -> list[int]:
            idx = pick(min(n, rec.frames))
            hit = rec.damaged_in(idx)
            if hit is not None:
                raise DamagedWindow(f"window {min(idx)}-{max(idx)} touches frames {hit[0]}-{hit[1]}: "
                                    f"{_damage_text(rec)}")  # fmt: skip
            return idx

        return self._reader(rec).read(path, checked)

    def _reader(self, rec: FileCheck):
        if rec.mode == self.name:
            return self.decoder  # (for the DALI pipeline: the request maker, not its probe)
        reader = dict(self._paths)[rec.mode]
        return reader(rec.pts, rec.keys) if reader is PyAVSeekReader else reader

    def note(self, path: str) -> str:
        """The file's check note the first time this process asks ("" after that, or when there is nothing to say)."""
        if path in self._noted:
            return ""
        self._noted.add(path)
        return self.check(path).note(self.name)

    # -- the check ------------------------------------------------------------------------------

    def check(self, path: str) -> FileCheck:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        rec = self._mem.get(key)
        if rec is None:
            file = self.cache_dir / (hashlib.sha1(repr((key, self._ident)).encode()).hexdigest() + ".json")
            rec = self._load(file)
            if rec is None:
                rec = self._run(path)
                self._save(file, rec)
            self._mem[key] = rec
        return rec

    def _run(self, path: str) -> FileCheck:
        t0 = time.perf_counter()
        refuse = getattr(self.decoder, "refuse", None)  # the DALI pipeline knows at once which codecs it lacks
        try:
            why = refuse(path) if refuse is not None else ""
        except Exception:  # noqa: BLE001 -- an unreadable file: the sequential decode below says why
            why = ""
        if why:
            return FileCheck("bad", why=why, seconds=time.perf_counter() - t0)
        try:
            ref = reference_scan(path)
        except Exception as exc:  # noqa: BLE001 -- no reference: the file cannot be checked, so it is not used
            return FileCheck("bad", why=f"no sequential decode (PyAV): {reason_of(exc)}",
                             seconds=time.perf_counter() - t0)  # fmt: skip
        damaged = [list(r) for r in ref.damaged]
        failures, declared = [], 0
        for name, reader in self._paths:
            if name == PyAVSeekReader.name:
                if not PyAVSeekReader.usable(ref.pts):
                    failures.append(f"{name}: frames without unique timestamps")
                    continue
                reader = reader(ref.pts, ref.keys)
            frames, why = self._probe(name, reader, path, ref)
            if name == self.name:
                declared = frames
            if not why:
                mode = name
                break
            failures.append(f"{name}: {why}")
        else:
            why = "; ".join(failures)
            why = why if len(failures) == 1 else f"no decoder gives the frames of a sequential decode ({why})"
            return FileCheck("bad", frames=ref.frames, declared=declared or ref.declared, why=why, damaged=damaged,
                             errors=ref.errors, seconds=time.perf_counter() - t0)  # fmt: skip
        why = failures[0].split(": ", 1)[1] if failures else ""
        why = f"does not give the frames of a sequential decode ({why})" if why else ""
        return FileCheck(
            mode, frames=min(frames or ref.frames, ref.frames), declared=declared or ref.declared, why=why,
            damaged=damaged, errors=ref.errors + ([ref.stopped] if ref.stopped else []),
            pts=ref.pts if mode == PyAVSeekReader.name else None,
            keys=ref.keys if mode == PyAVSeekReader.name else None, seconds=time.perf_counter() - t0,
        )  # fmt: skip

    def _probe(self, name: str, reader, path: str, ref: Reference) -> tuple[int, str]:
        """Decode each probe frame with ``reader``, one read each -> (the frame count it saw, "" or what is wrong)."""
        if reader is None:  # the DALI pipeline on a GPU: NVDEC runs in the training process, not here
            return ref.frames, ""
        if isinstance(reader, PyAVDecoder):  # the sequential decode itself: right by construction
            return ref.declared or ref.frames, ""
        exact = name == PyAVSeekReader.name  # the same PyAV build decodes both
        n = 0
        for t in ref.targets:
            if any(a <= t <= b for a, b in ref.damaged):
                continue  # decoders conceal damage differently; those windows are skipped anyway
            seen = {}

            def pick(count: int, t=t, seen=seen) -> list[int]:
                seen["n"] = count
                return [t] if t < count else []

            try:
                got = np.asarray(reader.read(path, pick))
            except Exception as exc:  # noqa: BLE001 -- a path that fails on a probe is a path that is not used
                where = "" if isinstance(exc, BadVideo) else f"frame {t}: "  # BadVideo: about the file, not the frame
                return int(seen.get("n", n)), where + reason_of(exc)
            n = int(seen["n"])
            if t >= n:
                continue  # beyond what this path can address: sampling stops before it
            bad = mismatch(got[0], ref, t, exact) if len(got) == 1 else f"frame {t}: {len(got)} frames returned"
            if bad:
                return n, bad
        return n or ref.frames, ""

    # -- the cache folder -----------------------------------------------------------------------

    def _load(self, file: Path) -> FileCheck | None:
        if not self._disk:
            return None
        try:
            return FileCheck(**json.loads(file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save(self, file: Path, rec: FileCheck) -> None:
        if not self._disk:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(rec)))
            os.replace(tmp, file)  # atomic: a worker reading it sees the old file or the whole new one
        except OSError as exc:
            log.warning("decode check: cannot write to %s (%s); verdicts stay in this process", self.cache_dir, exc)
            self._disk = False


def _versions() -> str:
    """The installed decoder packages' versions: a new build gets fresh verdicts."""
    from importlib import metadata

    out = []
    for dist in ("av", "torchcodec", "decord", "nvidia-dali-cuda120", "nvidia-dali-cuda130"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ",".join(out)
