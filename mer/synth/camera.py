"""The camera: a clip's scene (background, the subject's cut-out, AU, blink and head-pose fields)
rendered to frames with sensor noise, mains-light flicker and compression.

A frame is a backward warp of the subject's template: each frame pixel looks up the template
through the head's placement (drift, roll, zoom) and the face's displacement fields (AUs, blinks
and the depth parallax of out-of-plane turns), over a static background.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from .aus import au_blobs, blink_blobs, side_gains
from .config import ClipSpec, SynthConfig, rng_for
from .dynamics import clip_curves, clip_details, crop_px_to_frame, face_template, signals, times_ms
from .faces import FaceFrame, blobs_grid, head_depth, load_photo

_PAD = 8  # noise pool margin (px): frames read the pool at random offsets


def background(config: SynthConfig, subj: dict) -> np.ndarray:
    """Plausible, non-trivial room background (gradient, texture, structure, vignetting)."""
    rng = np.random.default_rng(subj["bg_seed"])
    W, H = config.width, config.height
    X, Y = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    level = rng.uniform(70, 190)
    c1 = level + rng.normal(0, 18, 3)
    c2 = c1 * rng.uniform(0.7, 1.2) + rng.normal(0, 10, 3)
    th = rng.uniform(0, 2 * np.pi)
    ramp = ((X - W / 2) * np.cos(th) + (Y - H / 2) * np.sin(th)) / max(W, H) + 0.5
    bg = c1[None, None, :] + (c2 - c1)[None, None, :] * ramp[..., None]
    for scale in (4, 12, 40):
        small = rng.normal(0, 1, (H // scale + 2, W // scale + 2)).astype(np.float32)
        up = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
        tint = 1 + rng.normal(0, 0.1, 3)
        bg += rng.uniform(2, 8) * up[..., None] * tint[None, None, :]
    style = int(rng.integers(0, 3))
    if style == 0:  # wall corner / door frame: soft vertical steps
        for _ in range(int(rng.integers(1, 3))):
            xe = rng.uniform(0.05, 0.95) * W
            step = 0.5 + 0.5 * np.tanh((X - xe) / (2 * rng.uniform(0.7, 3.0)))
            bg += rng.uniform(-30, 30) * step[..., None]
    elif style == 1:  # curtain folds
        period = rng.uniform(25, 70) * W / 640
        folds = np.sin(2 * np.pi * X / period + rng.uniform(0, 6.3))
        folds += 0.5 * np.sin(2 * np.pi * X / (period * 0.43) + rng.uniform(0, 6.3))
        bg *= (1 + rng.uniform(0.05, 0.15) * folds)[..., None]
    else:  # shelves / panels
        panel = np.zeros((H, W), np.float32)
        for _ in range(int(rng.integers(2, 5))):
            x0, x1 = np.sort(rng.uniform(0, W, 2))
            y0, y1 = np.sort(rng.uniform(0, H, 2))
            cv2.rectangle(panel, (int(x0), int(y0)), (int(x1), int(y1)), float(rng.uniform(-35, 35)), -1)
        panel = cv2.GaussianBlur(panel, (0, 0), 1.2)
        bg += panel[..., None]
    grain = cv2.GaussianBlur(rng.normal(0, rng.uniform(1, 3), (H, W)).astype(np.float32), (0, 0), 0.6)
    bg += grain[..., None]
    r2 = ((X - W / 2) / (W / 2)) ** 2 + ((Y - H / 2) / (H / 2)) ** 2
    bg *= (1 - rng.uniform(0.08, 0.25) * r2 / 2)[..., None]
    return np.clip(bg, 0, 255).astype(np.float32)


class Scene:
    """Pre-rendered parts of one clip: background, the subject as seen at rest, fields, placement.

    Scene coordinates are frame pixels with the head at rest (frame 1): the subject's photo is
    morphed, mirrored, scaled, rolled and placed once, so that a frame only undoes the small in-clip
    head motion, p0 = R(-roll) (p - c - drift) / (1 + zoom) + c, then the face's displacement fields
    (AUs, blinks, depth parallax), and samples the pre-rendered subject: a near-identity map."""

    def __init__(self, spec: ClipSpec, config: SynthConfig) -> None:
        self.spec, self.config = spec, config
        d = self.details = clip_details(spec, config)
        subj = d["subject"]
        W, H = config.width, config.height
        photo = load_photo(subj["photo"])
        Lt, morph, S = face_template(subj)  # template coords: the photo's face centre at 0,0
        origin = photo.landmarks.mean(0)
        cx, cy = subj["centre"]
        pl = d["place"]
        self.c_t = Lt.mean(0)
        self.c_f = np.array([(cx + pl["dx"]) * W, (cy + pl["dy"]) * H])
        self.theta0 = subj["roll_deg"] + pl["droll"]
        self.landmarks = self._rest(Lt)  # frame 1
        ff = self.ff = FaceFrame(self.landmarks)

        hd = d["head"]
        margin = 12 + 1.5 * (np.hypot(*hd["drift"]) + 2 * hd["wobble"][0]
                             + np.deg2rad(abs(hd["rot"]) + 2 * hd["rot_wobble"][0]) * np.hypot(W, H)
                             + abs(hd["zoom"]) * np.hypot(W, H))
        # the subject's cut-out at rest, in frame pixels (plus the margin the motion can reach)
        bx0, by0, bx1, by1 = photo.box
        corners = (np.array([[bx0, by0], [bx1, by0], [bx0, by1], [bx1, by1]]) - origin) * S
        if subj["mirror"]:
            corners = corners * np.array([-1.0, 1.0])
        rest = self._rest(corners)
        x0, y0 = np.maximum(np.floor(rest.min(0) - margin), [-margin, -margin]).astype(int)
        x1, y1 = np.minimum(np.ceil(rest.max(0) + margin), [W + margin, H + margin]).astype(int)
        self.s_off = np.array([x0, y0], np.float32)
        sw, sh = x1 - x0, y1 - y0

        # backward map scene -> template -> photo: q = rest^-1(p0); u = q - morph(q); unmirror; scale
        px, py = np.meshgrid(np.arange(sw, dtype=np.float32) + x0, np.arange(sh, dtype=np.float32) + y0)
        c, si = np.cos(np.deg2rad(self.theta0)), np.sin(np.deg2rad(self.theta0))
        qx = (c * (px - self.c_f[0]) + si * (py - self.c_f[1]) + self.c_t[0]).astype(np.float32)
        qy = (-si * (px - self.c_f[0]) + c * (py - self.c_f[1]) + self.c_t[1]).astype(np.float32)
        tx0, ty0 = int(np.floor(qx.min())) - 2, int(np.floor(qy.min())) - 2
        tw, th = int(np.ceil(qx.max())) + 3 - tx0, int(np.ceil(qy.max())) + 3 - ty0
        D = blobs_grid(morph, tx0, ty0, tw, th)
        dq = [cv2.remap(np.ascontiguousarray(D[..., k]), qx - tx0, qy - ty0, cv2.INTER_LINEAR) for k in (0, 1)]
        ux, uy = qx - dq[0], qy - dq[1]
        if subj["mirror"]:
            ux = -ux
        tpl = cv2.remap(photo.rgba, (ux / S + origin[0]).astype(np.float32), (uy / S + origin[1]).astype(np.float32),
                        cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
        alpha = np.clip(tpl[..., 3:4], 0, 1)
        col = np.clip(tpl[..., :3], 0, 255) / 255.0
        col = col ** subj["gamma"] * 255.0 * subj["skin_gain"][None, None, :]
        if config.skin_texture > 0:  # the photos are upscaled 2-4x: give the skin back its fine grain
            col += self._texture(subj, sh, sw)[..., None] * alpha
        # illumination gradient (light fixed in frame coordinates) and white balance
        col *= (self._light(px, py) * pl["bright"])[..., None] * subj["wb_gain"][None, None, :]
        # colours (not premultiplied) and alpha in one 4-channel image: one remap per frame
        self.template = np.ascontiguousarray(np.dstack([col, alpha]), dtype=np.float32)

        bg = background(config, subj)
        X, Y = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
        bg *= (self._light(X, Y) * pl["bright"])[..., None] * subj["wb_gain"][None, None, :].astype(np.float32)
        self.bg = bg.astype(np.float32)

        # frame box (per-frame work) around the subject
        ys, xs = np.nonzero(alpha[..., 0] > 1e-3)
        self.box = (max(int(xs.min() + x0 - margin), 0), max(int(ys.min() + y0 - margin), 0),
                    min(int(xs.max() + x0 + margin) + 1, W), min(int(ys.max() + y0 + margin) + 1, H))
        bx0, by0, bx1, by1 = self.box
        self.bg_box = np.ascontiguousarray(self.bg[by0:by1, bx0:bx1])
        self.bX, self.bY = np.meshgrid(np.arange(bx0, bx1, dtype=np.float32), np.arange(by0, by1, dtype=np.float32))

        # AU, blink and pose displacement fields on a grid around the face (scene coords)
        iod = ff.iod
        lo, hi = self.landmarks.min(0), self.landmarks.max(0)
        gx0, gy0 = int(np.floor(lo[0] - 0.8 * iod)), int(np.floor(lo[1] - 0.9 * iod))
        gx1, gy1 = int(np.ceil(hi[0] + 0.8 * iod)), int(np.ceil(hi[1] + 0.8 * iod))
        turns = abs(hd["yaw"]) + abs(hd["pitch"]) + abs(hd["turn_wobble"][0]) > 0
        if turns:  # the whole head moves in depth: cover it
            gx0, gx1 = int(np.floor(min(gx0, lo[0] - 0.3 * ff.width))), int(np.ceil(max(gx1, hi[0] + 0.3 * ff.width)))
            gy0 = int(np.floor(min(gy0, lo[1] - 1.2 * iod - 0.6 * ff.width)))
        self.g_off = np.array([gx0, gy0], np.float32)
        gw, gh = gx1 - gx0, gy1 - gy0
        self.amp_frame = np.asarray(d["amp_crop"]) * crop_px_to_frame(self.landmarks)
        gain = subj["style"]["side_gain"]

        def planes(field_: np.ndarray) -> np.ndarray:  # (h, w, 2) -> (2, h, w)
            return np.ascontiguousarray(np.moveaxis(field_, -1, 0))

        self.au_fields = [planes(blobs_grid(side_gains(ff, au_blobs(a, s, ff, amp), gain), gx0, gy0, gw, gh))
                          for a, s, amp in zip(d["aus"], d["sides"], self.amp_frame)]
        self.blink_field = planes(blobs_grid(blink_blobs(ff), gx0, gy0, gw, gh)) if d["blinks"] else None
        self.pose_fields = None
        if turns:  # 1 deg of yaw (pitch) moves each point by depth x 1 deg along the face's x (y) axis
            z = head_depth(ff, gx0, gy0, gw, gh) * np.float32(np.deg2rad(1.0))
            self.pose_fields = (np.stack([z * ff.ex[0], z * ff.ex[1]]).astype(np.float32),
                                np.stack([z * ff.ey[0], z * ff.ey[1]]).astype(np.float32))
        # frame sub-box (inside self.box) whose pixels can map onto the face grid
        self.face_sub = (slice(int(np.clip(gy0 - margin, by0, by1)) - by0, int(np.clip(gy0 + gh + margin, by0, by1)) - by0),
                         slice(int(np.clip(gx0 - margin, bx0, bx1)) - bx0, int(np.clip(gx0 + gw + margin, bx0, bx1)) - bx0))

    # -- geometry -----------------------------------------------------------------------------
    def _light(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        subj = self.details["subject"]
        W = self.config.width
        a = subj["light_angle"]
        u = ((X - W / 2) * np.cos(a) + (Y - self.config.height / 2) * np.sin(a)) / W
        return (1 + subj["light_strength"] * u).astype(np.float32)

    def _texture(self, subj: dict, h: int, w: int) -> np.ndarray:
        """Band-limited noise of std skin_texture grey levels with a grain of ~0.4% of the face width
        (pores): fixed per subject, it moves with the skin."""
        rng = np.random.default_rng(subj["bg_seed"] + 1)
        sigma = max(0.5, 0.004 * float(subj["face_px"]))
        tex = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), sigma)
        return tex * np.float32(self.config.skin_texture / max(float(tex.std()), 1e-6))

    def _rest(self, q: np.ndarray) -> np.ndarray:
        """Template coordinates -> frame pixels with the head at rest (the subject's roll, placed)."""
        c, s = np.cos(np.deg2rad(self.theta0)), np.sin(np.deg2rad(self.theta0))
        v = q - self.c_t
        return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], 1) + self.c_f

    # -- rendering ----------------------------------------------------------------------------
    def render_clean(self, au: np.ndarray, blink: float, head: np.ndarray) -> np.ndarray:
        """One noiseless float32 BGR frame for given AU activations, blink closure and head pose
        (HEAD_COLUMNS)."""
        dx, dy, rot, zoom, yaw, pitch = (float(v) for v in head)
        th = np.deg2rad(rot)
        c, s = float(np.cos(th)), float(np.sin(th))
        k = 1.0 / (1.0 + zoom)
        ex, ey = self.c_f[0] + dx, self.c_f[1] + dy
        # p0 = R(-rot) (p - c_f - drift) / (1 + zoom) + c_f, in template-array pixels
        qx = cv2.addWeighted(self.bX, c * k, self.bY, s * k, self.c_f[0] - k * (c * ex + s * ey) - self.s_off[0])
        qy = cv2.addWeighted(self.bX, -s * k, self.bY, c * k, self.c_f[1] + k * (s * ex - c * ey) - self.s_off[1])
        fields = [(float(a), f) for a, f in zip(au, self.au_fields) if a > 1e-4]
        if self.blink_field is not None and blink > 1e-4:
            fields.append((float(blink), self.blink_field))
        if self.pose_fields is not None:
            fields += [(w, f) for w, f in zip((yaw, pitch), self.pose_fields) if abs(w) > 1e-6]
        if fields:
            Fs = fields[0][1] * np.float32(fields[0][0])  # (2, h, w): x and y displacement planes
            for a, f in fields[1:]:
                Fs += np.float32(a) * f
            sub = self.face_sub
            sx, sy = qx[sub], qy[sub]
            go = self.g_off - self.s_off
            mx, my = sx - go[0], sy - go[1]
            for plane, coord in ((Fs[0], sx), (Fs[1], sy)):  # one plane at a time: 2-channel remap is slow
                coord -= cv2.remap(plane, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        fga = cv2.remap(self.template, qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=(0, 0, 0, 0))
        a = cv2.extractChannel(fga, 3)
        frame = self.bg.copy()
        x0, y0, x1, y1 = self.box
        frame[y0:y1, x0:x1] = cv2.blendLinear(cv2.cvtColor(fga, cv2.COLOR_BGRA2BGR), self.bg_box, a,
                                              cv2.subtract(1.0, a))
        return frame


def jpeg_quality(config: SynthConfig) -> int | None:
    """The JPEG round-trip quality of frames, None for none."""
    if config.noise <= 0 or config.jpeg_quality >= 100:
        return None
    return int(np.clip(round(100 - (100 - config.jpeg_quality) * config.noise), 20, 99))


class ClipRenderer:
    """Renders any frame of a clip at a frame rate, in any order: a frame's pixels (noise included)
    depend only on the clip, the frame rate and the frame's index."""

    def __init__(self, spec: ClipSpec, config: SynthConfig, fps: int | None = None, scene: Scene | None = None):
        self.spec, self.config = spec, config
        self.scene = scene or Scene(spec, config)
        self.fps = int(fps if fps is not None else spec.fps)
        d = self.scene.details
        self.times = times_ms(d["total"], self.fps)
        self.sig = signals(d, self.times)
        self.pool = None
        sigma = d["subject"]["noise_sigma"] * max(config.noise, 0.0)
        if sigma > 0:
            # signal-dependent noise (shot + read) from the first clean frame's brightness; a small
            # pool of noise fields read at random offsets is ~10x cheaper than fresh noise per frame
            rng = rng_for(config, 5, spec.subject_index, spec.clip_no, self.fps)
            sig = self.sig
            first = self.scene.render_clean(sig["au"][0], sig["blink"][0], sig["head"][0])
            std = sigma * np.sqrt(0.35 + 0.65 * np.clip(first, 0, 255) / 128.0)
            std = cv2.copyMakeBorder(std.astype(np.float32), _PAD, _PAD, _PAD, _PAD, cv2.BORDER_REPLICATE)
            H, W = config.height, config.width
            self.pool = rng.standard_normal((6, H + 2 * _PAD, W + 2 * _PAD, 3), dtype=np.float32) * std[None]
        self.quality = jpeg_quality(config)

    def __len__(self) -> int:
        return len(self.times)

    def frame(self, i: int) -> np.ndarray:
        """Frame i (0-based) as uint8 BGR, H x W x 3."""
        sig, spec, config = self.sig, self.spec, self.config
        frame = self.scene.render_clean(sig["au"][i], sig["blink"][i], sig["head"][i])
        if self.pool is not None:
            H, W = config.height, config.width
            k, oy, ox = rng_for(config, 6, spec.subject_index, spec.clip_no, self.fps, i).integers(
                [0, 0, 0], [len(self.pool), 2 * _PAD, 2 * _PAD])
            frame = cv2.scaleAdd(frame, float(sig["gain"][i]), self.pool[k, oy:oy + H, ox:ox + W])
        elif sig["gain"][i] != 1.0:
            frame *= np.float32(sig["gain"][i])
        np.maximum(frame, 0, out=frame)
        u8 = cv2.convertScaleAbs(frame)
        if self.quality is not None:
            u8 = cv2.imdecode(cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, self.quality])[1],
                              cv2.IMREAD_COLOR)
        return u8


