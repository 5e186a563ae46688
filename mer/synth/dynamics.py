"""Time: when each AU moves, blinks, head motion and light flicker, all defined in milliseconds.

Everything random about a clip except per-frame sensor noise is drawn here from the clip's own
seeded RNG and does not depend on the frame rate: the same clip at 200 and 500 fps shows the
same expression at the same times.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .aus import au_label, draw_aus, subject_style
from .config import ClipSpec, SynthConfig, rng_for
from .faces import MIRROR_PERM, FaceFrame, invert_backward, load_photo, morph_blobs

CROP_SCALE = 4.6  # the toolkit's face crop: side = 4.6 x inner-eye-corner distance (mer/defaults.yaml)
CROP_PX = 256.0  # AU amplitudes are given in px of a 256 px crop of the face
HEAD_COLUMNS = ("dx", "dy", "roll_deg", "zoom", "yaw_deg", "pitch_deg")
BLINK_KINDS = ("single", "double", "half")


def subject_params(config: SynthConfig, s: int) -> dict:
    """Look and style of one synthetic subject (fixed across its clips)."""
    rng = rng_for(config, 0, s)
    spread = float(config.face_spread)
    p = dict(
        face_px=config.face_px * rng.uniform(1 - spread, 1 + spread),
        mirror=bool(rng.random() < 0.5),
        roll_deg=rng.uniform(-6.0, 6.0),
        centre=(rng.uniform(0.42, 0.58), rng.uniform(0.47, 0.58)),
        morph=rng.uniform(-1.0, 1.0, size=12),
        skin_gain=rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.85, 1.1),
        gamma=rng.uniform(0.85, 1.2),
        wb_gain=rng.uniform(0.92, 1.08, size=3),
        light_strength=rng.uniform(0.08, 0.45),
        light_angle=rng.uniform(0.0, 2 * np.pi),
        noise_sigma=rng.uniform(*config.noise_sigma),
        expressiveness=rng.uniform(0.8, 1.25),
        bg_seed=int(rng.integers(0, 2**31 - 1)),
        photo=config.photos[s % len(config.photos)],
    )
    p["style"] = subject_style(rng_for(config, 7, s), config.idiosyncrasy)
    if config.idiosyncrasy > 0:
        p["expressiveness"] = p["style"]["expressiveness"]
    return p


@lru_cache(maxsize=64)
def _face_template(photo: str, face_px: float, mirror: bool, morph: tuple[float, ...]) -> tuple:
    """Subject landmarks in template coordinates (photo centre at 0, scaled to face_px), the morph
    blobs and the scale photo->template."""
    src = load_photo(photo).landmarks
    S = face_px / float(np.linalg.norm(src[16] - src[0]))
    L0 = (src - src.mean(0)) * S
    if mirror:
        L0 = L0[MIRROR_PERM] * np.array([-1.0, 1.0])
    morph_b = morph_blobs(FaceFrame(L0), np.asarray(morph))
    return invert_backward(morph_b, L0), morph_b, S


def face_template(subj: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """(landmarks (68, 2) in template coordinates, morph blobs, photo->template scale) of a subject."""
    return _face_template(subj["photo"], float(subj["face_px"]), bool(subj["mirror"]), tuple(subj["morph"]))


def crop_px_to_frame(landmarks: np.ndarray) -> float:
    """Frame px per px of the toolkit's 256 px face crop, for a face with these landmarks."""
    return CROP_SCALE * float(np.linalg.norm(landmarks[42] - landmarks[39])) / CROP_PX


def au_curve(t: np.ndarray, delay: float, rise: float, hold: float, decay: float) -> np.ndarray:
    """Smooth activation in [0,1]: raised-cosine rise, plateau, raised-cosine decay (t in ms)."""
    a = np.zeros_like(t, dtype=np.float64)
    u = (t - delay) / rise
    m = (u > 0) & (u < 1)
    a[m] = 0.5 - 0.5 * np.cos(np.pi * u[m])
    a[(t >= delay + rise) & (t <= delay + rise + hold)] = 1.0
    v = (t - delay - rise - hold) / decay
    m = (v > 0) & (v < 1)
    a[m] = 0.5 + 0.5 * np.cos(np.pi * v[m])
    return a


def _amplitudes(config: SynthConfig, rng: np.random.Generator, n: int, gain: float) -> np.ndarray:
    """Peak displacement of each AU in crop px, within amplitude_px x amplitude."""
    lo, hi = config.amplitude_px
    if config.amplitude_dist == "loguniform" and lo > 0:
        amp = np.exp(rng.uniform(np.log(lo), np.log(hi), n)) * gain
    else:
        amp = rng.uniform(lo, hi, n) * gain
    return np.clip(amp, lo, hi) * config.amplitude  # a subject's gain never leaves the stated range


