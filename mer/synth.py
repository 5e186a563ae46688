"""Synthetic DFME-like micro-expression clips, for testing the toolkit without the licensed data.

Real DFME data cannot be shipped, so every reader, feature extractor and model in this project is
tested on clips made here. They are built to be hard in the ways that matter for the method we
reproduce (optical flow in landmark-anchored regions over the whole clip):

* real face pixels: the public-domain photo ``skimage.data.astronaut()``, cut out (head, neck,
  shoulders), placed in a full camera frame over a procedural background;
* many subjects from that one photo: smooth geometry morphs, mirroring, scale, roll, position,
  skin tint, gamma, illumination gradient, white balance, noise level;
* facial action units as smooth, landmark-anchored displacement fields (backward warp), sub-pixel
  to ~2 px on a ~200 px face, each with its own delay / rise / hold / decay;
* emotions as EMFACS-style AU combinations with per-clip variation;
* distractors: head drift and roll, blinks, mains flicker, signal-dependent sensor noise, JPEG
  artefacts;
* DFME layout on disk (``train_data``, ``test_data_A``, ``test_data_B/test_data_B``, xlsx tables),
  with the truth of the test splits written apart (``<out>.truth``).

Everything is deterministic per seed: each subject and each clip draws from its own
``numpy.random.Generator`` seeded by ``(seed, kind, subject, clip)``, so worker count and order do
not change a byte of output.

Output contract (what the readers are built on)::

    <out>/train_data/<Filename>/00001.png ...            5-digit, from 1, 8-bit BGR PNG
    <out>/test_data_A/<Filename>/...
    <out>/test_data_B/test_data_B/<Filename>/...         nested one level, as in real releases
    <out>/train.xlsx       Filename Subject Emotion EmotionId OnsetFrame ApexFrame OffsetFrame FPS AU
    <out>/test_A.xlsx, <out>/test_B.xlsx                Filename FPS
    <truth>/train.csv, test_A.csv, test_B.csv           all train.xlsx columns, same row order
    <truth>/curves/<Filename>.npz                       times_ms au_ids au_side au_curves
                                                        au_amplitude_px landmarks head blink fps
                                                        emotion_id onset_frame apex_frame offset_frame
    <truth>/synth_config.yaml                           every setting used

``<truth>`` defaults to ``<out>.truth`` (a sibling folder). Filenames are ``s07_003`` (subject
``s07``, clip 3). EmotionId is alphabetical (anger 0 ... surprise 6). Key frames are 1-based
frame numbers; ApexFrame is the frame of maximum summed AU activation. AU strings look like
``1+2+5+26``; one-sided AUs carry ``L`` / ``R`` (subject's left / right), e.g. ``R12+R14``.
``au_side``: 0 both sides, -1 subject-left (image right), +1 subject-right (image left).
``head``: drift dx, dy (px) and roll (deg, clockwise on screen) relative to frame 1; the roll
turns about the centroid of the frame-1 landmarks: p' = R(roll) (p - c) + c + (dx, dy).
``landmarks``: iBUG-68 x, y of frame 1 in frame pixels (pixel-centre convention).
``au_amplitude_px``: largest landmark displacement at full activation, in frame pixels.

Run ``python -m mer.synth --out DFME_demo`` (see ``--help``), or call :func:`generate`.
One clip can be rendered at several frame rates with identical timing in ms:
``render_clip(spec, config, fps=200)`` and ``render_clip(spec, config, fps=500)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

log = logging.getLogger("mer.synth")

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

EMOTIONS: tuple[str, ...] = (
    "anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise",
)
"""Class names; the index is the EmotionId (alphabetical, as in the CCAC 2024 winner's code)."""
EMOTION_ID: dict[str, int] = {e: i for i, e in enumerate(EMOTIONS)}

FREQUENCY_ORDER: tuple[str, ...] = (
    "happiness", "surprise", "disgust", "fear", "sadness", "anger", "contempt",
)
"""Most to least frequent class when ``imbalance > 1`` (DFME-like: happiness/surprise/disgust lead)."""

SPLITS: tuple[str, ...] = ("train", "test_A", "test_B")
SPLIT_DIRS: dict[str, str] = {
    "train": "train_data",
    "test_A": "test_data_A",
    "test_B": "test_data_B/test_data_B",  # nested one level, as in real releases
}
TABLE_COLUMNS: tuple[str, ...] = (
    "Filename", "Subject", "Emotion", "EmotionId", "OnsetFrame", "ApexFrame", "OffsetFrame",
    "FPS", "AU",
)
TEST_TABLE_COLUMNS: tuple[str, ...] = ("Filename", "FPS")

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
_SUBJECT_RIGHT = frozenset(list(range(0, 8)) + list(range(17, 22)) + [31, 32] + list(range(36, 42))
                           + [48, 49, 50, 58, 59, 60, 61, 67])

# Action units: anchors (landmarks averaged to a centre, direction (out, down) in face axes where
# "out" points away from the facial midline, relative weight, Gaussian sigma in inter-ocular
# distances). Directions follow FACS: e.g. AU12 pulls lip corners up and out.
_AU_DEFS: dict[int, list[tuple[tuple[int, ...], tuple[float, float], float, float]]] = {
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
}
"""Landmarks (0-based iBUG-68) each AU mainly moves: a ROI over them should peak with the AU."""

SUPPORTED_AUS: tuple[int, ...] = tuple(sorted(_AU_DEFS))

# EMFACS-style recipes: core AUs, key AUs (never dropped), optional AUs with their probability.
_EMOTION_RECIPES: dict[str, dict] = {
    "happiness": dict(core=(6, 12), key=(12,), optional={25: 0.25, 7: 0.1}),
    "surprise": dict(core=(1, 2, 5, 26), key=(1, 2), optional={25: 0.4}),
    "disgust": dict(core=(9, 10), key=(10,), optional={17: 0.5, 4: 0.2, 25: 0.15}),
    "anger": dict(core=(4, 5, 7, 23), key=(4,), optional={17: 0.3}),
    "sadness": dict(core=(1, 4, 15), key=(15,), optional={17: 0.5}),
    "fear": dict(core=(1, 2, 4, 5, 20), key=(4, 20), optional={25: 0.3, 26: 0.2}),
    "contempt": dict(core=(12, 14), key=(12, 14), optional={}, one_sided=True),
}

_FIXED_TIMESTAMP = "2024-01-01T00:00:00Z"


# --------------------------------------------------------------------------------------------
# Configuration and clip specs
# --------------------------------------------------------------------------------------------

@dataclass
class SynthConfig:
    """Every knob of the generator. Defaults give a DFME-like demo set (24 subjects, ~290 clips)."""

    subjects: int = 24
    clips_per_subject: int = 12
    total_clips: int | None = None  # if set, overrides clips_per_subject (spread evenly)
    split_subjects: tuple[int, int, int] = (14, 5, 5)  # train / test_A / test_B subject counts
    fps: tuple[int, ...] = (200, 300, 500)
    width: int = 640
    height: int = 480
    face_width: float = 200.0  # face width (jaw 0-16) in px at 640 px frame width; scales with width
    seed: int = 0
    amplitude: float = 1.0  # scale of AU amplitudes
    amplitude_px: tuple[float, float] = (0.5, 2.0)  # AU peak displacement range on a 200 px face
    noise: float = 1.0  # scale of sensor noise, flicker and compression (0 = clean, no JPEG)
    asynchrony: float = 1.0  # 0 = all AUs peak together, 1 = default spread, >1 = more
    head_motion: float = 1.0  # scale of head drift and roll
    imbalance: float = 2.5  # most / least frequent class ratio (<= 1 = balanced)
    me_ms: tuple[float, float] = (150.0, 500.0)  # onset-to-offset duration range
    neutral_ms: tuple[float, float] = (30.0, 150.0)  # neutral lead-in / lead-out range (each)
    blink_prob: float = 0.25
    blink_ms: tuple[float, float] = (100.0, 150.0)
    jpeg_quality: int = 90  # JPEG round-trip quality at noise=1 (100 or noise=0: no JPEG)
    png_compression: int = 1  # zlib level for PNG frames (low = fast)

    def __post_init__(self) -> None:
        self.split_subjects = tuple(int(v) for v in self.split_subjects)  # type: ignore[assignment]
        self.fps = tuple(int(v) for v in self.fps)
        self.amplitude_px = tuple(float(v) for v in self.amplitude_px)  # type: ignore[assignment]
        self.me_ms = tuple(float(v) for v in self.me_ms)  # type: ignore[assignment]
        self.neutral_ms = tuple(float(v) for v in self.neutral_ms)  # type: ignore[assignment]
        self.blink_ms = tuple(float(v) for v in self.blink_ms)  # type: ignore[assignment]
        if len(self.split_subjects) != 3 or sum(self.split_subjects) != self.subjects:
            raise ValueError(f"split_subjects {self.split_subjects} must be 3 counts summing to "
                             f"subjects={self.subjects}")
        if min(self.split_subjects) < 0 or not self.fps or min(self.fps) <= 0:
            raise ValueError("split counts must be >= 0 and fps positive")
        if self.width < 160 or self.height < 120:
            raise ValueError("frames must be at least 160x120")

    @property
    def face_px(self) -> float:
        """Nominal face width in px for this frame width."""
        return self.face_width * self.width / 640.0


@dataclass(frozen=True)
class ClipSpec:
    """Identity of one clip; everything else is drawn from its own seeded RNG at render time."""

    filename: str
    subject: str
    subject_index: int  # 0-based
    clip_no: int  # 1-based within subject
    split: str
    emotion: str
    fps: int
    aus_override: tuple[int, ...] | None = None  # force exactly these AUs (both sides)

    @property
    def emotion_id(self) -> int:
        return EMOTION_ID[self.emotion]


def _rng(config: SynthConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(config.seed) & 0xFFFFFFFF, *[int(k) for k in key]])