def iter_frames(spec: ClipSpec, config: SynthConfig, fps: int | None = None, scene: Scene | None = None,
                indices: Iterable[int] | None = None) -> Iterator[np.ndarray]:
    """Yield the clip's frames (uint8 BGR, HxWx3) at ``fps`` (default: the spec's); only the frames
    at ``indices`` (0-based) if given.

    Timing is in ms, so the same spec at 200 and 500 fps shows the same expression; only the
    per-frame sensor noise differs (it is seeded by the frame rate too).
    """
    renderer = ClipRenderer(spec, config, fps, scene)
    for i in (range(len(renderer)) if indices is None else indices):
        yield renderer.frame(i)


def clip_truth(spec: ClipSpec, config: SynthConfig, fps: int | None = None, scene: Scene | None = None) -> dict:
    """:func:`clip_curves` plus ``landmarks`` (68, 2): exact x, y of frame 1 in frame pixels."""
    truth = clip_curves(spec, config, fps)
    truth["landmarks"] = (scene or Scene(spec, config)).landmarks.astype(np.float64)
    return truth


def render_clip(spec: ClipSpec, config: SynthConfig, fps: int | None = None) -> tuple[np.ndarray, dict]:
    """All frames of a clip in memory, (n, H, W, 3) uint8 BGR, and its truth (see clip_truth)."""
    scene = Scene(spec, config)
    frames = np.stack(list(iter_frames(spec, config, fps, scene)))
    return frames, clip_truth(spec, config, fps, scene)
