"""Face: 68 landmarks on a frame, and the aligned crop anchored on the inner eye corners.

Landmarks use the iBUG-68 numbering, 0-based, as (x, y) pixel coordinates. The default backend
(dlib HOG + the 68-point model of face-recognition-models) runs offline; FAN (face-alignment)
is opt-in and needs its weights in the torch hub cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from typing import NamedTuple

from .errors import UserError

INNER_EYE_CORNERS = (39, 42)   # subject's right eye inner corner, left eye inner corner
OUTER_EYE_CORNERS = (36, 45)
FAN_FILES = ("2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth")


class Detection(NamedTuple):
    """The landmarks of the face chosen in a frame, its detector score and how many faces were seen."""

    landmarks: np.ndarray  # (68, 2) x, y in frame px
    score: float
    faces: int = 1


def choose_face(boxes: np.ndarray, shape: tuple[int, ...]) -> int:
    """Index of the face to use among `boxes` (x0, y0, x1, y1): the largest, with faces away from
    the frame centre counting less (a subject sits in front of the camera; bystanders and posters
    are smaller or off-centre). The same frame always gives the same choice."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    h, w = shape[:2]
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2 / w - 0.5, (b[:, 1] + b[:, 3]) / 2 / h - 0.5], 1)
    off = np.hypot(*centre.T) / np.hypot(0.5, 0.5)  # 0 at the centre, 1 in a corner
    return int(np.argmax(area * (1.0 - 0.5 * off)))


def dlib_model_path() -> Path:
    """The 68-point model shipped by face-recognition-models (found without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the package face-recognition-models is not installed (pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise UserError(f"dlib's 68-point model is missing: {path}")
    return path


class DlibLandmarks:
    """dlib HOG face detector (on a frame scaled to `detect_width`, for speed) + the 68-point
    shape predictor on the full-resolution frame."""

    def __init__(self, upsample: int = 0, detect_width: int = 320):
        import dlib

        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_path()))
        self.upsample = upsample
        self.detect_width = detect_width
        self._dlib = dlib

    def __call__(self, gray: np.ndarray) -> Detection | None:
        """The landmarks of the chosen face (`choose_face`), or None."""
        factor = max(1.0, gray.shape[1] / self.detect_width)
        for f in dict.fromkeys([factor, 1.0]):  # small image first; full size if that finds nothing
            img = gray if f == 1.0 else cv2.resize(
                gray, (round(gray.shape[1] / f), round(gray.shape[0] / f)), interpolation=cv2.INTER_AREA)
            rects, scores, _ = self.detector.run(img, self.upsample, -0.3)
            if len(rects):
                break
        if len(rects) == 0:
            return None
        best = choose_face(np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects]), img.shape)
        r = rects[best]
        rect = self._dlib.rectangle(round(r.left() * f), round(r.top() * f), round(r.right() * f), round(r.bottom() * f))
        shape = self.predictor(gray, rect)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        return Detection(pts, float(scores[best]), len(rects))


class FanLandmarks:
    """face-alignment's 2D FAN (more precise landmarks); offline only once its weights are cached."""

    def __init__(self, device: str = "cpu"):
        import torch

        folder = Path(torch.hub.get_dir()) / "checkpoints"
        missing = [f for f in FAN_FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"--landmarks fan needs face-alignment's weights, missing: {', '.join(missing)}; "
                f"place them in {folder} (they are downloaded there on first use when online), "
                "or use the default --landmarks dlib"
            )
        import face_alignment

        self.model = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, flip_input=False, compile=False)

    def __call__(self, gray: np.ndarray) -> Detection | None:
        """The landmarks of the chosen face (`choose_face` on the landmarks' extent), or None."""
        rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
        out = self.model.get_landmarks_from_image(rgb, return_landmark_score=True)
        preds, scores = out[0], out[1]
        if not preds:
            return None
        boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in preds])
        best = choose_face(boxes, gray.shape)
        return Detection(np.asarray(preds[best][:, :2], np.float32), float(np.mean(scores[best])), len(preds))


