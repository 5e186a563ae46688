"""Settings of the generator: class names, layout constants, `SynthConfig` and its difficulty presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .faces import check_photo

EMOTIONS: tuple[str, ...] = (
    "anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise",
)
"""Class names; the index is the EmotionId (alphabetical, as in the CCAC 2024 winner's code)."""
EMOTION_ID: dict[str, int] = {e: i for i, e in enumerate(EMOTIONS)}

FREQUENCY_ORDER: tuple[str, ...] = (
    "happiness", "surprise", "disgust", "fear", "sadness", "anger", "contempt",
)
"""Most to least frequent class for `class_mix: ranked` with ``imbalance > 1``."""

DFME_CLASS_SHARE: dict[str, float] = {
    "disgust": 0.26, "surprise": 0.20, "happiness": 0.17, "fear": 0.12, "sadness": 0.10,
    "anger": 0.09, "contempt": 0.06,
}
"""`class_mix: dfme`: an estimate of DFME's class shares (disgust, surprise and happiness lead,
contempt is rarest; the official counts are not public), most/least ratio ~4.3."""

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
TRUTH_COLUMNS: tuple[str, ...] = TABLE_COLUMNS + ("ShownEmotion", "LabelNoise", "Photo", "Blink",
                                                  "PeakAmplitudeCropPx")
"""Truth tables: the train table's columns plus what only the generator knows: the emotion whose AU
pattern the clip shows (differs from ``Emotion`` where label noise changed the recorded label), the
face photo, the blink kind and the largest AU displacement in px of a 256 px face crop."""


@dataclass
class SynthConfig:
    """Every knob of the generator. The defaults are the fast ``easy`` preset used by unit tests;
    ``SynthConfig.preset("dfme")`` gives DFME's difficulty (see PRESETS)."""

    subjects: int = 24
    clips_per_subject: int = 12
    total_clips: int | None = None  # if set, overrides clips_per_subject (spread evenly)
    split_subjects: tuple[int, int, int] = (14, 5, 5)  # train / test_A / test_B subject counts
    fps: tuple[int, ...] = (200, 300, 500)
    width: int = 640
    height: int = 480
    face_width: float = 200.0  # face width (jaw 0-16) in px at 640 px frame width; scales with width
    face_spread: float = 0.12  # subjects' face width varies by up to +-this fraction
    photos: tuple[str, ...] = ("astronaut",)  # face photos: astronaut, grace_hopper, or image paths
    skin_texture: float = 0.0  # fine skin texture (pores) added to upscaled photos: std in grey levels
    seed: int = 0
    difficulty: str = "easy"  # the preset these settings came from (recorded in the truth)
    # -- expressions
    au_mapping: str = "emfacs"  # emfacs (full prototypes) | overlapping (DFME-like AU probabilities)
    amplitude: float = 1.0  # scale of AU amplitudes
    amplitude_px: tuple[float, float] = (0.5, 2.0)  # AU peak displacement in px of a 256 px face crop
    amplitude_dist: str = "uniform"  # uniform | loguniform (weak AUs common) over amplitude_px
    idiosyncrasy: float = 0.0  # subjects' own style: expressiveness, asymmetry, habitual AUs (0 = none)
    label_noise: float = 0.0  # share of recorded labels that disagree with the AUs shown
    asynchrony: float = 1.0  # 0 = all AUs peak together, 1 = default spread, >1 = more
    me_ms: tuple[float, float] = (150.0, 500.0)  # onset-to-offset duration range
    neutral_ms: tuple[float, float] = (30.0, 150.0)  # neutral lead-in / lead-out range (each)
    class_mix: str = "ranked"  # ranked (FREQUENCY_ORDER with `imbalance`) | dfme (DFME_CLASS_SHARE)
    imbalance: float = 2.5  # most / least frequent class ratio for class_mix=ranked (<= 1 = balanced)
    # -- distractors
    blink_prob: float = 0.25
    blink_ms: tuple[float, float] = (100.0, 150.0)
    blink_kinds: tuple[float, float, float] = (1.0, 0.0, 0.0)  # weights of single / double / half blinks
    head_motion: float = 1.0  # scale of all head motion below
    drift_px: tuple[float, float] = (0.2, 3.0)  # slow drift over the clip, px on a 200 px face
    roll_deg: float = 0.4  # slow in-clip roll up to +-this (deg)
    zoom_pct: float = 0.0  # slow scale change up to +-this (%), the head nearing the camera
    out_of_plane_deg: float = 0.0  # slow yaw and pitch up to +-this (deg): depth parallax
    noise: float = 1.0  # scale of sensor noise, flicker and compression (0 = clean, no JPEG)
    noise_sigma: tuple[float, float] = (0.8, 2.2)  # sensor noise std range (grey levels at mid-grey)
    flicker_pct: tuple[float, float] = (0.2, 1.0)  # mains-light flicker amplitude range (% brightness)
    flicker_hz: tuple[float, ...] = (100.0, 120.0)  # flicker frequencies (twice the mains frequency)
    jpeg_quality: int = 90  # JPEG round-trip quality at noise=1 (100 or noise=0: no JPEG)
    frame_format: str = "png"  # png | jpg: how frames are written to disk
    frame_quality: int = 92  # JPEG quality of frames written as jpg
    png_compression: int = 1  # zlib level for PNG frames (low = fast)

    def __post_init__(self) -> None:
        tuples = ("split_subjects", "fps", "amplitude_px", "me_ms", "neutral_ms", "blink_ms", "blink_kinds",
                  "drift_px", "noise_sigma", "flicker_pct", "flicker_hz", "photos")
        for name in tuples:
            setattr(self, name, tuple(getattr(self, name)))
        self.split_subjects = tuple(int(v) for v in self.split_subjects)  # type: ignore[assignment]
        self.fps = tuple(int(v) for v in self.fps)
        if len(self.split_subjects) != 3 or sum(self.split_subjects) != self.subjects:
            raise ValueError(f"split_subjects {self.split_subjects} must be 3 counts summing to "
                             f"subjects={self.subjects}")
        if min(self.split_subjects) < 0 or not self.fps or min(self.fps) <= 0:
            raise ValueError("split counts must be >= 0 and fps positive")
        if self.width < 160 or self.height < 120:
            raise ValueError("frames must be at least 160x120")
        if self.frame_format not in ("png", "jpg"):
            raise ValueError(f"frame_format must be png or jpg, got {self.frame_format!r}")
        if self.au_mapping not in ("emfacs", "overlapping"):
            raise ValueError(f"au_mapping must be emfacs or overlapping, got {self.au_mapping!r}")
        if self.amplitude_dist not in ("uniform", "loguniform"):
            raise ValueError(f"amplitude_dist must be uniform or loguniform, got {self.amplitude_dist!r}")
        if self.class_mix not in ("ranked", "dfme"):
            raise ValueError(f"class_mix must be ranked or dfme, got {self.class_mix!r}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if len(self.blink_kinds) != 3 or min(self.blink_kinds) < 0 or sum(self.blink_kinds) <= 0:
            raise ValueError("blink_kinds must be 3 non-negative weights (single, double, half)")
        if not self.photos:
            raise ValueError("photos must name at least one face photo")
        for name in self.photos:
            check_photo(name)

    @property
    def face_px(self) -> float:
        """Nominal face width in px for this frame width."""
        return self.face_width * self.width / 640.0

    @classmethod
    def preset(cls, difficulty: str = "easy", **overrides) -> "SynthConfig":
        """The settings of a difficulty preset (PRESETS), with any field overridden."""
        if difficulty not in PRESETS:
            raise ValueError(f"unknown difficulty {difficulty!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[difficulty], "difficulty": difficulty, **overrides})


PRESETS: dict[str, dict] = {
    "easy": {},
    # DFME's difficulty (REFERENCE.md, "How hard real micro-expressions are"): emotions as overlapping
    # AU patterns (two in three clips show one AU), 0.2-1.5 px at the crop, a 1024x768 high-speed camera
    # with faces 300-450 px wide, strong sensor noise and 100 Hz flicker, head drift, roll, zoom and
    # out-of-plane turns, blinks of three kinds in every class, 10% of labels disagreeing with the AUs.
    "dfme": dict(
        width=1024, height=768, face_width=375.0 * 640 / 1024, face_spread=0.2,
        photos=("astronaut", "grace_hopper"), skin_texture=4.0, au_mapping="overlapping", amplitude_px=(0.2, 1.5),
        amplitude_dist="uniform",
        idiosyncrasy=1.0, label_noise=0.10, asynchrony=1.5, me_ms=(250.0, 700.0), neutral_ms=(40.0, 260.0),
        class_mix="dfme", blink_prob=0.35, blink_ms=(100.0, 250.0), blink_kinds=(0.6, 0.2, 0.2),
        drift_px=(0.5, 4.0), roll_deg=1.0, zoom_pct=1.0, out_of_plane_deg=1.0, noise_sigma=(1.5, 4.0),
        flicker_pct=(1.0, 3.0), flicker_hz=(100.0,), jpeg_quality=92,
    ),
}


GENERATOR_VERSION = 2  # bump when the same settings render other clips (2: AU gains kept inside amplitude_px)


def config_dict(config: SynthConfig) -> dict:
    """Plain-type dict of a config (for YAML)."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class ClipSpec:
    """Identity of one clip; everything else is drawn from its own seeded RNG at render time."""

    filename: str
    subject: str
    subject_index: int  # 0-based
    clip_no: int  # 1-based within subject
    split: str
    emotion: str  # the emotion whose AU pattern the clip shows
    fps: int
    aus_override: tuple[int, ...] | None = None  # force exactly these AUs (both sides)
    label: str | None = None  # the recorded emotion where label noise made it differ from `emotion`

    @property
    def recorded(self) -> str:
        """The emotion written in the table (the label a model is trained and scored on)."""
        return self.label or self.emotion

    @property
    def emotion_id(self) -> int:
        """The recorded label's id."""
        return EMOTION_ID[self.recorded]


def rng_for(config: SynthConfig, *key: int) -> np.random.Generator:
    """The generator's only source of randomness: a Generator seeded by (seed, *key), so that
    worker count and order never change a byte of output."""
    return np.random.default_rng([int(config.seed) & 0xFFFFFFFF, *[int(k) for k in key]])


def subject_name(i: int, n: int) -> str:
    return f"s{i + 1:0{max(2, len(str(n)))}d}"


def check_emotion(emotion: str) -> None:
    if emotion not in EMOTION_ID:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
