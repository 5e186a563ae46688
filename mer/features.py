"""Local-region motion features: AU-based ROIs on the aligned crop, pooled per time step.

A ROI is a box around one landmark (a point ROI) or around a group of landmarks (a region). Its
feature per step is the mean of its top-k% largest flow vectors: AUs move a small patch of skin,
so the strongest vectors carry the signal while the rest of the box carries noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# iBUG-68 (0-based) left/right mirror permutation: landmark i of a mirrored face is MIRROR_68[i].
MIRROR_68 = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
     27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51,
     50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])

# The 18 ROIs of the reference method (image-left / image-right as seen in the frame). dy shifts a
# box down (+) or up (-) in half-sides: brow boxes sit above the brow, clear of the eyelids' blinks;
# lower-eyelid boxes sit below the lid.
DEFAULT_ROIS: list[dict] = [
    {"name": "brow_left", "landmarks": [17, 18, 19, 20, 21], "dy": -0.6},
    {"name": "brow_left_18", "landmarks": [18], "dy": -0.6},
    {"name": "brow_left_19", "landmarks": [19], "dy": -0.6},
    {"name": "brow_left_20", "landmarks": [20], "dy": -0.6},
    {"name": "brow_right", "landmarks": [22, 23, 24, 25, 26], "dy": -0.6},
    {"name": "brow_right_23", "landmarks": [23], "dy": -0.6},
    {"name": "brow_right_24", "landmarks": [24], "dy": -0.6},
    {"name": "brow_right_25", "landmarks": [25], "dy": -0.6},
    {"name": "mouth", "landmarks": list(range(48, 60))},
    {"name": "mouth_48", "landmarks": [48]},
    {"name": "mouth_54", "landmarks": [54]},
    {"name": "mouth_51", "landmarks": [51]},
    {"name": "mouth_57", "landmarks": [57]},
    {"name": "mouth_62", "landmarks": [62]},
    {"name": "nose_31", "landmarks": [31]},
    {"name": "nose_35", "landmarks": [35]},
    {"name": "eyelid_left", "landmarks": [40, 41], "dy": 0.5},
    {"name": "eyelid_right", "landmarks": [46, 47], "dy": 0.5},
]
CHANNELS = ("u", "v", "mag", "strain")


def roi_specs(setting: str | list) -> list[dict]:
    """The configured ROI list: 'default' or a list of {name, landmarks, dy?} (dy in half-sides)."""
    if setting == "default":
        return [dict(r) for r in DEFAULT_ROIS]
    if not isinstance(setting, list) or not setting:
        raise ValueError("preprocess.rois must be 'default' or a list of {name, landmarks[, dy]}")
    for r in setting:
        if not isinstance(r, dict) or "name" not in r or not r.get("landmarks"):
            raise ValueError(f"preprocess.rois: each ROI needs a name and landmarks, got {r!r}")
        if not all(0 <= int(i) < 68 for i in r["landmarks"]):
            raise ValueError(f"preprocess.rois: ROI '{r['name']}' has a landmark outside 0..67")
    return [dict(r) for r in setting]


def mirror_permutation(specs: list[dict]) -> np.ndarray:
    """perm[r] = the ROI that ROI r becomes in the left/right mirrored face."""
    keys = [tuple(sorted(r["landmarks"])) for r in specs]
    perm = []
    for r, key in zip(specs, keys):
        mirrored = tuple(sorted(MIRROR_68[list(key)]))
        if mirrored not in keys:
            raise ValueError(f"ROI '{r['name']}' has no mirror twin in the ROI set (needed for mirroring)")
        perm.append(keys.index(mirrored))
    return np.array(perm)


@dataclass
class RoiLayout:
    """Integer boxes (x0, y0, x1, y1) of each ROI on a crop, plus the nose-ridge box."""

    boxes: np.ndarray
    nose: np.ndarray


def roi_boxes(landmarks: np.ndarray, specs: list[dict], size: int, half: float,
              nose_landmarks: list[int]) -> RoiLayout:
    """Boxes of every ROI for landmarks given in crop pixels (size x size); `half` = half side
    of a point ROI as a fraction of the crop side."""
    h = max(1.0, half * size)

    def box(idx: list[int], dy: float = 0.0) -> list[int]:
        pts = landmarks[idx]
        x0, y0 = pts.min(0) - h
        x1, y1 = pts.max(0) + h
        y0, y1 = y0 + dy * h, y1 + dy * h
        x0, y0 = int(np.clip(np.floor(x0), 0, size - 2)), int(np.clip(np.floor(y0), 0, size - 2))
        x1, y1 = int(np.clip(np.ceil(x1), x0 + 2, size)), int(np.clip(np.ceil(y1), y0 + 2, size))
        return [x0, y0, x1, y1]

    boxes = np.array([box(r["landmarks"], float(r.get("dy", 0.0))) for r in specs], np.int32)
    return RoiLayout(boxes, np.array(box(nose_landmarks), np.int32))


def global_motion(flow: np.ndarray, nose_box: np.ndarray) -> np.ndarray:
    """Head translation: the median flow over the nose ridge, which no AU moves much."""
    x0, y0, x1, y1 = nose_box
    return np.median(flow[y0:y1, x0:x1].reshape(-1, 2), axis=0)


FACE_OUTLINE = list(range(0, 17)) + list(range(26, 16, -1))  # jaw, then brows right to left


class HeadMotion:
    """The head's own motion in a flow field, to subtract before pooling ROIs.

    'nose': the translation of the nose ridge (the reference method). 'similarity': translation,
    roll and scale fitted by least-median-of-squares to the flow sampled over the whole face, so
    that the local AU and blink motions (a minority of the face) are outliers and a slow roll no
    longer leaks into ROIs far from the nose."""

    def __init__(self, method: str, landmarks: np.ndarray, nose_box: np.ndarray, size: int):
        if method not in ("nose", "similarity"):
            raise ValueError(f"preprocess.head_motion must be nose or similarity, got '{method}'")
        self.method, self.nose_box = method, nose_box
        if method == "similarity":
            import cv2

            outline = landmarks[FACE_OUTLINE]
            centre = outline.mean(0)
            poly = (centre + 0.85 * (outline - centre)).astype(np.int32)  # clear of the face's edge
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            step = max(2, size // 40)
            ys, xs = np.nonzero(mask[::step, ::step])
            self.ys, self.xs = ys * step, xs * step
            self.pts = np.stack([self.xs, self.ys], 1).astype(np.float32)
            gy, gx = np.mgrid[0:size, 0:size].astype(np.float32)
            self.grid = np.stack([gx, gy], -1)
        self.nose_xy = np.array([(nose_box[0] + nose_box[2]) / 2, (nose_box[1] + nose_box[3]) / 2], np.float32)

    def __call__(self, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(motion to subtract: a (2,) vector or an (H, W, 2) field, [dx, dy, roll_deg] at the nose)."""
        if self.method == "nose":
            g = global_motion(flow, self.nose_box)
            return g, np.array([g[0], g[1], 0.0], np.float32)
        import cv2

        moved = self.pts + flow[self.ys, self.xs]
        m, _ = cv2.estimateAffinePartial2D(self.pts, moved, method=cv2.LMEDS)
        if m is None:  # degenerate (e.g. no texture): fall back to the nose
            g = global_motion(flow, self.nose_box)
            return g, np.array([g[0], g[1], 0.0], np.float32)
        m = m.astype(np.float32)
        lin = m[:, :2] - np.eye(2, dtype=np.float32)
        field = self.grid @ lin.T + m[:, 2]
        at_nose = self.nose_xy @ lin.T + m[:, 2]
        roll = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
        return field, np.array([at_nose[0], at_nose[1], roll], np.float32)