def make_landmarker(name: str, upsample: int = 0, device: str = "cpu", detect_width: int = 320):
    if name == "dlib":
        return DlibLandmarks(upsample, detect_width)
    if name == "fan":
        return FanLandmarks(device)
    raise UserError(f"preprocess.landmarks must be dlib or fan, got '{name}'")


# A symmetric neutral face (dlib's landmarks of a real photo, mirror-averaged), in units of the
# inner-eye-corner distance from their midpoint, eye line horizontal. Used only for the flagged
# centred-box fallback of a test clip in which no face was found.
TEMPLATE_68 = np.array([
    [-1.770, 0.056], [-1.731, 0.518], [-1.674, 0.941], [-1.597, 1.404], [-1.462, 1.827], [-1.211, 2.212],
    [-0.846, 2.520], [-0.442, 2.770], [0.000, 2.829], [0.442, 2.770], [0.846, 2.520], [1.211, 2.212],
    [1.462, 1.827], [1.597, 1.404], [1.674, 0.941], [1.731, 0.518], [1.770, 0.056], [-1.502, -0.347],
    [-1.309, -0.559], [-1.001, -0.616], [-0.692, -0.578], [-0.385, -0.463], [0.385, -0.463], [0.692, -0.578],
    [1.001, -0.616], [1.309, -0.559], [1.502, -0.347], [0.000, -0.098], [0.000, 0.250], [0.000, 0.557],
    [0.000, 0.864], [-0.385, 1.038], [-0.192, 1.096], [0.000, 1.134], [0.192, 1.096], [0.385, 1.038],
    [-1.154, -0.077], [-0.963, -0.192], [-0.694, -0.192], [-0.500, 0.000], [-0.731, 0.019], [-0.962, 0.019],
    [0.500, 0.000], [0.694, -0.192], [0.963, -0.192], [1.154, -0.077], [0.962, 0.019], [0.731, 0.019],
    [-0.846, 1.367], [-0.538, 1.347], [-0.231, 1.345], [0.000, 1.403], [0.231, 1.345], [0.538, 1.347],
    [0.846, 1.367], [0.558, 1.771], [0.250, 1.943], [0.000, 1.983], [-0.250, 1.943], [-0.558, 1.771],
    [-0.730, 1.424], [-0.211, 1.481], [0.000, 1.520], [0.211, 1.481], [0.730, 1.424], [0.230, 1.750],
    [0.000, 1.789], [-0.230, 1.750],
], np.float32)


def template_landmarks(size: float, crop_scale: float, center_y: float) -> np.ndarray:
    """TEMPLATE_68 laid out in a size x size aligned crop."""
    return (TEMPLATE_68 / crop_scale + np.array([0.5, center_y], np.float32)) * size


def crop_matrix(landmarks: np.ndarray, size: int, crop_scale: float, center_y: float) -> np.ndarray:
    """2x3 affine map from frame pixels to an aligned size x size crop.

    The eye line is made horizontal; the crop's side is crop_scale x the distance between the
    inner eye corners, whose midpoint sits at (0.5, center_y) of the crop."""
    a, b = landmarks[INNER_EYE_CORNERS[0]], landmarks[INNER_EYE_CORNERS[1]]
    oa, ob = landmarks[OUTER_EYE_CORNERS[0]], landmarks[OUTER_EYE_CORNERS[1]]
    angle = np.degrees(np.arctan2(ob[1] - oa[1], ob[0] - oa[0]))
    dist = float(np.hypot(*(b - a)))
    if dist < 2:
        raise ValueError("inner eye corners coincide: landmarks are degenerate")
    scale = size / (crop_scale * dist)
    mid = (a + b) / 2
    m = cv2.getRotationMatrix2D((float(mid[0]), float(mid[1])), float(angle), scale)
    m[:, 2] += np.array([0.5 * size, center_y * size]) - mid
    return m


def centred_matrix(shape: tuple[int, int], size: int, fraction: float = 0.5) -> np.ndarray:
    """Fallback crop: a square of `fraction` x the frame's shorter side at the frame's centre."""
    h, w = shape[:2]
    side = fraction * min(h, w)
    s = size / side
    return np.array([[s, 0, size / 2 - s * w / 2], [0, s, size / 2 - s * h / 2]], np.float64)


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


