"""Local-region motion features: AU-based ROIs on the aligned crop, pooled per time step.

A ROI is a box around one landmark (a point ROI) or around a group of landmarks (a region). Its
feature per step is the mean of its top-k% largest flow vectors: AUs move a small patch of skin,
so the strongest vectors carry the signal while the rest of the box carries noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .flow import as_complex, strain_magnitude

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


@dataclass
class Motion:
    """The head's own displacement field in a flow field (crop px). In coordinates normalised by
    `origin` and `scale` (q = (p - origin) / scale), d(q) / scale = lin @ q + t - q (g . q): an
    affine motion for g = 0 (similarity: origin 0, scale 1, d = lin @ p + t), and the first-order
    expansion of a homography otherwise (g: the perspective terms of a turning or nodding head).
    `summary` = [dx, dy, roll_deg] at the nose."""

    lin: np.ndarray
    t: np.ndarray
    summary: np.ndarray
    g: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    scale: float = 1.0

    def at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The displacement (u, v) at points."""
        qx, qy = (xs - self.origin[0]) / self.scale, (ys - self.origin[1]) / self.scale
        persp = self.g[0] * qx + self.g[1] * qy
        return (self.scale * (self.lin[0, 0] * qx + self.lin[0, 1] * qy + self.t[0] - qx * persp),
                self.scale * (self.lin[1, 0] * qx + self.lin[1, 1] * qy + self.t[1] - qy * persp))

    def at_complex(self, q: np.ndarray) -> np.ndarray:
        """The displacement u + iv at points q = x + iy (complex64). An affine motion is
        alpha q + beta conj(q) + t: two complex products where `at` takes a dozen passes (beta is 0
        for a similarity); a homography goes through `at`."""
        if self.g.any() or self.origin.any() or self.scale != 1.0:
            u, v = self.at(q.real, q.imag)
            return (u + 1j * v).astype(np.complex64)
        (a, b), (c, d) = self.lin.astype(np.float64)
        z = complex((a + d) / 2, (c - b) / 2) * q + complex(float(self.t[0]), float(self.t[1]))
        beta = complex((a - d) / 2, (c + b) / 2)
        return (z + beta * q.conj() if beta else z).astype(np.complex64, copy=False)

    def jacobian(self, x: float, y: float) -> np.ndarray:
        """d(u, v) / d(x, y) at one point (constant for an affine motion)."""
        qx, qy = (x - self.origin[0]) / self.scale, (y - self.origin[1]) / self.scale
        g1, g2 = self.g
        return self.lin - np.array([[2 * g1 * qx + g2 * qy, g2 * qx], [g1 * qy, g1 * qx + 2 * g2 * qy]], np.float32)

    def field(self, size: int) -> np.ndarray:
        """The displacement on the whole size x size crop, (size, size, 2)."""
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        return np.stack(self.at(xs, ys), -1).astype(np.float32)


IRLS_TOL_PX = 1e-3  # the fit stops once an iteration moves no point's displacement by more than this


def _irls(A: np.ndarray, d: np.ndarray, n_points: int, init: np.ndarray | None, iters: int) -> np.ndarray:
    """Robust least squares for a displacement model d = A p stacked as (all u rows, all v rows):
    Tukey's biweight on each point's residual length, scale from the median absolute residual,
    started from `init`, at most `iters` iterations, fewer once converged (warm-started from the
    previous step it mostly is after two); local AU and blink motions get zero weight."""
    p = np.zeros(A.shape[1]) if init is None else np.asarray(init, np.float64)
    last = None
    for _ in range(iters):
        r = d - A @ p
        if last is not None and np.abs(r - last).max() < IRLS_TOL_PX:
            break
        last = r
        wp = _tukey_weights(np.hypot(r[:n_points], r[n_points:]))  # one residual per point, both components
        if wp is None:
            break
        w = np.concatenate([wp, wp])
        if w.sum() < 2 * A.shape[1]:
            break
        Aw = A * w[:, None]
        try:
            p = np.linalg.solve(Aw.T @ A, Aw.T @ d)
        except np.linalg.LinAlgError:  # degenerate weights (points on a line): the least-norm fit
            p = np.linalg.lstsq(Aw.T @ A, Aw.T @ d, rcond=None)[0]
    return p


def _tukey_weights(residuals: np.ndarray) -> np.ndarray | None:
    """Tukey's biweight of each point's residual length, the scale from their median (0 beyond
    4.685 sigma: local AU and blink motions); None for no points or a broken (non-finite) flow,
    where a fit keeps its start."""
    if len(residuals) == 0 or not np.isfinite(residuals).all():
        return None
    sigma = max(1.4826 * _median(residuals), 1e-3)
    return np.clip(1 - (residuals / (4.685 * sigma)) ** 2, 0.0, None) ** 2