class RoiPooler:
    """Per step, the (R, C) features: per ROI the mean (u, v) and magnitude of its top-k% largest
    flow vectors, and the mean of its top-k% strain values. Box indices are computed once per
    clip, so a step costs two small numpy calls per ROI."""

    def __init__(self, boxes: np.ndarray, size: int, top_frac: float, channels: tuple[str, ...]):
        self.idx = [(np.arange(y0, y1)[:, None] * size + np.arange(x0, x1)[None, :]).ravel()
                    for x0, y0, x1, y1 in boxes]
        self.k = np.array([max(1, int(round(top_frac * len(i)))) for i in self.idx])
        self.starts = np.concatenate([[0], np.cumsum(self.k)[:-1]])
        self.channels = tuple(channels)
        unknown = set(self.channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"preprocess.channels: unknown {', '.join(sorted(unknown))} (valid: {', '.join(CHANNELS)})")

    def __call__(self, flow: np.ndarray, strain: np.ndarray | None = None) -> np.ndarray:
        u, v = flow[..., 0].ravel(), flow[..., 1].ravel()
        mag = np.hypot(u, v)
        top = np.concatenate([i[np.argpartition(mag[i], len(i) - k)[-k:]] for i, k in zip(self.idx, self.k)])
        pooled = {
            "u": lambda: np.add.reduceat(u[top], self.starts) / self.k,
            "v": lambda: np.add.reduceat(v[top], self.starts) / self.k,
            "mag": lambda: np.add.reduceat(mag[top], self.starts) / self.k,
            "strain": lambda: self._top_strain(strain),
        }
        return np.stack([pooled[c]() for c in self.channels], axis=1).astype(np.float32)

    def _top_strain(self, strain: np.ndarray | None) -> np.ndarray:
        if strain is None:
            raise ValueError("the strain channel needs the strain map")
        s = strain.ravel()
        return np.array([np.partition(s[i], len(i) - k)[-k:].mean() for i, k in zip(self.idx, self.k)])


def grid_frames(numbers: np.ndarray, fps: float, grid_ms: float, max_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `numbers`) of the frames nearest to a grid of `grid_ms` steps, and their
    times in ms from the first frame. Frame numbers, not positions, give time: gaps count."""
    times = (numbers - numbers[0]) * 1000.0 / fps
    end = min(times[-1], max_ms)
    grid = np.arange(0.0, end + 1e-6, grid_ms)
    pos = np.searchsorted(times, grid)
    pos = np.clip(pos, 0, len(times) - 1)
    prev = np.clip(pos - 1, 0, len(times) - 1)
    pos = np.where(np.abs(times[prev] - grid) <= np.abs(times[pos] - grid), prev, pos)
    pos = np.unique(pos)
    return pos, times[pos]
