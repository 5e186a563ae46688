"""Facial action units: their geometry on a face, and which AUs each emotion shows.

An AU is a smooth displacement field anchored to landmarks (Gaussian blobs moving skin in FACS
directions), scaled so that its largest landmark displacement equals the drawn amplitude. Two
mappings from emotions to AUs:

* ``emfacs``: full EMFACS-style prototypes with per-clip variation (easy: classes separable by AUs);
* ``overlapping``: emotions as probabilities over AU patterns, as counted in released ME tables
  (REFERENCE.md): no AU belongs to one class only (AU4 and AU14 in most negative classes and in
  "happy" clips, AU1+2 in surprise and fear, AU12 in happiness and one-sided in contempt) and about
  two clips in three show a single AU. A perfect AU detector (logistic regression on the true AUs)
  reaches about 0.52 UF1 on the dfme preset, whose 10% of labels disagree with the AUs shown.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .faces import MIRROR_PERM, SUBJECT_RIGHT, FaceFrame, invert_backward

# Action units: anchors (landmarks averaged to a centre), direction (out, down) in face axes where
# "out" points away from the facial midline, relative weight, Gaussian sigma in inter-ocular
# distances. Directions follow FACS: e.g. AU12 pulls lip corners up and out.
AU_DEFS: dict[int, list[tuple[tuple[int, ...], tuple[float, float], float, float]]] = {
    1: [((21,), (0.0, -1.0), 1.0, 0.14), ((22,), (0.0, -1.0), 1.0, 0.14),
        ((20,), (0.0, -1.0), 0.6, 0.14), ((23,), (0.0, -1.0), 0.6, 0.14)],
    2: [((17,), (0.0, -1.0), 0.8, 0.14), ((18,), (0.0, -1.0), 1.0, 0.14), ((19,), (0.0, -1.0), 0.5, 0.14),
        ((26,), (0.0, -1.0), 0.8, 0.14), ((25,), (0.0, -1.0), 1.0, 0.14), ((24,), (0.0, -1.0), 0.5, 0.14)],
    4: [((21,), (-0.55, 0.85), 1.0, 0.14), ((20,), (-0.4, 0.9), 0.7, 0.14), ((19,), (-0.2, 1.0), 0.4, 0.14),
        ((22,), (-0.55, 0.85), 1.0, 0.14), ((23,), (-0.4, 0.9), 0.7, 0.14), ((24,), (-0.2, 1.0), 0.4, 0.14)],
    5: [((37,), (0.0, -1.0), 1.0, 0.06), ((38,), (0.0, -1.0), 1.0, 0.06),
        ((43,), (0.0, -1.0), 1.0, 0.06), ((44,), (0.0, -1.0), 1.0, 0.06)],
    6: [((40,), (0.0, -1.0), 0.8, 0.07), ((41,), (0.0, -1.0), 0.8, 0.07),
        ((46,), (0.0, -1.0), 0.8, 0.07), ((47,), (0.0, -1.0), 0.8, 0.07),
        ((41, 31, 2), (0.15, -1.0), 1.0, 0.2), ((46, 35, 14), (0.15, -1.0), 1.0, 0.2)],
    7: [((40,), (0.1, -1.0), 1.0, 0.06), ((41,), (0.1, -1.0), 1.0, 0.06),
        ((46,), (0.1, -1.0), 1.0, 0.06), ((47,), (0.1, -1.0), 1.0, 0.06),
        ((37, 38), (0.0, 1.0), 0.3, 0.06), ((43, 44), (0.0, 1.0), 0.3, 0.06)],
    9: [((31,), (0.1, -1.0), 1.0, 0.09), ((35,), (0.1, -1.0), 1.0, 0.09),
        ((32, 33, 34), (0.0, -1.0), 0.6, 0.09),
        ((50,), (0.0, -1.0), 0.4, 0.1), ((52,), (0.0, -1.0), 0.4, 0.1),
        ((21,), (-0.3, 0.9), 0.3, 0.12), ((22,), (-0.3, 0.9), 0.3, 0.12)],
    10: [((50,), (0.1, -1.0), 1.0, 0.1), ((52,), (0.1, -1.0), 1.0, 0.1), ((51,), (0.0, -1.0), 0.8, 0.1),
         ((61, 62, 63), (0.0, -1.0), 0.6, 0.08),
         ((31,), (0.0, -1.0), 0.3, 0.09), ((35,), (0.0, -1.0), 0.3, 0.09)],
    12: [((48,), (0.55, -0.83), 1.0, 0.12), ((54,), (0.55, -0.83), 1.0, 0.12),
         ((41, 31, 2), (0.2, -1.0), 0.3, 0.18), ((46, 35, 14), (0.2, -1.0), 0.3, 0.18)],
    14: [((48,), (-1.0, -0.1), 1.0, 0.09), ((54,), (-1.0, -0.1), 1.0, 0.09)],
    15: [((48,), (0.1, 1.0), 1.0, 0.11), ((54,), (0.1, 1.0), 1.0, 0.11),
         ((59,), (0.0, 1.0), 0.4, 0.09), ((55,), (0.0, 1.0), 0.4, 0.09)],
    17: [((57, 8), (0.0, -1.0), 1.0, 0.2), ((57,), (0.0, -1.0), 0.6, 0.1)],
    20: [((48,), (1.0, 0.25), 1.0, 0.11), ((54,), (1.0, 0.25), 1.0, 0.11)],
    23: [((48,), (-1.0, 0.0), 0.6, 0.08), ((54,), (-1.0, 0.0), 0.6, 0.08),
         ((51,), (0.0, 1.0), 0.7, 0.08), ((57,), (0.0, -1.0), 0.7, 0.08)],
    25: [((57, 66), (0.0, 1.0), 1.0, 0.1), ((58,), (0.0, 1.0), 0.7, 0.09), ((56,), (0.0, 1.0), 0.7, 0.09),
         ((51, 62), (0.0, -1.0), 0.35, 0.08)],
    26: [((8,), (0.0, 1.0), 1.0, 0.28), ((57,), (0.0, 1.0), 0.9, 0.18),
         ((6,), (0.0, 1.0), 0.6, 0.2), ((10,), (0.0, 1.0), 0.6, 0.2)],
    # AUs beyond the emotion prototypes that real tables are full of (REFERENCE.md): lip pucker,
    # lip pressor, nostril dilator, eyes closing
    18: [((48,), (-1.0, 0.0), 1.0, 0.09), ((54,), (-1.0, 0.0), 1.0, 0.09),
         ((51,), (0.0, -1.0), 0.3, 0.08), ((57,), (0.0, 1.0), 0.3, 0.08)],
    24: [((50, 51, 52), (0.0, 1.0), 0.6, 0.08), ((56, 57, 58), (0.0, -1.0), 1.0, 0.08),
         ((48,), (-1.0, 0.0), 0.35, 0.07), ((54,), (-1.0, 0.0), 0.35, 0.07)],
    38: [((31,), (1.0, -0.2), 1.0, 0.06), ((35,), (1.0, -0.2), 1.0, 0.06)],
    43: [((37, 38), (0.0, 1.0), 1.0, 0.07), ((43, 44), (0.0, 1.0), 1.0, 0.07),
         ((40, 41), (0.0, -1.0), 0.2, 0.06), ((46, 47), (0.0, -1.0), 0.2, 0.06)],
}

AU_LANDMARKS: dict[int, list[int]] = {
    1: [20, 21, 22, 23],
    2: [17, 18, 25, 26],
    4: [19, 20, 21, 22, 23, 24],
    5: [37, 38, 43, 44],
    6: [40, 41, 46, 47],
    7: [40, 41, 46, 47],
    9: [31, 32, 33, 34, 35],
    10: [50, 51, 52, 61, 62, 63],
    12: [48, 54, 60, 64],
    14: [48, 54, 60, 64],
    15: [48, 54, 55, 59],
    17: [7, 8, 9, 56, 57, 58],
    20: [48, 54, 60, 64],
    23: [48, 51, 54, 57],
    25: [56, 57, 58, 65, 66, 67],
    26: [6, 7, 8, 9, 10, 57],
    18: [48, 54, 51, 57],
    24: [50, 51, 52, 56, 57, 58],
    38: [31, 35],
    43: [37, 38, 43, 44],
}
"""Landmarks (0-based iBUG-68) each AU mainly moves: a ROI over them should peak with the AU."""

SUPPORTED_AUS: tuple[int, ...] = tuple(sorted(AU_DEFS))

# EMFACS-style recipes: core AUs, key AUs (never dropped), optional AUs with their probability.
EMFACS_RECIPES: dict[str, dict] = {
    "happiness": dict(core=(6, 12), key=(12,), optional={25: 0.25, 7: 0.1}),
    "surprise": dict(core=(1, 2, 5, 26), key=(1, 2), optional={25: 0.4}),
    "disgust": dict(core=(9, 10), key=(10,), optional={17: 0.5, 4: 0.2, 25: 0.15}),
    "anger": dict(core=(4, 5, 7, 23), key=(4,), optional={17: 0.3}),
    "sadness": dict(core=(1, 4, 15), key=(15,), optional={17: 0.5}),
    "fear": dict(core=(1, 2, 4, 5, 20), key=(4, 20), optional={25: 0.3, 26: 0.2}),
    "contempt": dict(core=(12, 14), key=(12, 14), optional={}, one_sided=True),
}

# Overlapping AU patterns per emotion, with weights: a blend of the AU codings of CAS(ME)^3 part A,
# CASME II and SAMM (REFERENCE.md) onto DFME's seven classes. "*14" = AU14 on one side only.
OVERLAPPING_PATTERNS: dict[str, list[tuple[str, float]]] = {
    "anger": [("14", .22), ("4", .14), ("7", .14), ("4+7", .10), ("4+9+14", .04), ("1", .05), ("24", .06),
              ("17", .05), ("23", .05), ("4+7+23", .05), ("14+17", .05), ("4+17", .05), ("4+6+7", .02),
              ("38", .02)],
    "contempt": [("*14", .40), ("*12", .15), ("*12+*14", .15), ("14+17", .08), ("14", .12), ("*10", .05),
                 ("24", .05)],
    "disgust": [("4", .32), ("4+7", .10), ("4+9", .09), ("9", .06), ("10", .06), ("4+10", .06), ("24", .05),
                ("14", .05), ("9+10", .04), ("7", .05), ("17", .04), ("9+17", .04), ("4+6+7", .02),
                ("20", .02), ("23", .02), ("38", .02)],
    "fear": [("4", .22), ("14", .10), ("20", .10), ("1+2", .10), ("1+2+4", .08), ("1", .06), ("24", .06),
             ("5+20", .05), ("2", .04), ("4+20", .07), ("7", .04), ("20+26", .04), ("1+4", .04),
             ("23", .02)],
    "happiness": [("12", .34), ("6+12", .15), ("14", .13), ("12+25", .06), ("24", .06), ("7+12", .05),
                  ("10", .04), ("4", .04), ("12+15", .04), ("6", .03), ("38", .03), ("*12", .03)],
    "sadness": [("14", .18), ("4", .15), ("1", .12), ("17", .12), ("15+17", .10), ("15", .10), ("1+4", .06),
                ("24", .05), ("12+15", .04), ("1+4+15", .05), ("4+17", .03), ("20", .02)],
    "surprise": [("1+2", .38), ("5", .15), ("1", .08), ("2", .06), ("4", .05), ("1+2+5", .07), ("1+2+26", .06),
                 ("25+26", .05), ("7", .03), ("14", .03), ("1+2+25", .04), ("38", .02)],
}
HABITUAL_AUS: tuple[int, ...] = (4, 14, 17, 24, 7, 1, 38)
"""AUs a subject may show out of habit, whatever the emotion (idiosyncrasy)."""


def au_label(aus: Sequence[int], sides: Sequence[int]) -> str:
    """AU string as in released tables: '1+2+5', 'R12+R14' (L/R: subject's left/right)."""
    return "+".join(("" if s == 0 else ("L" if s < 0 else "R")) + str(a) for a, s in zip(aus, sides))


def subject_style(rng: np.random.Generator, idiosyncrasy: float) -> dict:
    """A subject's own way of moving: overall expressiveness, a stronger side, a habitual AU."""
    k = max(float(idiosyncrasy), 0.0)
    style = dict(expressiveness=float(rng.uniform(0.8, 1.25)), side_gain=0.0, habit=None, habit_prob=0.0)
    if k > 0:
        style["expressiveness"] = float(np.exp(rng.normal(0.0, 0.3 * k)))
        style["side_gain"] = float(np.clip(rng.normal(0.0, 0.25 * k), -0.6, 0.6))
        if rng.random() < min(1.0, 0.4 * k):
            style["habit"] = int(rng.choice(HABITUAL_AUS))
            style["habit_prob"] = float(rng.uniform(0.2, 0.5))
    return style


def draw_aus(emotion: str, mapping: str, rng: np.random.Generator,
             style: dict | None = None) -> tuple[list[int], list[int]]:
    """The AUs a clip of `emotion` shows and their sides (0 both, -1 subject-left, +1 subject-right)."""
    side = int(rng.choice([-1, 1]))
    if mapping == "emfacs":
        recipe = EMFACS_RECIPES[emotion]
        aus = [a for a in recipe["core"] if a in recipe["key"] or rng.random() > 0.2]
        aus += [a for a, p in recipe["optional"].items() if rng.random() < p]
        aus = sorted(set(aus))
        return aus, [side if recipe.get("one_sided") else 0] * len(aus)
    patterns, weights = zip(*OVERLAPPING_PATTERNS[emotion])
    w = np.asarray(weights, float)
    chosen = patterns[int(rng.choice(len(patterns), p=w / w.sum()))]
    found: dict[int, int] = {}
    for token in chosen.split("+"):
        found[int(token.lstrip("*"))] = side if token.startswith("*") else 0
    if style and style["habit"] is not None and style["habit"] not in found and rng.random() < style["habit_prob"]:
        found[style["habit"]] = 0
    aus = sorted(found)
    return aus, [found[a] for a in aus]


def au_blobs(au: int, side: int, ff: FaceFrame, amplitude: float) -> np.ndarray:
    """Gaussian blobs of one AU on a face, scaled so the largest landmark displacement = amplitude."""
    rows = []
    for idx, (o, dn), w, sig in AU_DEFS[au]:
        if side != 0:
            right = all(i in SUBJECT_RIGHT for i in idx)
            left = all(MIRROR_PERM[i] in SUBJECT_RIGHT for i in idx)
            if (side > 0 and not right) or (side < 0 and not left):
                continue
        c = ff.lm[list(idx)].mean(0)
        v = ff.vec(o, dn, c)
        v = v / max(np.linalg.norm(v), 1e-9) * w
        s = sig * ff.iod
        rows.append((c[0], c[1], v[0], v[1], s, s))
    blobs = np.array(rows, np.float64)
    for _ in range(2):  # the warp is slightly non-linear: rescale twice
        peak = np.linalg.norm(invert_backward(blobs, ff.lm) - ff.lm, axis=1).max()
        blobs[:, 2:4] *= amplitude / peak
    return blobs


def side_gains(ff: FaceFrame, blobs: np.ndarray, side_gain: float) -> np.ndarray:
    """Blobs with the subject's stronger side amplified (side_gain > 0: subject's right)."""
    if side_gain == 0 or not len(blobs):
        return blobs
    out = blobs.copy()
    for row in out:
        s = ff.out_sign(row[:2])  # +1 image right = subject's left
        row[2:4] *= 1.0 - side_gain * s
    return out


def blink_blobs(ff: FaceFrame) -> np.ndarray:
    """Upper lids pulled down by ~the eye opening at closure 1 (lower lids up a little)."""
    rows = []
    for up, low, corners in (((37, 38), (40, 41), (36, 39)), ((43, 44), (46, 47), (42, 45))):
        cu, cl = ff.lm[list(up)].mean(0), ff.lm[list(low)].mean(0)
        width = np.linalg.norm(ff.lm[corners[1]] - ff.lm[corners[0]])
        h = float(np.linalg.norm(cl - cu))
        d = ff.ey * 0.9 * h
        rows.append((cu[0], cu[1], d[0], d[1], 0.5 * width, 1.1 * h))
        d2 = -ff.ey * 0.15 * h
        rows.append((cl[0], cl[1], d2[0], d2[1], 0.4 * width, 0.6 * h))
    return np.array(rows, np.float64)


def au_landmark_displacement(au: int, landmarks: np.ndarray, amplitude_px: float = 1.0,
                             side: int = 0) -> np.ndarray:
    """Displacement (68, 2) of each landmark at full activation of one AU on a face.

    ``side``: 0 both, -1 subject-left, +1 subject-right. The largest landmark displacement is
    ``amplitude_px``; rendered frames use the same fields."""
    ff = FaceFrame(np.asarray(landmarks, np.float64))
    blobs = au_blobs(int(au), int(side), ff, float(amplitude_px))
    return invert_backward(blobs, ff.lm) - ff.lm