class Cropper:
    """Frame -> aligned crop without aliasing.

    A 300-450 px face shrunk to a 192 px flow crop is a 2-3x reduction; sampling it bilinearly
    (warpAffine has no area mode) aliases skin texture and noise into exactly the sub-pixel motion
    the method measures. So the frame is first shrunk by the largest power of two not above the
    reduction, with proper low-pass filtering (JPEG: decoded at that size by its DCT scaling; other
    formats: area averaging of the region the crop reads), then warped by the small remainder."""

    def __init__(self, m: np.ndarray, size: int, shape: tuple[int, int], margin: float = 0.0, blur: float = 0.0):
        self.m, self.size, self.shape, self.margin = np.asarray(m, np.float64), int(size), shape[:2], float(margin)
        self.blur = float(blur)  # Gaussian sigma (crop px) applied to every crop: the same low-pass whatever the path
        self.scale = float(np.sqrt(abs(np.linalg.det(self.m[:, :2]))))  # crop px per frame px
        self.factor = min(int(2 ** np.floor(np.log2(1.0 / self.scale))), 8) if self.scale <= 0.5 else 1
        self._region = (None, None)

    def region(self, offset: np.ndarray) -> tuple[int, int, int, int]:
        """The frame region (x0, y0, x1, y1; multiples of the factor) the crop shifted by `offset`
        reads, with `margin` crop px to spare; recomputed only when the crop moved beyond it."""
        anchor, box = self._region
        if anchor is not None and np.abs(offset - anchor).max() <= self.margin / 2:
            return box
        m = self.m.copy()
        m[:, 2] -= offset
        s, f = self.size, self.factor
        corners = transform_points(cv2.invertAffineTransform(m), np.array([[0, 0], [s, 0], [0, s], [s, s]], np.float64))
        pad = self.margin / self.scale + 2 * f
        x0, y0 = (np.floor((corners.min(0) - pad) / f) * f).astype(int)
        x1, y1 = (np.ceil((corners.max(0) + pad) / f) * f).astype(int)
        h, w = self.shape
        box = (max(x0, 0), max(y0, 0), max(min(x1, w - w % f), f), max(min(y1, h - h % f), f))
        self._region = (np.array(offset, np.float64), box)
        return box

    def _reduced_matrix(self, f: int, x0: int, y0: int, offset: np.ndarray) -> np.ndarray:
        """The crop matrix for an image shrunk by f whose pixel (0, 0) covers frame pixels (x0, y0)
        .. (x0 + f - 1, y0 + f - 1), shifted by -offset (crop px: re-anchoring)."""
        m = self.m.copy()
        m[:, 2] -= offset
        s = np.array([[f, 0, x0 + (f - 1) / 2], [0, f, y0 + (f - 1) / 2], [0, 0, 1]], np.float64)
        return m @ s

    def __call__(self, img: np.ndarray, full_shape: tuple[int, int], offset=(0.0, 0.0)) -> np.ndarray:
        """The crop of a frame given at full size or already reduced by `self.factor` (full_shape:
        the frame's size at full resolution), shifted by `offset` crop pixels."""
        f, offset = self.factor, np.asarray(offset, np.float64)
        if f > 1 and img.shape[:2] != tuple(full_shape[:2]):  # decoded reduced (JPEG)
            m = self._reduced_matrix(f, 0, 0, offset)
        elif f > 1:
            x0, y0, x1, y1 = self.region(offset)
            small = cv2.resize(img[y0:y1, x0:x1], ((x1 - x0) // f, (y1 - y0) // f), interpolation=cv2.INTER_AREA)
            img, m = small, self._reduced_matrix(f, x0, y0, offset)
        else:
            m = self._reduced_matrix(1, 0, 0, offset)
        out = cv2.warpAffine(img, m, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return cv2.GaussianBlur(out, (0, 0), self.blur) if self.blur > 0 else out