def _subject_name(i: int, n: int) -> str:
    return f"s{i + 1:0{max(2, len(str(n)))}d}"


def _class_weights(imbalance: float) -> dict[str, float]:
    k = len(FREQUENCY_ORDER)
    r = max(float(imbalance), 1.0)
    return {e: r ** ((k - 1 - i) / (k - 1)) for i, e in enumerate(FREQUENCY_ORDER)}


def _quota(n: int, weights: dict[str, float]) -> list[str]:
    """Largest-remainder allocation of n clips to classes (emotions in alphabetical order)."""
    names = sorted(weights)
    w = np.array([weights[e] for e in names])
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return [e for e, c in zip(names, counts) for _ in range(c)]


def plan_dataset(config: SynthConfig) -> list[ClipSpec]:
    """All clips of the dataset (split, subject, filename, emotion, fps), in table order.

    Subjects are assigned to splits at random (subject-disjoint); emotions are allocated per split
    by quota (so every split follows the class distribution) and shuffled.
    """
    n = config.subjects
    perm = _rng(config, 2).permutation(n)
    ntr, na, _ = config.split_subjects
    split_of = {}
    for rank, s in enumerate(perm):
        split_of[int(s)] = "train" if rank < ntr else ("test_A" if rank < ntr + na else "test_B")
    if config.total_clips is not None:
        base, extra = divmod(int(config.total_clips), n)
        per_subject = [base + (1 if s < extra else 0) for s in range(n)]
    else:
        per_subject = [int(config.clips_per_subject)] * n
    weights = _class_weights(config.imbalance)
    specs: list[ClipSpec] = []
    for split_id, split in enumerate(SPLITS):
        subjects = sorted(s for s in range(n) if split_of[s] == split)
        slots = [(s, c) for s in subjects for c in range(1, per_subject[s] + 1)]
        emotions = _quota(len(slots), weights)
        _rng(config, 3, split_id).shuffle(emotions)
        for (s, c), emo in zip(slots, emotions):
            fps = int(_rng(config, 1, s, c).choice(np.array(config.fps)))
            name = _subject_name(s, n)
            specs.append(ClipSpec(filename=f"{name}_{c:03d}", subject=name, subject_index=s,
                                  clip_no=c, split=split, emotion=emo, fps=fps))
    return specs


