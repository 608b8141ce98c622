"""Real test media: moving Fashion-MNIST clips written as H.264 ``.mp4`` and VP9 ``.webm`` files with list files.

The default video-file job, the tests and ``benchmarks/data.py`` decode these, so every path through the decoders
runs on real compressed files. Clips reuse the moving-Fashion-MNIST motions (``moving.py``: the label is the
motion class), drawn on a ``width x height`` canvas and tinted with a random colour per clip so the YUV -> RGB
conversion is exercised (a grey garment would only test the luma plane). Encoding is PyAV's bundled FFmpeg
(libx264 / libvpx-vp9), yuv420p, a fixed GOP so seeks cost the same in every backend.

    python -m amd_fast.data.media --out data/moving_mp4 --codec h264 --count 64
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from .moving import NUM_MOTION_CLASSES, axis_weights, motion_trajectory
from .transforms import sample_seed

CODECS = {"h264": ("libx264", ".mp4"), "vp9": ("libvpx-vp9", ".webm"), "mjpeg": ("mjpeg", ".avi")}


def render_frames(
    garment_SS: torch.Tensor, gen: torch.Generator, label: int, num_frames: int, height: int, width: int
) -> np.ndarray:
    """One tinted moving-garment clip -> uint8 [T, height, width, 3] (motion drawn on a ``width``-wide canvas)."""
    cx, cy, side = motion_trajectory(gen, label, num_frames, width)
    cy = cy * (height / width)  # same motion, squeezed into the frame's rows; the object keeps its aspect
    ay_THS = axis_weights(cy, side, height, garment_SS.shape[0])
    ax_TWS = axis_weights(cx, side, width, garment_SS.shape[1])
    gray_THW = torch.bmm(torch.matmul(ay_THS, garment_SS), ax_TWS.transpose(1, 2))
    tint = 0.35 + 0.65 * torch.rand(3, generator=gen)  # a bright random colour
    rgb = gray_THW.unsqueeze(-1) * tint  # [T, H, W, 3]
    return (rgb.clamp_(0, 1) * 255).round_().to(torch.uint8).numpy()


def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, codec: str = "h264", fps: int = 25, gop: int = 16):
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) to ``path`` with PyAV; ``codec`` is a key of CODECS."""
    import av  # optional dependency (the "video" extra)

    name = CODECS[codec][0]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(name, rate=Fraction(fps))
        stream.height, stream.width = frames_THWC.shape[1:3]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.gop_size = gop
        # Deterministic, quick encodes: one thread, fixed quality; b-frames off so frame order == decode order.
        if codec == "h264":
            stream.options = {"preset": "veryfast", "crf": "18", "bf": "0", "threads": "1"}
        elif codec == "vp9":
            stream.options = {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1"}
        for rgb in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_moving_clips(
    out_dir: str | os.PathLike,
    count: int,
    *,
    codec: str = "h264",
    num_frames: int = 48,
    height: int = 96,
    width: int = 128,
    fps: int = 25,
    gop: int = 16,
    seed: int = 0,
    root: str = DEFAULT_ROOT,
    split: str = "train",
) -> Path:
    """Write ``count`` clips ``clip_00000.<ext>`` and ``list.txt`` (``name label`` lines) -> the list path.

    Deterministic in (seed, index); files already there are kept, so a second call is free.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, _ = load_fashion_mnist(root, split)
    ext = CODECS[codec][1]
    lines = []
    for i in range(count):
        gen = torch.Generator().manual_seed(sample_seed(seed, i))
        label = int(torch.randint(0, NUM_MOTION_CLASSES, (1,), generator=gen))
        name = f"clip_{i:05d}{ext}"
        if not (out / name).exists():
            frames = render_frames(images[i].float() / 255.0, gen, label, num_frames, height, width)
            tmp = out / f".tmp_{name}"
            write_video(tmp, frames, codec, fps, gop)
            os.replace(tmp, out / name)  # a killed run never leaves a half-written clip under the final name
        lines.append(f"{name} {label}\n")
    list_path = out / "list.txt"
    list_path.write_text("".join(lines))
    return list_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--codec", default="h264", choices=sorted(CODECS))
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--gop", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_moving_clips(a.out, a.count, codec=a.codec, num_frames=a.frames, height=a.height, width=a.width,
                              gop=a.gop, seed=a.seed)  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
