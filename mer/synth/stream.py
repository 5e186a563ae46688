"""Generated clips streamed straight into preprocessing: frames rendered in memory on demand.

A benchmark that needs thousands of 1024x768 clips cannot keep them on disk (a DFME-size set of
PNGs is ~200 GB); `RenderedFrames` renders only the frames preprocessing asks for, once, and never
writes them. Frames are turned grey exactly as OpenCV's PNG decoder does when preprocessing reads
the generator's PNG files (`png_grey`), so features are bit-identical to those of the files.
"""

from __future__ import annotations

import numpy as np

from .camera import ClipRenderer
from .config import ClipSpec, SynthConfig


def png_grey(bgr: np.ndarray) -> np.ndarray:
    """BGR -> grey exactly as ``cv2.imread(png, IMREAD_GRAYSCALE)`` (libpng's fixed-point
    rgb-to-grey: 0.299, 0.587 as 9797, 19234 and 3737 / 32768, truncated), not ``cv2.cvtColor`` (rounded): one
    grey level of difference in half the pixels changes sub-pixel flow features noticeably."""
    b, g, r = (bgr[..., k].astype(np.uint32) for k in range(3))
    return ((r * 9797 + g * 19234 + b * 3737) >> 15).astype(np.uint8)


class RenderedFrames:
    """A `mer.frames.FrameSource` over a generated clip: frame numbers 1..n, rendered on first read."""

    def __init__(self, spec: ClipSpec, config: SynthConfig, fps: int | None = None):
        self.renderer = ClipRenderer(spec, config, fps)
        self.numbers = np.arange(1, len(self.renderer) + 1, dtype=np.float64)
        self._cache: dict[int, np.ndarray] = {}
        self.rendered = 0

    def __len__(self) -> int:
        return len(self.renderer)

    def read(self, i: int, reduce: int = 1) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = png_grey(self.renderer.frame(i))
            self.rendered += 1
        return self._cache[i]

    def name(self, i: int) -> str:
        return f"{i + 1:05d} (rendered)"