def single_clip_spec(config: SynthConfig, emotion: str = "happiness", subject_index: int = 0,
                     clip_no: int = 1, fps: int | None = None,
                     aus: Sequence[int] | None = None) -> ClipSpec:
    """A hand-made clip spec (for tests and benchmarks), e.g. one AU alone via ``aus=[12]``."""
    if emotion not in EMOTION_ID:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    if aus is not None and any(a not in _AU_DEFS for a in aus):
        raise ValueError(f"unsupported AU in {aus}; supported: {SUPPORTED_AUS}")
    name = _subject_name(subject_index, max(config.subjects, subject_index + 1))
    return ClipSpec(filename=f"{name}_{clip_no:03d}", subject=name, subject_index=subject_index,
                    clip_no=clip_no, split="train", emotion=emotion,
                    fps=int(fps if fps is not None else config.fps[0]),
                    aus_override=tuple(int(a) for a in aus) if aus is not None else None)


# --------------------------------------------------------------------------------------------
# Random parameters of subjects and clips
# --------------------------------------------------------------------------------------------

def _subject_params(config: SynthConfig, s: int) -> dict:
    """Look of one synthetic subject (fixed across its clips)."""
    rng = _rng(config, 0, s)
    p = dict(
        face_px=config.face_px * rng.uniform(0.88, 1.12),
        mirror=bool(rng.random() < 0.5),
        roll_deg=rng.uniform(-6.0, 6.0),
        centre=(rng.uniform(0.42, 0.58), rng.uniform(0.47, 0.58)),
        morph=rng.uniform(-1.0, 1.0, size=12),
        skin_gain=rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.85, 1.1),
        gamma=rng.uniform(0.85, 1.2),
        wb_gain=rng.uniform(0.92, 1.08, size=3),
        light_strength=rng.uniform(0.08, 0.45),
        light_angle=rng.uniform(0.0, 2 * np.pi),
        noise_sigma=rng.uniform(0.8, 2.2),
        expressiveness=rng.uniform(0.8, 1.25),
        bg_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return p


def _au_curve(t: np.ndarray, delay: float, rise: float, hold: float, decay: float) -> np.ndarray:
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


def _clip_details(spec: ClipSpec, config: SynthConfig) -> dict:
    """Everything random about a clip except per-frame noise; independent of the frame rate."""
    rng = _rng(config, 4, spec.subject_index, spec.clip_no)
    subj = _subject_params(config, spec.subject_index)
    recipe = _EMOTION_RECIPES[spec.emotion]
    if spec.aus_override is not None:
        aus = sorted(set(spec.aus_override))
        one_sided = False
    else:
        aus = [a for a in recipe["core"] if a in recipe["key"] or rng.random() > 0.2]
        aus += [a for a, p in recipe["optional"].items() if rng.random() < p]
        aus = sorted(set(aus))
        one_sided = bool(recipe.get("one_sided", False))
    side = int(rng.choice([-1, 1])) if one_sided else 0
    sides = [side] * len(aus)

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

    face_scale = subj["face_px"] / 200.0
    lo, hi = config.amplitude_px
    amp = (rng.uniform(lo, hi, n) * subj["expressiveness"] * config.amplitude * face_scale)

    blink = None
    if rng.random() < config.blink_prob:
        bdur = rng.uniform(*config.blink_ms)
        bstart = rng.uniform(5.0, max(total - bdur, 6.0))
        blink = dict(start=bstart, dur=bdur, peak=rng.uniform(0.7, 1.0),
                     close_frac=rng.uniform(0.3, 0.45))
    hm = max(float(config.head_motion), 0.0)
    drift_mag = hm * rng.uniform(0.2, 3.0) * face_scale
    drift_dir = rng.uniform(0, 2 * np.pi)
    head = dict(
        drift=(drift_mag * np.cos(drift_dir), drift_mag * np.sin(drift_dir)),
        wobble=(hm * rng.uniform(0.0, 0.35) * face_scale, rng.uniform(0.5, 3.0),
                rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        rot=hm * rng.uniform(-0.4, 0.4),
        rot_wobble=(hm * rng.uniform(0.0, 0.1), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)),
    )
    nz = max(float(config.noise), 0.0)
    flicker = dict(amp=nz * rng.uniform(0.002, 0.01), freq=float(rng.choice([100.0, 120.0])),
                   phase=rng.uniform(0, 2 * np.pi), slow_amp=nz * rng.uniform(0.0, 0.004),
                   slow_freq=rng.uniform(0.5, 2.0), slow_phase=rng.uniform(0, 2 * np.pi))
    place = dict(dx=rng.uniform(-0.03, 0.03), dy=rng.uniform(-0.03, 0.03),
                 droll=rng.uniform(-1.5, 1.5), bright=rng.uniform(0.97, 1.03))
    return dict(subject=subj, aus=aus, sides=sides, amp=amp, delay=delay, rise=rise, hold=hold,
                decay=decay, pre=pre, dur=dur, post=post, total=total, blink=blink, head=head,
                flicker=flicker, place=place)


def _times(total_ms: float, fps: int) -> np.ndarray:
    n = int(np.floor(total_ms * fps / 1000.0 + 1e-9)) + 1
    return np.arange(n, dtype=np.float64) * 1000.0 / fps


def _signals(d: dict, t: np.ndarray) -> dict:
    """AU curves, blink closure, head drift and flicker gain at times t (ms from frame 1)."""
    tr = t - d["pre"]
    au = np.stack([_au_curve(tr, d["delay"][k], d["rise"][k], d["hold"][k], d["decay"][k])
                   for k in range(len(d["aus"]))], axis=1) if d["aus"] else np.zeros((len(t), 0))
    blink = np.zeros(len(t))
    if d["blink"] is not None:
        b = d["blink"]
        close = b["dur"] * b["close_frac"]
        blink = b["peak"] * _au_curve(t, b["start"], close, 0.0, b["dur"] - close)
    h = d["head"]
    s = np.clip(t / d["total"], 0, 1)
    ramp = s * s * (3 - 2 * s)
    wa, wf, wpx, wpy = h["wobble"]
    ts = t / 1000.0
    dx = h["drift"][0] * ramp + wa * (np.sin(2 * np.pi * wf * ts + wpx) - np.sin(wpx))
    dy = h["drift"][1] * ramp + wa * (np.sin(2 * np.pi * wf * ts + wpy) - np.sin(wpy))
    ra, rf, rp = h["rot_wobble"]
    rot = h["rot"] * ramp + ra * (np.sin(2 * np.pi * rf * ts + rp) - np.sin(rp))
    f = d["flicker"]
    gain = (1 + f["amp"] * np.sin(2 * np.pi * f["freq"] * ts + f["phase"])
            + f["slow_amp"] * np.sin(2 * np.pi * f["slow_freq"] * ts + f["slow_phase"]))
    return dict(au=au, blink=blink, head=np.stack([dx, dy, rot], axis=1), gain=gain)


