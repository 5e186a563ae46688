"""A clip's frames by position: their frame numbers and a reader that decodes only what is asked for.

Preprocessing reads frames through this interface, so the same code runs on image folders on disk
(`FolderFrames`) and on frames rendered in memory by the generator (`mer.synth.stream`), which lets
a benchmark stream thousands of generated clips without writing them to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .data import FRAME_EXTS, numbered_frames


_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


class FrameSource(Protocol):
    """Frames of one clip, in time order."""

    numbers: np.ndarray  # frame number of each position (from the file names; gaps count as time)

    def __len__(self) -> int: ...

    def read(self, i: int, reduce: int = 1) -> np.ndarray | None:
        """Frame at position i as an 8-bit grayscale image, or None if it cannot be decoded.

        reduce (1, 2, 4 or 8): the caller will shrink the frame by this factor; a source that can
        decode at that resolution directly (JPEG's DCT scaling) returns the smaller image, whose
        pixel j covers full-resolution pixels reduce*j .. reduce*j + reduce - 1. Check the shape."""

    def name(self, i: int) -> str:
        """How to name frame i in a message."""


@dataclass
class FolderFrames:
    """Image files of a folder, sorted by the number in their names."""

    paths: list[str]
    numbers: np.ndarray

    @classmethod
    def of(cls, folder: str | Path, exts=FRAME_EXTS, start: float = np.nan,
           end: float = np.nan, names: tuple[str, ...] | None = None) -> "FolderFrames":
        """The frames of `folder`, limited to frame numbers start..end when both are given;
        names: its file names if already listed (else the folder is listed)."""
        numbered = numbered_frames(folder, exts, names)
        numbers = np.array([n for n, _ in numbered], np.float64)
        paths = [os.path.join(folder, f) for _, f in numbered]  # plain strings: cv2 takes them as they are
        if not np.isnan(start) and not np.isnan(end):
            keep = (numbers >= start) & (numbers <= end)
            paths, numbers = [f for f, k in zip(paths, keep) if k], numbers[keep]
        return cls(paths, numbers)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int, reduce: int = 1) -> np.ndarray | None:
        path = self.paths[i]
        if not path.lower().endswith((".jpg", ".jpeg")):
            return cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        try:
            data = np.fromfile(path, np.uint8)
        except OSError:  # gone since the folder was listed
            return None
        is_jpeg = data[:2].tobytes() == b"\xff\xd8"  # by content: a .jpg may hold another format
        if data.size == 0 or (is_jpeg and not jpeg_is_complete(data)):
            return None  # empty, or cut short (an interrupted copy): libjpeg would grey out the rest
        try:  # only libjpeg decodes reduced (ceil(size / reduce)); other content comes back whole
            return cv2.imdecode(data, _REDUCED[min(reduce, 8)] if reduce > 1 and is_jpeg else cv2.IMREAD_GRAYSCALE)
        except cv2.error:
            return None

    def name(self, i: int) -> str:
        return os.path.basename(self.paths[i])


def jpeg_is_complete(data: np.ndarray) -> bool:
    """Whether JPEG bytes hold the end-of-image marker (FF D9) after the image's first scan: a file
    cut short lacks it (inside compressed data an FF byte is never followed by D9). Usually it ends
    the file; otherwise (data appended after the image, as some cameras do) the header segments are
    walked to the first scan, so that an embedded thumbnail's end marker does not count."""
    if data[-64:].tobytes().find(b"\xff\xd9") >= 0:
        return True
    b = data.tobytes()
    i = 2  # after the start-of-image marker
    while i + 4 <= len(b) and b[i] == 0xFF:
        if b[i + 1] == 0xFF:  # a fill byte
            i += 1
        elif b[i + 1] == 0xDA:  # start of scan: the compressed image follows
            return b.find(b"\xff\xd9", i) >= 0
        else:
            i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return False


def write_video_frames(video: str | Path, folder: str | Path, ext: str = ".png", digits: int = 5) -> tuple[int, float]:
    """Decode a video into numbered frame images (00001.png, ...) in `folder`, the layout every
    reader expects; returns (frames written, the video's frame rate)."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f"cannot open video {video}")
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or float("nan")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n += 1
        cv2.imwrite(str(folder / f"{n:0{digits}d}{ext}"), frame)
    cap.release()
    if n == 0:
        raise ValueError(f"no frame could be decoded from {video}")
    return n, fps