def _blinks(config: SynthConfig, rng: np.random.Generator, total: float) -> tuple[str, list[dict]]:
    """Blinks of a clip: none, one, two in quick succession, or one half-closing."""
    if rng.random() >= config.blink_prob:
        return "none", []
    w = np.asarray(config.blink_kinds, float)
    kind = BLINK_KINDS[int(rng.choice(3, p=w / w.sum()))]
    dur = rng.uniform(*config.blink_ms)
    start = rng.uniform(5.0, max(total - dur, 6.0))
    peak = rng.uniform(0.3, 0.6) if kind == "half" else rng.uniform(0.7, 1.0)
    blinks = [dict(start=start, dur=dur, peak=peak, close_frac=rng.uniform(0.3, 0.45))]
    if kind == "double":
        gap = rng.uniform(80.0, 250.0)
        blinks.append(dict(start=start + dur + gap, dur=rng.uniform(*config.blink_ms), peak=rng.uniform(0.7, 1.0),
                           close_frac=rng.uniform(0.3, 0.45)))
    return kind, blinks


def clip_details(spec: ClipSpec, config: SynthConfig) -> dict:
    """Everything random about a clip except per-frame noise; independent of the frame rate."""
    rng = rng_for(config, 4, spec.subject_index, spec.clip_no)
    subj = subject_params(config, spec.subject_index)
    if spec.aus_override is not None:
        aus = sorted(set(spec.aus_override))
        sides = [0] * len(aus)
    else:
        aus, sides = draw_aus(spec.emotion, config.au_mapping, rng, subj["style"])

    # timing (ms, relative to onset); asynchrony spreads delays and shapes
    dur = rng.uniform(*config.me_ms)
    rho, eta = rng.uniform(0.3, 0.5), rng.uniform(0.0, 0.15)
    asy = max(float(config.asynchrony), 0.0)
    n = len(aus)
    delay = asy * rng.uniform(0.0, 0.25, n) * dur
    rise = rho * dur * np.clip(1 + asy * rng.uniform(-0.25, 0.25, n), 0.3, None)
    hold = eta * dur * np.clip(1 + asy * rng.uniform(-0.5, 0.5, n), 0.0, None)
    decay = (1 - rho - eta) * dur * np.clip(1 + asy * rng.uniform(-0.25, 0.25, n), 0.3, None)
    if n:
        delay -= delay.min()
        scale = dur / np.max(delay + rise + hold + decay)
        delay, rise, hold, decay = delay * scale, rise * scale, hold * scale, decay * scale
    pre = rng.uniform(*config.neutral_ms)
    post = rng.uniform(*config.neutral_ms)
    total = pre + dur + post
    amp = _amplitudes(config, rng, n, subj["expressiveness"])

    blink_kind, blinks = _blinks(config, rng, total)
    hm = max(float(config.head_motion), 0.0)
    face_scale = subj["face_px"] / 200.0
    drift_mag = hm * rng.uniform(*config.drift_px) * face_scale
    drift_dir = rng.uniform(0, 2 * np.pi)
    oop = hm * config.out_of_plane_deg
    head = dict(
        drift=(drift_mag * np.cos(drift_dir), drift_mag * np.sin(drift_dir)),
        wobble=(hm * rng.uniform(0.0, 0.35) * face_scale, rng.uniform(0.5, 3.0),
                rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        rot=hm * rng.uniform(-config.roll_deg, config.roll_deg),
        rot_wobble=(hm * rng.uniform(0.0, 0.1), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)),
        zoom=hm * rng.uniform(-config.zoom_pct, config.zoom_pct) / 100.0,
        yaw=rng.uniform(-oop, oop), pitch=rng.uniform(-oop, oop),
        turn_wobble=(0.15 * oop, rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
    )
    nz = max(float(config.noise), 0.0)
    flicker = dict(amp=nz * rng.uniform(*config.flicker_pct) / 100.0, freq=float(rng.choice(np.array(config.flicker_hz))),
                   phase=rng.uniform(0, 2 * np.pi), slow_amp=nz * rng.uniform(0.0, 0.004),
                   slow_freq=rng.uniform(0.5, 2.0), slow_phase=rng.uniform(0, 2 * np.pi))
    place = dict(dx=rng.uniform(-0.03, 0.03), dy=rng.uniform(-0.03, 0.03),
                 droll=rng.uniform(-1.5, 1.5), bright=rng.uniform(0.97, 1.03))
    return dict(subject=subj, aus=aus, sides=sides, amp_crop=amp, delay=delay, rise=rise, hold=hold,
                decay=decay, pre=pre, dur=dur, post=post, total=total, blinks=blinks, blink_kind=blink_kind,
                head=head, flicker=flicker, place=place)


def times_ms(total_ms: float, fps: int) -> np.ndarray:
    """Timestamps (ms from frame 1) of every frame of a clip of this length."""
    n = int(np.floor(total_ms * fps / 1000.0 + 1e-9)) + 1
    return np.arange(n, dtype=np.float64) * 1000.0 / fps


def signals(d: dict, t: np.ndarray) -> dict:
    """AU activations, blink closure, head pose and flicker gain at times t (ms from frame 1).

    head columns: HEAD_COLUMNS (drift px, roll deg, relative zoom, yaw and pitch deg)."""
    tr = t - d["pre"]
    au = np.stack([au_curve(tr, d["delay"][k], d["rise"][k], d["hold"][k], d["decay"][k])
                   for k in range(len(d["aus"]))], axis=1) if d["aus"] else np.zeros((len(t), 0))
    blink = np.zeros(len(t))
    for b in d["blinks"]:
        close = b["dur"] * b["close_frac"]
        blink = np.maximum(blink, b["peak"] * au_curve(t, b["start"], close, 0.0, b["dur"] - close))
    h = d["head"]
    s = np.clip(t / d["total"], 0, 1)
    ramp = s * s * (3 - 2 * s)
    wa, wf, wpx, wpy = h["wobble"]
    ts = t / 1000.0
    dx = h["drift"][0] * ramp + wa * (np.sin(2 * np.pi * wf * ts + wpx) - np.sin(wpx))
    dy = h["drift"][1] * ramp + wa * (np.sin(2 * np.pi * wf * ts + wpy) - np.sin(wpy))
    ra, rf, rp = h["rot_wobble"]
    rot = h["rot"] * ramp + ra * (np.sin(2 * np.pi * rf * ts + rp) - np.sin(rp))
    ta, tf, tpy, tpp = h["turn_wobble"]
    yaw = h["yaw"] * ramp + ta * (np.sin(2 * np.pi * tf * ts + tpy) - np.sin(tpy))
    pitch = h["pitch"] * ramp + ta * (np.sin(2 * np.pi * tf * ts + tpp) - np.sin(tpp))
    zoom = h["zoom"] * ramp
    f = d["flicker"]
    gain = (1 + f["amp"] * np.sin(2 * np.pi * f["freq"] * ts + f["phase"])
            + f["slow_amp"] * np.sin(2 * np.pi * f["slow_freq"] * ts + f["slow_phase"]))
    return dict(au=au, blink=blink, head=np.stack([dx, dy, rot, zoom, yaw, pitch], axis=1), gain=gain)


def clip_curves(spec: ClipSpec, config: SynthConfig, fps: int | None = None) -> dict:
    """Time courses of a clip at a frame rate (default: the spec's), without rendering.

    Keys: times_ms, au_ids, au_side, au_curves, au_amplitude_px (frame px), au_amplitude_crop_px,
    head (HEAD_COLUMNS), blink, blink_kind, gain (flicker), fps, emotion_id (recorded label),
    shown_emotion_id, onset_frame / apex_frame / offset_frame (1-based), au_label.
    Everything is defined in ms, so the same spec at 200 and 500 fps gives the same curves.
    """
    from .config import EMOTION_ID

    fps = int(fps if fps is not None else spec.fps)
    d = clip_details(spec, config)
    t = times_ms(d["total"], fps)
    sig = signals(d, t)
    n = len(t)
    onset = int(np.clip(round(d["pre"] * fps / 1000.0), 0, n - 1)) + 1
    offset = int(np.clip(round((d["pre"] + d["dur"]) * fps / 1000.0), 0, n - 1)) + 1
    apex = int(np.argmax(sig["au"].sum(1))) + 1 if sig["au"].shape[1] else onset
    lm, _, _ = face_template(d["subject"])
    return dict(
        times_ms=t, au_ids=np.array(d["aus"], np.int64), au_side=np.array(d["sides"], np.int64),
        au_curves=sig["au"].astype(np.float32),
        au_amplitude_px=np.asarray(d["amp_crop"], np.float64) * crop_px_to_frame(lm),
        au_amplitude_crop_px=np.asarray(d["amp_crop"], np.float64),
        head=sig["head"].astype(np.float64), blink=sig["blink"].astype(np.float32), blink_kind=d["blink_kind"],
        gain=sig["gain"].astype(np.float32), fps=np.int64(fps), emotion_id=np.int64(spec.emotion_id),
        shown_emotion_id=np.int64(EMOTION_ID[spec.emotion]), photo=d["subject"]["photo"],
        onset_frame=np.int64(onset), apex_frame=np.int64(apex), offset_frame=np.int64(offset),
        au_label=au_label(d["aus"], d["sides"]),
    )