def _au_label(aus: Sequence[int], sides: Sequence[int]) -> str:
    return "+".join(("" if s == 0 else ("L" if s < 0 else "R")) + str(a)
                    for a, s in zip(aus, sides))


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------

def _blobs_at(blobs: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Sum of Gaussian displacement blobs (cx, cy, dx, dy, sx, sy) evaluated at points (n, 2)."""
    out = np.zeros((len(pts), 2))
    for cx, cy, dx, dy, sx, sy in blobs:
        g = np.exp(-0.5 * (((pts[:, 0] - cx) / sx) ** 2 + ((pts[:, 1] - cy) / sy) ** 2))
        out[:, 0] += g * dx
        out[:, 1] += g * dy
    return out


def _blobs_grid(blobs: np.ndarray, x0: float, y0: float, w: int, h: int) -> np.ndarray:
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


def _invert_backward(blobs: np.ndarray, pts: np.ndarray, iters: int = 30) -> np.ndarray:
    """Where points land under the backward warp out(q) = in(q - D(q)): solve q = p + D(q)."""
    q = pts.astype(np.float64).copy()
    for _ in range(iters):
        q = pts + _blobs_at(blobs, q)
    return q


class _FaceFrame:
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
        mid = lm[[27, 28, 29, 30, 33, 51, 57, 62, 66, 8]].mean(0)
        self.mid = mid

    def out_sign(self, p: np.ndarray) -> float:
        s = float(np.dot(p - self.mid, self.ex))
        return 0.0 if abs(s) < 0.05 * self.iod else float(np.sign(s))

    def vec(self, out: float, down: float, p: np.ndarray) -> np.ndarray:
        return out * self.out_sign(p) * self.ex + down * self.ey


def _au_blobs(au: int, side: int, ff: _FaceFrame, amplitude: float) -> np.ndarray:
    """Gaussian blobs of one AU on a face, scaled so the largest landmark displacement = amplitude."""
    rows = []
    for idx, (o, dn), w, sig in _AU_DEFS[au]:
        if side != 0:
            right = all(i in _SUBJECT_RIGHT for i in idx)
            left = all(MIRROR_PERM[i] in _SUBJECT_RIGHT for i in idx)
            if (side > 0 and not right) or (side < 0 and not left):
                continue
        c = ff.lm[list(idx)].mean(0)
        v = ff.vec(o, dn, c)
        v = v / max(np.linalg.norm(v), 1e-9) * w
        s = sig * ff.iod
        rows.append((c[0], c[1], v[0], v[1], s, s))
    blobs = np.array(rows, np.float64)
    for _ in range(2):  # the warp is slightly non-linear: rescale twice
        peak = np.linalg.norm(_invert_backward(blobs, ff.lm) - ff.lm, axis=1).max()
        blobs[:, 2:4] *= amplitude / peak
    return blobs


def _blink_blobs(ff: _FaceFrame) -> np.ndarray:
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


def _morph_blobs(ff: _FaceFrame, m: np.ndarray) -> np.ndarray:
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


@lru_cache(maxsize=1)
def _source_rgba() -> np.ndarray:
    """The astronaut photo as float32 BGR + alpha of the person cut-out (soft edge)."""
    from skimage import data  # imported lazily: only needed when rendering

    rgb = data.astronaut()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(PERSON_POLYGON * 16).astype(np.int32)], 255,
                 lineType=cv2.LINE_AA, shift=4)
    inside = (mask > 127).astype(np.float32)
    # matte refinement: in a band inside the hand-traced outline, drop pixels that look like the
    # local studio backdrop (colour estimated from outside the outline by normalised blur)
    outside = 1.0 - inside
    backdrop = (cv2.GaussianBlur(bgr * outside[..., None], (0, 0), 8)
                / np.maximum(cv2.GaussianBlur(outside, (0, 0), 8), 1e-3)[..., None])
    dist = np.linalg.norm(bgr - backdrop, axis=2)
    core = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (25, 25))) > 127
    band = (inside > 0) & ~core
    alpha = inside.copy()
    alpha[band] = np.clip((dist[band] - 10.0) / 25.0, 0.0, 1.0)
    alpha = cv2.morphologyEx(alpha, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.0)
    return np.dstack([bgr, alpha]).astype(np.float32)


def _background(config: SynthConfig, subj: dict) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# Scene: everything needed to render a clip at any frame rate
# --------------------------------------------------------------------------------------------

class _Scene:
    """Pre-rendered parts of one clip: background, warped subject template, AU fields, pose."""

    def __init__(self, spec: ClipSpec, config: SynthConfig) -> None:
        self.spec, self.config = spec, config
        d = self.details = _clip_details(spec, config)
        subj = d["subject"]
        W, H = config.width, config.height
        S = subj["face_px"] / float(np.linalg.norm(ASTRONAUT_LANDMARKS[16] - ASTRONAUT_LANDMARKS[0]))
        origin = ASTRONAUT_LANDMARKS.mean(0)  # template coords: face centre of the photo at 0,0
        # template landmarks before morph (mirrored if needed; indices stay anatomical)
        L0 = (ASTRONAUT_LANDMARKS - origin) * S
        mirror = subj["mirror"]
        if mirror:
            L0 = L0[MIRROR_PERM] * np.array([-1.0, 1.0])
        ff0 = _FaceFrame(L0)
        morph = _morph_blobs(ff0, subj["morph"])
        Lt = _invert_backward(morph, L0)
        self.ff = _FaceFrame(Lt)
        self.lm_template = Lt
        c_t = Lt.mean(0)

        # placement: frame = R(theta) (q - c_t) + c_f + drift
        cx, cy = subj["centre"]
        pl = d["place"]
        self.c_t = c_t
        self.c_f = np.array([(cx + pl["dx"]) * W, (cy + pl["dy"]) * H])
        self.theta0 = subj["roll_deg"] + pl["droll"]

        # template region that can reach the frame (frame corners pulled back, plus margins)
        hd = d["head"]
        margin = 12 + 1.5 * (np.hypot(*hd["drift"]) + 2 * hd["wobble"][0]
                             + np.deg2rad(abs(hd["rot"]) + 2 * hd["rot_wobble"][0]) * np.hypot(W, H))
        corners = np.array([[0, 0], [W, 0], [0, H], [W, H]], np.float64)
        qc = self._to_template(corners, 0.0, 0.0, self.theta0)
        poly = (PERSON_POLYGON - origin) * S
        if mirror:
            poly = poly * np.array([-1.0, 1.0])
        tx0 = int(np.floor(max(qc[:, 0].min(), poly[:, 0].min()) - margin))
        tx1 = int(np.ceil(min(qc[:, 0].max(), poly[:, 0].max()) + margin))
        ty0 = int(np.floor(max(qc[:, 1].min(), poly[:, 1].min()) - margin))
        ty1 = int(np.ceil(min(qc[:, 1].max(), poly[:, 1].max()) + margin))
        self.t_off = np.array([tx0, ty0], np.float32)
        tw, th = tx1 - tx0, ty1 - ty0

        # backward map template -> photo: u = q - morph(q); unmirror; photo = u / S + origin
        D = _blobs_grid(morph, tx0, ty0, tw, th)
        gx, gy = np.meshgrid(np.arange(tw, dtype=np.float32) + tx0, np.arange(th, dtype=np.float32) + ty0)
        ux = gx - D[..., 0]
        uy = gy - D[..., 1]
        if mirror:
            ux = -ux
        mapx = (ux / S + origin[0]).astype(np.float32)
        mapy = (uy / S + origin[1]).astype(np.float32)
        tpl = cv2.remap(_source_rgba(), mapx, mapy, cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=(0, 0, 0, 0))
        alpha = np.clip(tpl[..., 3:4], 0, 1)
        col = np.clip(tpl[..., :3], 0, 255) / 255.0
        col = col ** subj["gamma"] * 255.0 * subj["skin_gain"][None, None, :]
        # illumination gradient (light fixed in frame coordinates) and white balance
        co, si = np.cos(np.deg2rad(self.theta0)), np.sin(np.deg2rad(self.theta0))
        fx = co * (gx - c_t[0]) - si * (gy - c_t[1]) + self.c_f[0]
        fy = si * (gx - c_t[0]) + co * (gy - c_t[1]) + self.c_f[1]
        col *= (self._light(fx, fy) * pl["bright"])[..., None] * subj["wb_gain"][None, None, :]
        self.template = np.ascontiguousarray(col, dtype=np.float32)  # colours (not premultiplied)
        self.alpha = np.ascontiguousarray(alpha[..., 0], dtype=np.float32)

        bg = _background(config, subj)
        X, Y = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
        wb = subj["wb_gain"][None, None, :].astype(np.float32)
        bg *= (self._light(X, Y) * pl["bright"])[..., None] * wb
        self.bg = bg.astype(np.float32)

        # person bounding box in the frame (for per-frame work)
        ys, xs = np.nonzero(alpha[..., 0] > 1e-3)
        pts = np.array([[xs.min(), ys.min()], [xs.max(), ys.min()], [xs.min(), ys.max()],
                        [xs.max(), ys.max()]], np.float64) + self.t_off
        pf = self._to_frame(pts, 0, 0, self.theta0)
        bx0, by0 = np.floor(pf.min(0) - margin).astype(int)
        bx1, by1 = np.ceil(pf.max(0) + margin).astype(int)
        self.box = (max(bx0, 0), max(by0, 0), min(bx1, W), min(by1, H))
        x0, y0, x1, y1 = self.box
        self.bg_box = np.ascontiguousarray(self.bg[y0:y1, x0:x1])
        self.bX, self.bY = np.meshgrid(np.arange(x0, x1, dtype=np.float32),
                                       np.arange(y0, y1, dtype=np.float32))

        # AU and blink displacement fields on a grid around the face (template coords)
        iod = self.ff.iod
        lo, hi = Lt.min(0), Lt.max(0)
        gx0, gy0 = int(np.floor(lo[0] - 0.8 * iod)), int(np.floor(lo[1] - 0.9 * iod))
        gx1, gy1 = int(np.ceil(hi[0] + 0.8 * iod)), int(np.ceil(hi[1] + 0.8 * iod))
        self.g_off = np.array([gx0, gy0], np.float32)
        gw, gh = gx1 - gx0, gy1 - gy0
        self.au_blobs = [_au_blobs(a, s, self.ff, amp) for a, s, amp in zip(d["aus"], d["sides"], d["amp"])]
        self.au_fields = [_blobs_grid(b, gx0, gy0, gw, gh) for b in self.au_blobs]
        self.blink_field = _blink_blobs(self.ff)
        self.blink_field = _blobs_grid(self.blink_field, gx0, gy0, gw, gh) if d["blink"] else None
        # frame sub-box (inside self.box) whose pixels can map onto the face grid
        gc = np.array([[gx0, gy0], [gx1, gy0], [gx0, gy1], [gx1, gy1]], np.float64)
        fc = self._to_frame(gc, 0, 0, self.theta0)
        m2 = margin
        sx0 = int(np.clip(np.floor(fc[:, 0].min() - m2), x0, x1)) - x0
        sx1 = int(np.clip(np.ceil(fc[:, 0].max() + m2), x0, x1)) - x0
        sy0 = int(np.clip(np.floor(fc[:, 1].min() - m2), y0, y1)) - y0
        sy1 = int(np.clip(np.ceil(fc[:, 1].max() + m2), y0, y1)) - y0
        self.face_sub = (slice(sy0, sy1), slice(sx0, sx1))

        self.landmarks = self._to_frame(Lt, 0.0, 0.0, self.theta0)

    # -- geometry -----------------------------------------------------------------------------
    def _light(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        subj = self.details["subject"]
        W = self.config.width
        a = subj["light_angle"]
        u = ((X - W / 2) * np.cos(a) + (Y - self.config.height / 2) * np.sin(a)) / W
        return (1 + subj["light_strength"] * u).astype(np.float32)

    def _to_frame(self, q: np.ndarray, dx: float, dy: float, theta_deg: float) -> np.ndarray:
        c, s = np.cos(np.deg2rad(theta_deg)), np.sin(np.deg2rad(theta_deg))
        v = q - self.c_t
        return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], 1) + self.c_f + [dx, dy]

    def _to_template(self, p: np.ndarray, dx: float, dy: float, theta_deg: float) -> np.ndarray:
        c, s = np.cos(np.deg2rad(theta_deg)), np.sin(np.deg2rad(theta_deg))
        v = p - self.c_f - [dx, dy]
        return np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1]], 1) + self.c_t

    # -- rendering ----------------------------------------------------------------------------
    def render_clean(self, au: np.ndarray, blink: float, head: np.ndarray, gain: float) -> np.ndarray:
        """One noiseless float32 BGR frame for given AU activations, blink, head drift, flicker."""
        dx, dy, rot = (float(v) for v in head)
        th = np.deg2rad(self.theta0 + rot)
        c, s = float(np.cos(th)), float(np.sin(th))
        ex, ey = self.c_f[0] + dx, self.c_f[1] + dy
        # inverse placement q = R(-theta) (p - c_f - drift) + c_t, in template-array pixels
        qx = cv2.addWeighted(self.bX, c, self.bY, s, self.c_t[0] - c * ex - s * ey - self.t_off[0])
        qy = cv2.addWeighted(self.bX, -s, self.bY, c, self.c_t[1] + s * ex - c * ey - self.t_off[1])
        fields = [(float(a), f) for a, f in zip(au, self.au_fields) if a > 1e-4]
        if self.blink_field is not None and blink > 1e-4:
            fields.append((float(blink), self.blink_field))
        if fields:
            Fs = fields[0][1] * np.float32(fields[0][0])
            for a, f in fields[1:]:
                cv2.scaleAdd(f, a, Fs, dst=Fs)
            sub = self.face_sub
            sx, sy = qx[sub], qy[sub]
            go = self.g_off - self.t_off
            Dq = cv2.remap(Fs, sx - go[0], sy - go[1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
            sx -= Dq[..., 0]
            sy -= Dq[..., 1]
        fg = cv2.remap(self.template, qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        a = cv2.remap(self.alpha, qx, qy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        frame = self.bg.copy()
        x0, y0, x1, y1 = self.box
        frame[y0:y1, x0:x1] = cv2.blendLinear(fg, self.bg_box, a, cv2.subtract(1.0, a))
        if gain != 1.0:
            frame *= np.float32(gain)
        return frame


_PAD = 8


def _jpeg_quality(config: SynthConfig) -> int | None:
    if config.noise <= 0 or config.jpeg_quality >= 100:
        return None
    return int(np.clip(round(100 - (100 - config.jpeg_quality) * config.noise), 20, 99))


def clip_curves(spec: ClipSpec, config: SynthConfig, fps: int | None = None) -> dict:
    """Time courses of a clip at a frame rate (default: the spec's), without rendering.

    Keys: times_ms, au_ids, au_side, au_curves, au_amplitude_px, head, blink, gain (flicker),
    fps, emotion_id, onset_frame / apex_frame / offset_frame (1-based), au_label.
    Everything is defined in ms, so the same spec at 200 and 500 fps gives the same curves.
    """
    fps = int(fps if fps is not None else spec.fps)
    d = _clip_details(spec, config)
    t = _times(d["total"], fps)
    sig = _signals(d, t)
    n = len(t)
    onset = int(np.clip(round(d["pre"] * fps / 1000.0), 0, n - 1)) + 1
    offset = int(np.clip(round((d["pre"] + d["dur"]) * fps / 1000.0), 0, n - 1)) + 1
    apex = int(np.argmax(sig["au"].sum(1))) + 1 if sig["au"].shape[1] else onset
    return dict(
        times_ms=t, au_ids=np.array(d["aus"], np.int64), au_side=np.array(d["sides"], np.int64),
        au_curves=sig["au"].astype(np.float32), au_amplitude_px=np.asarray(d["amp"], np.float64),
        head=sig["head"].astype(np.float64), blink=sig["blink"].astype(np.float32),
        gain=sig["gain"].astype(np.float32), fps=np.int64(fps), emotion_id=np.int64(spec.emotion_id),
        onset_frame=np.int64(onset), apex_frame=np.int64(apex), offset_frame=np.int64(offset),
        au_label=_au_label(d["aus"], d["sides"]),
    )


def clip_truth(spec: ClipSpec, config: SynthConfig, fps: int | None = None) -> dict:
    """:func:`clip_curves` plus ``landmarks`` (68, 2): exact x, y of frame 1 in frame pixels."""
    return _truth(spec, config, fps, _Scene(spec, config))


def _truth(spec: ClipSpec, config: SynthConfig, fps: int | None, scene: _Scene) -> dict:
    truth = clip_curves(spec, config, fps)
    truth["landmarks"] = scene.landmarks.astype(np.float64)
    return truth


def au_landmark_displacement(au: int, landmarks: np.ndarray, amplitude_px: float = 1.0,
                             side: int = 0) -> np.ndarray:
    """Displacement (68, 2) of each landmark at full activation of one AU on a face.

    ``side``: 0 both, -1 subject-left, +1 subject-right. The largest landmark displacement is
    ``amplitude_px`` (as in the truth's au_amplitude_px); frames use the same fields.
    """
    ff = _FaceFrame(np.asarray(landmarks, np.float64))
    blobs = _au_blobs(int(au), int(side), ff, float(amplitude_px))
    return _invert_backward(blobs, ff.lm) - ff.lm


def iter_frames(spec: ClipSpec, config: SynthConfig, fps: int | None = None,
                scene: _Scene | None = None) -> Iterator[np.ndarray]:
    """Yield the clip's frames (uint8 BGR, HxWx3) at ``fps`` (default: the spec's).

    Timing is in ms, so the same spec at 200 and 500 fps shows the same expression; only the
    per-frame sensor noise differs (it is seeded by the frame rate too).
    """
    scene = scene or _Scene(spec, config)
    fps = int(fps if fps is not None else spec.fps)
    d = scene.details
    t = _times(d["total"], fps)
    sig = _signals(d, t)
    H, W = config.height, config.width
    sigma = d["subject"]["noise_sigma"] * max(config.noise, 0.0)
    rng = _rng(config, 5, spec.subject_index, spec.clip_no, fps)
    pool = None
    if sigma > 0:
        # signal-dependent noise (shot + read) from the first clean frame's brightness; a small
        # pool of noise fields read at random offsets is ~10x cheaper than fresh noise per frame
        first = scene.render_clean(sig["au"][0], sig["blink"][0], sig["head"][0], 1.0)
        std = sigma * np.sqrt(0.35 + 0.65 * np.clip(first, 0, 255) / 128.0)
        std = cv2.copyMakeBorder(std.astype(np.float32), _PAD, _PAD, _PAD, _PAD, cv2.BORDER_REPLICATE)
        pool = rng.standard_normal((6, H + 2 * _PAD, W + 2 * _PAD, 3), dtype=np.float32) * std[None]
    q = _jpeg_quality(config)
    for i in range(len(t)):
        frame = scene.render_clean(sig["au"][i], sig["blink"][i], sig["head"][i], 1.0)
        if pool is not None:
            k, oy, ox = rng.integers(0, len(pool)), rng.integers(0, 2 * _PAD), rng.integers(0, 2 * _PAD)
            frame = cv2.scaleAdd(frame, float(sig["gain"][i]), pool[k, oy:oy + H, ox:ox + W])
        elif sig["gain"][i] != 1.0:
            frame *= np.float32(sig["gain"][i])
        np.maximum(frame, 0, out=frame)
        u8 = cv2.convertScaleAbs(frame)
        if q is not None:
            u8 = cv2.imdecode(cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_COLOR)
        yield u8


def render_clip(spec: ClipSpec, config: SynthConfig, fps: int | None = None) -> tuple[np.ndarray, dict]:
    """All frames of a clip in memory, (n, H, W, 3) uint8 BGR, and its truth (see clip_truth)."""
    scene = _Scene(spec, config)
    frames = np.stack(list(iter_frames(spec, config, fps, scene)))
    return frames, _truth(spec, config, fps, scene)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez, but with fixed zip timestamps so the bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for k, v in arrays.items():
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.asanyarray(v), allow_pickle=False)
            zi = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, arr.getvalue())
    Path(path).write_bytes(buf.getvalue())


def write_clip(spec: ClipSpec, config: SynthConfig, clip_dir: Path | str, fps: int | None = None,
               curves_path: Path | str | None = None) -> dict:
    """Write a clip's frames as 00001.png, ... into clip_dir (and its curves npz); return truth."""
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    scene = _Scene(spec, config)
    truth = _truth(spec, config, fps, scene)
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(config.png_compression),
              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]  # ~2x faster than defaults
    n = 0
    for n, frame in enumerate(iter_frames(spec, config, fps, scene), start=1):
        ok, buf = cv2.imencode(".png", frame, params)
        if not ok:
            raise OSError(f"PNG encoding failed for {clip_dir}/{n:05d}.png")
        (clip_dir / f"{n:05d}.png").write_bytes(buf.tobytes())
    if n != len(truth["times_ms"]):
        raise RuntimeError("frame count mismatch")
    if curves_path is not None:
        curves_path = Path(curves_path)
        curves_path.parent.mkdir(parents=True, exist_ok=True)
        keys = ("times_ms", "au_ids", "au_side", "au_curves", "au_amplitude_px", "landmarks",
                "head", "blink", "fps", "emotion_id", "onset_frame", "apex_frame", "offset_frame")
        _save_npz(curves_path, {k: truth[k] for k in keys})
    return truth


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

def _row(spec: ClipSpec, truth: dict) -> dict:
    return dict(Filename=spec.filename, Subject=spec.subject, Emotion=spec.emotion,
                EmotionId=spec.emotion_id, OnsetFrame=int(truth["onset_frame"]),
                ApexFrame=int(truth["apex_frame"]), OffsetFrame=int(truth["offset_frame"]),
                FPS=int(truth["fps"]), AU=truth["au_label"])


def _job(spec: ClipSpec, config: SynthConfig, out: str, truth_out: str) -> dict:
    clip_dir = Path(out) / SPLIT_DIRS[spec.split] / spec.filename
    curves = Path(truth_out) / "curves" / f"{spec.filename}.npz"
    truth = write_clip(spec, config, clip_dir, curves_path=curves)
    row = _row(spec, truth)
    row["NFrames"] = len(truth["times_ms"])
    return row


def _init_worker() -> None:
    cv2.setNumThreads(1)


def write_xlsx(df: pd.DataFrame, path: Path | str) -> None:
    """Write a one-sheet xlsx whose bytes depend only on the cell contents (fixed timestamps)."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(df.columns))
    for rec in df.itertuples(index=False):
        ws.append([v.item() if isinstance(v, np.generic) else v for v in rec])
    buf = io.BytesIO()
    wb.save(buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*(</dcterms:)",
                              rb"\g<1>" + _FIXED_TIMESTAMP.encode() + rb"\g<3>", data)
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            dst.writestr(zi, data)
    Path(path).write_bytes(out.getvalue())


def default_truth_dir(out: Path | str) -> Path:
    """``<out>.truth`` next to the dataset folder."""
    out = Path(out)
    return out.parent / (out.name + ".truth")


_OWNED = ("train_data", "test_data_A", "test_data_B", "train.xlsx", "test_A.xlsx", "test_B.xlsx")
_OWNED_TRUTH = ("curves", "train.csv", "test_A.csv", "test_B.csv", "synth_config.yaml")


def _prepare(out: Path, truth: Path, overwrite: bool) -> None:
    existing = [out / n for n in _OWNED if (out / n).exists()]
    existing += [truth / n for n in _OWNED_TRUTH if (truth / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output exists ({existing[0]}); pass overwrite=True / --overwrite")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)


def config_dict(config: SynthConfig) -> dict:
    """Plain-type dict of a config (for YAML)."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def generate(out: Path | str, config: SynthConfig, truth_out: Path | str | None = None,
             workers: int = 1, progress: bool = False, overwrite: bool = False) -> pd.DataFrame:
    """Generate a synthetic DFME-layout dataset at ``out`` and its truth at ``truth_out``.

    Returns one row per clip (all splits, table order) with columns ``Split`` + TABLE_COLUMNS +
    ``NFrames``. Output is byte-identical for the same config whatever ``workers`` is.
    """
    import yaml
    from tqdm import tqdm

    out = Path(out)
    truth_dir = Path(truth_out) if truth_out is not None else default_truth_dir(out)
    _prepare(out, truth_dir, overwrite)
    specs = plan_dataset(config)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    bar = tqdm(total=len(specs), file=sys.stderr, disable=not progress, unit="clip", desc="synth")
    workers = max(1, min(int(workers), len(specs)))
    if workers == 1:
        for spec in specs:
            rows[spec.filename] = _job(spec, config, str(out), str(truth_dir))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as ex:
            futs = {ex.submit(_job, s, config, str(out), str(truth_dir)): s for s in specs}
            for fut in as_completed(futs):
                rows[futs[fut].filename] = fut.result()
                bar.update(1)
    bar.close()
    df = pd.DataFrame([dict(Split=s.split, **rows[s.filename]) for s in specs])
    for split in SPLITS:
        part = df[df.Split == split]
        full = part[list(TABLE_COLUMNS)].reset_index(drop=True)
        full.to_csv(truth_dir / f"{split}.csv", index=False, lineterminator="\n")
        if split == "train":
            write_xlsx(full, out / "train.xlsx")
        else:
            write_xlsx(part[list(TEST_TABLE_COLUMNS)].reset_index(drop=True), out / f"{split}.xlsx")
    meta = dict(config=config_dict(config), jpeg_quality_effective=_jpeg_quality(config),
                layout=dict(SPLIT_DIRS), emotions=list(EMOTIONS), au_landmarks=AU_LANDMARKS,
                au_side_convention="0 both sides, -1 subject-left (image right), "
                                   "+1 subject-right (image left)",
                head_convention="p' = R(rot) (p - c) + c + (dx, dy); c = centroid of frame-1 "
                                "landmarks; rot in deg, clockwise on screen (y down)",
                clips=int(len(df)), frames=int(df.NFrames.sum()))
    (truth_dir / "synth_config.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    dt = time.perf_counter() - t0
    log.info("wrote %d clips / %d frames to %s (truth: %s) in %.1f s", len(df), int(df.NFrames.sum()),
             out, truth_dir, dt)
    return df


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    c = SynthConfig()
    p = argparse.ArgumentParser(prog="python -m mer.synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="dataset folder (DFME layout)")
    p.add_argument("--truth-out", type=Path, default=None, help="truth folder (default <out>.truth)")
    p.add_argument("--subjects", type=int, default=c.subjects)
    p.add_argument("--clips-per-subject", type=int, default=c.clips_per_subject)
    p.add_argument("--clips", type=int, default=None, help="total clip count (overrides per-subject)")
    p.add_argument("--split-subjects", type=int, nargs=3, default=None, metavar=("TRAIN", "A", "B"),
                   help="subjects per split (default: ~58/21/21%% of --subjects)")
    p.add_argument("--fps", type=int, nargs="+", default=list(c.fps))
    p.add_argument("--width", type=int, default=c.width)
    p.add_argument("--height", type=int, default=c.height)
    p.add_argument("--face-width", type=float, default=c.face_width,
                   help="face width in px at 640 px frame width (scales with --width)")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--amplitude", type=float, default=c.amplitude, help="scale of AU amplitudes")
    p.add_argument("--noise", type=float, default=c.noise, help="scale of noise/flicker/JPEG (0 = clean)")
    p.add_argument("--asynchrony", type=float, default=c.asynchrony, help="0 = AUs peak together")
    p.add_argument("--head-motion", type=float, default=c.head_motion, help="scale of head drift/roll")
    p.add_argument("--imbalance", type=float, default=c.imbalance,
                   help="most/least frequent class ratio (1 = balanced)")
    p.add_argument("--me-ms", type=float, nargs=2, default=list(c.me_ms), metavar=("MIN", "MAX"),
                   help="onset-to-offset duration range (ms)")
    p.add_argument("--neutral-ms", type=float, nargs=2, default=list(c.neutral_ms), metavar=("MIN", "MAX"),
                   help="neutral lead-in and lead-out range (ms, each)")
    p.add_argument("--blink-prob", type=float, default=c.blink_prob)
    p.add_argument("--jpeg-quality", type=int, default=c.jpeg_quality)
    p.add_argument("--png-compression", type=int, default=c.png_compression)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing generated set")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _default_splits(n: int) -> tuple[int, int, int]:
    a = int(round(n * 5 / 24))
    return (n - 2 * a, a, a)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m mer.synth --out DFME_demo [options]``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    config = SynthConfig(
        subjects=args.subjects, clips_per_subject=args.clips_per_subject, total_clips=args.clips,
        split_subjects=tuple(args.split_subjects) if args.split_subjects else _default_splits(args.subjects),
        fps=tuple(args.fps), width=args.width, height=args.height, face_width=args.face_width,
        seed=args.seed, amplitude=args.amplitude, noise=args.noise, asynchrony=args.asynchrony,
        head_motion=args.head_motion, imbalance=args.imbalance, blink_prob=args.blink_prob,
        me_ms=tuple(args.me_ms), neutral_ms=tuple(args.neutral_ms),
        jpeg_quality=args.jpeg_quality, png_compression=args.png_compression,
    )
    t0 = time.perf_counter()
    df = generate(args.out, config, truth_out=args.truth_out, workers=max(1, args.workers),
                  progress=not args.no_progress, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    counts = df.groupby("Split").size().to_dict()
    log.info("splits %s; emotions %s; %.2f s/clip, %.1f ms/frame (wall, %d workers)", counts,
             df.Emotion.value_counts().to_dict(), dt / max(len(df), 1),
             1000 * dt / max(int(df.NFrames.sum()), 1), args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