def _median(x: np.ndarray) -> float:
    """np.median of a 1-D array, without its per-call overhead (the fit runs once per step)."""
    m = len(x) // 2
    part = np.partition(x, [m - 1, m] if len(x) % 2 == 0 and m > 0 else [m])
    return float(part[m] if len(x) % 2 else (part[m - 1] + part[m]) / 2)


def fit_projective(q: np.ndarray, disp: np.ndarray, init: np.ndarray | None = None, iters: int = 6) -> np.ndarray:
    """Robust first-order homography of points in normalised coordinates: p = (a11, a12, a21, a22,
    tx, ty, g1, g2) with d(q) = A q + t - q (g . q), by IRLS (`_irls`)."""
    x, y = q[:, 0].astype(np.float64), q[:, 1].astype(np.float64)
    one, zero = np.ones_like(x), np.zeros_like(x)
    A = np.concatenate([np.stack([x, y, zero, zero, one, zero, -x * x, -x * y], 1),
                        np.stack([zero, zero, x, y, zero, one, -x * y, -y * y], 1)])
    d = np.concatenate([disp[:, 0], disp[:, 1]]).astype(np.float64)
    return _irls(A, d, len(x), init, iters)


def fit_similarity(pts: np.ndarray, flow_at: np.ndarray, init: np.ndarray | None = None,
                   iters: int = 6) -> np.ndarray:
    """Robust similarity motion of points: p = (a, b, tx, ty) with displacement
    d(x, y) = (a x - b y + tx, b x + a y + ty), by iteratively reweighted least squares with Tukey's
    biweight (scale from the median absolute residual), started from `init` (the previous step's
    fit: the head moves smoothly). Local AU and blink motions are outliers and get zero weight.

    The same fit as `_irls` on this model, in complex numbers (d = c q + t with q = x + iy,
    c = a + ib), where each weighted least-squares step has a closed form: a few dot products
    instead of a 4 x 4 system (it runs once per step of every clip)."""
    q = pts[:, 0].astype(np.float64) + 1j * pts[:, 1].astype(np.float64)
    d = flow_at[:, 0].astype(np.float64) + 1j * flow_at[:, 1].astype(np.float64)
    q2, qd = q.real ** 2 + q.imag ** 2, q.conj() * d  # the sums below need only these, weighted
    a, b, tx, ty = (0.0, 0.0, 0.0, 0.0) if init is None else (float(v) for v in init)
    c, t = complex(a, b), complex(tx, ty)
    last = None
    for _ in range(iters):
        r = d - (c * q + t)
        if last is not None and np.abs((r - last).view(np.float64)).max() < IRLS_TOL_PX:  # both components
            break
        last = r
        w = _tukey_weights(np.abs(r))  # one residual per point, both components
        if w is None:
            break
        total = w.sum()
        if total < 4:  # fewer (weighted) points than parameters
            break
        q_mean, d_mean = (w @ q) / total, (w @ d) / total
        wq2 = w @ q2
        spread = wq2 - total * abs(q_mean) ** 2  # sum of w |q - q_mean|^2
        at_one_place = spread <= 1e-12 * wq2  # (up to rounding)
        c = 0j if at_one_place else (w @ qd - total * q_mean.conjugate() * d_mean) / spread  # then a translation only
        t = d_mean - c * q_mean
    return np.array([c.real, c.imag, t.real, t.imag])


