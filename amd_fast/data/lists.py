"""Dataset lists in the formats VideoMAE / AMD users already have, and image folders.

Video list lines (space-, tab- or comma-separated; blank lines and ``#`` comments ignored):

    path                      # pre-training lists without labels (label -1)
    path label                # VideoMAE / AMD Kinetics and SSv2 lists
    path num_frames label     # gluoncv / TSN style: the middle field (a duration) is not needed and is ignored
    path start end label      # a frame range [start, end] (inclusive, as TSN); end -1 = to the last frame

Relative paths are joined to ``prefix`` (VideoMAE's ``data_root``), or to the list file's folder when no prefix
is given. Image folders are ``root/<class>/<image>``, classes numbered in sorted order (torchvision ImageFolder).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_SPLIT = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class Entry:
    path: str
    label: int = -1
    start: int = 0  # first frame of the usable range
    end: int = -1  # last frame (inclusive); -1: the last frame of the file


def parse_video_list(list_file: str | os.PathLike, prefix: str = "") -> list[Entry]:
    """Read a list file -> entries; a malformed line is an error naming the file and line number."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"data.list_file={str(list_file)!r} does not exist")
    base = prefix or str(list_file.parent)
    entries = []
    for lineno, raw in enumerate(list_file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f for f in _SPLIT.split(line) if f]
        try:
            nums = [int(f) for f in fields[1:]]
        except ValueError:
            raise ValueError(
                f"{list_file}:{lineno}: expected 'path [label]' with integer fields, got {raw!r}"
            ) from None
        if len(fields) > 4:
            raise ValueError(f"{list_file}:{lineno}: too many fields in {raw!r} (at most 'path start end label')")
        path = fields[0] if os.path.isabs(fields[0]) else os.path.join(base, fields[0])
        if len(nums) == 0:
            entries.append(Entry(path))
        elif len(nums) in (1, 2):
            entries.append(Entry(path, nums[-1]))
        else:
            entries.append(Entry(path, nums[2], start=nums[0], end=nums[1]))
    if not entries:
        raise ValueError(f"data.list_file={str(list_file)!r} has no entries")
    return entries


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Entry], list[str]]:
    """``root/<class>/<image>`` -> (entries, class names); classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    entries = [
        Entry(str(p), label)
        for label, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not entries:
        raise ValueError(f"image folder {str(root)!r} has no images under <class>/ sub-folders")
    return entries, classes