class HeadMotion:
    """The head's own motion in a flow field, to subtract before pooling ROIs.

    'homography': as 'similarity', with the 8 parameters of a first-order homography (an affine
    map plus the perspective terms of a slight turn or nod), fitted robustly at the same points.
    'nose': the translation of the nose ridge (the reference method). 'similarity': translation,
    roll and scale fitted robustly (`fit_similarity`) to the flow sampled at ~300 points over the
    whole face, warm-started from the previous step, so that the local AU and blink motions (a
    minority of the face) are outliers and a slow roll no longer leaks into ROIs far from the nose."""

    def __init__(self, method: str, landmarks: np.ndarray, nose_box: np.ndarray, size: int,
                 points: int = 300):
        if method not in ("nose", "similarity", "homography"):
            raise ValueError(f"preprocess.head_motion must be nose, similarity or homography, got '{method}'")
        self.method, self.nose_box = method, nose_box
        self.nose_xy = np.array([(nose_box[0] + nose_box[2]) / 2, (nose_box[1] + nose_box[3]) / 2], np.float32)
        self.prev = None
        if method in ("similarity", "homography"):
            import cv2

            outline = landmarks[FACE_OUTLINE]
            centre = outline.mean(0)
            poly = (centre + 0.85 * (outline - centre)).astype(np.int32)  # clear of the face's edge
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            step = max(2, int(np.sqrt(mask.sum() / points)))  # a grid of ~`points` points over the face
            ys, xs = np.nonzero(mask[step // 2::step, step // 2::step])
            self.ys, self.xs = ys * step + step // 2, xs * step + step // 2
            self.pts = np.stack([self.xs, self.ys], 1).astype(np.float32)
            self.origin = self.pts.mean(0)  # homography: coordinates normalised over the face
            self.scale = float(self.pts.std()) or 1.0
            self.q = (self.pts - self.origin) / self.scale

    def __call__(self, flow: np.ndarray) -> Motion:
        if self.method == "nose":
            g = global_motion(flow, self.nose_box)
            return Motion(np.zeros((2, 2), np.float32), g.astype(np.float32), np.array([g[0], g[1], 0.0], np.float32))
        if self.method == "homography":
            p = fit_projective(self.q, flow[self.ys, self.xs] / self.scale, self.prev)
            self.prev = p
            m = Motion(p[:4].reshape(2, 2).astype(np.float32), p[4:6].astype(np.float32), np.zeros(3, np.float32),
                       p[6:8].astype(np.float32), self.origin, self.scale)
            at_nose = m.at(self.nose_xy[:1], self.nose_xy[1:])
            j = m.jacobian(*self.nose_xy)
            roll = np.degrees(np.arctan2((j[1, 0] - j[0, 1]) / 2, 1 + (j[0, 0] + j[1, 1]) / 2))
            m.summary = np.array([at_nose[0][0], at_nose[1][0], roll], np.float32)
            return m
        p = fit_similarity(self.pts, flow[self.ys, self.xs], self.prev)
        self.prev = p
        a, b, tx, ty = p
        lin = np.array([[a, -b], [b, a]], np.float32)
        t = np.array([tx, ty], np.float32)
        at_nose = lin @ self.nose_xy + t
        roll = np.degrees(np.arctan2(b, 1 + a))
        return Motion(lin, t, np.array([at_nose[0], at_nose[1], roll], np.float32))


class RoiPooler:
    """Per step, the (R, C) features: per ROI the mean (u, v) and magnitude of its top-k% largest
    flow vectors after removing the head's motion, and the mean of its top-k% strain values;
    `last_motion`: the step's total ROI motion (sum of |mean (u, v)|), for the apex choice.

    Only the ROIs' pixels are touched: the head's motion is evaluated there, and strain (the
    magnitude of the strain tensor of the head-free flow, blind to rigid translation) on each box
    plus a one-pixel margin; an affine head motion has constant derivatives, so subtracting it
    after differentiating gives the same strain as on the corrected field."""

    def __init__(self, boxes: np.ndarray, size: int, top_frac: float, channels: tuple[str, ...]):
        self.boxes, self.size = np.asarray(boxes), size
        self.idx = [(np.arange(y0, y1)[:, None] * size + np.arange(x0, x1)[None, :]).ravel()
                    for x0, y0, x1, y1 in boxes]
        self.all = np.concatenate(self.idx)
        self.q = ((self.all % size) + 1j * (self.all // size)).astype(np.complex64)  # x + iy of each ROI pixel
        self.seg = np.concatenate([[0], np.cumsum([len(i) for i in self.idx])])
        self.k = np.array([max(1, int(round(top_frac * len(i)))) for i in self.idx])
        self.starts = np.concatenate([[0], np.cumsum(self.k)[:-1]])
        self.neighbours = self._neighbours()  # for strain at the ROI pixels
        self.sizes = np.diff(self.seg)
        self.centres = [((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2) for x0, y0, x1, y1 in self.boxes]
        self.channels = tuple(channels)
        unknown = set(self.channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"preprocess.channels: unknown {', '.join(sorted(unknown))} (valid: {', '.join(CHANNELS)})")

    def __call__(self, flow: np.ndarray, motion: Motion | None = None) -> np.ndarray:
        """Features of one step; `motion`: the head's motion to remove (None: the flow is already
        head-free)."""
        field = as_complex(flow)  # u + iv: one gather serves both components
        z = field[self.all]
        if motion is not None:
            z = z - motion.at_complex(self.q)
        mag = np.abs(z)
        top = np.concatenate([s + np.argpartition(mag[s:e], (e - s) - k)[-k:]
                              for s, e, k in zip(self.seg[:-1], self.seg[1:], self.k)])
        mean = np.add.reduceat(z[top], self.starts) / self.k
        mean_u, mean_v = mean.real, mean.imag
        self.last_motion = float(np.abs(mean).sum())  # the step's total ROI motion, whatever is cached
        pooled = {
            "u": lambda: mean_u,
            "v": lambda: mean_v,
            "mag": lambda: np.add.reduceat(mag[top], self.starts) / self.k,
            "strain": lambda: self._top_strain(field, motion),
        }
        return np.stack([pooled[c]() for c in self.channels], axis=1).astype(np.float32)

    def _neighbours(self) -> tuple[np.ndarray, ...]:
        """Flat indices of each ROI pixel's neighbours and the inverse spacing between them: central
        differences inside the crop, one-sided at its edges (exactly np.gradient's)."""
        n, x, y = self.size, self.all % self.size, self.all // self.size
        left, right = self.all - (x > 0), self.all + (x < n - 1)
        up, down = self.all - n * (y > 0), self.all + n * (y < n - 1)
        return left, right, 1 / (right - left).astype(np.float32), up, down, 1 / ((down - up) // n).astype(np.float32)

    def _top_strain(self, z: np.ndarray, motion: Motion | None) -> np.ndarray:
        """Mean of each ROI's top-k strain values of the flow `z` (`as_complex`), differentiated at
        the ROI pixels only; the head's affine part (its Jacobian at each ROI's centre) is
        subtracted from the derivatives."""
        left, right, inv_dx, up, down, inv_dy = self.neighbours
        d_dx, d_dy = (z[right] - z[left]) * inv_dx, (z[down] - z[up]) * inv_dy  # du/d. + i dv/d.
        jac = None
        if motion is not None:
            if motion.g.any():  # a homography: its Jacobian varies, taken at each ROI's centre
                jac = np.repeat(np.stack([motion.jacobian(cx, cy) for cx, cy in self.centres]), self.sizes, axis=0)
            else:  # affine: the same everywhere
                jac = motion.lin
        strain = strain_magnitude(d_dx, d_dy, jac)
        tops = np.concatenate([np.partition(strain[s:e], (e - s) - k)[-k:]
                               for s, e, k in zip(self.seg[:-1], self.seg[1:], self.k)])
        return np.add.reduceat(tops, self.starts) / self.k


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


def motion_magnitude(features: np.ndarray, channels: list[str]) -> tuple[np.ndarray, str]:
    """(T, R) motion per ROI and what it is: |(u, v)| found by channel name, else the mag channel,
    else the sum of the absolute channels."""
    if "u" in channels and "v" in channels:
        f = features[..., [channels.index("u"), channels.index("v")]]
        return np.hypot(f[..., 0], f[..., 1]), "ROI motion |(u, v)| (% of inner-eye distance)"
    if "mag" in channels:
        return features[..., channels.index("mag")], "ROI motion magnitude (% of inner-eye distance)"
    return np.abs(features).sum(-1), f"sum of |{', '.join(channels) or 'channels'}|"


APEX_FRAMES = ("spotted", "blink_free", "max_motion")  # preprocess.apex_frame: how the onset-apex frame is chosen


def spot_apex_score(uv: np.ndarray, times: np.ndarray, window_ms: float) -> np.ndarray:
    """(T,) how far each step's ROI motion stands out from the mean of the steps `window_ms` before
    and after it, summed over the ROIs: the feature difference of micro-expression spotting
    (Moilanen et al., ICPR 2014). An expression rises and falls within a few hundred ms; residual
    head drift changes slowly and cancels, so the apex, not the clip's end, scores highest. Near
    either end the window shrinks to what the clip holds on both sides (a one-sided comparison
    would let the drift back in). uv: (T, R, 2) motion from the reference frame; times: (T,) ms,
    increasing."""
    uv = np.asarray(uv, np.float64)
    times = np.asarray(times, np.float64)
    if uv.ndim != 3 or uv.shape[-1] != 2 or len(uv) != len(times):
        raise ValueError(f"uv must be (T, R, 2) with T = len(times), got {uv.shape} and {times.shape}")
    if window_ms <= 0:
        raise ValueError(f"preprocess.apex_spot_ms must be > 0, got {window_ms}")
    last = len(times) - 1
    w = np.minimum(window_ms, np.minimum(times - times[0], times[-1] - times))
    before = np.clip(np.searchsorted(times, times - w - 1e-6), 0, last)
    after = np.clip(np.searchsorted(times, times + w - 1e-6), 0, last)
    return np.linalg.norm(uv - (uv[before] + uv[after]) / 2, axis=-1).sum(axis=1)
