"""Synthetic DFME-like micro-expression clips, for testing and benchmarking without licensed data.

Real DFME data cannot be shipped, so every reader, feature extractor and model in this project is
tested on clips made here, and ranked on a yardstick made here. Two difficulty presets:

* ``easy`` (the defaults, fast): one face photo, 640x480, EMFACS prototypes, 0.5-2 px AUs;
* ``dfme`` (``SynthConfig.preset("dfme")`` / ``--difficulty dfme``): DFME's difficulty, calibrated so
  that the onset-apex baseline and the full-sequence pipeline land where they land on real DFME
  (README, "The synthetic DFME generator"): emotions as overlapping AU patterns (mostly one AU per
  clip), sub-pixel AUs (0.2-1.5 px at the crop) with per-AU timing, subjects' own styles, a 1024x768
  high-speed camera with faces 300-450 px wide, sensor noise and 100 Hz flicker, head drift, roll,
  zoom and out-of-plane turns, blinks of three kinds in every class, 10% of labels disagreeing
  with the face.

Modules: ``config`` (settings, presets), ``faces`` (photos, landmarks, morphs), ``aus`` (AU geometry,
emotion -> AUs), ``dynamics`` (timing in ms: AUs, blinks, head, flicker), ``camera`` (rendering),
``layout`` (splits, files, tables, truth), ``cli``. Everything is deterministic per seed: each subject
and each clip draws from its own ``numpy.random.Generator`` seeded by ``(seed, kind, subject, clip)``,
so worker count and order do not change a byte of output.

Run ``python -m mer.synth --out DFME_demo`` (see ``--help``), or call :func:`generate`. One clip can
be rendered at several frame rates with identical timing in ms: ``render_clip(spec, config, fps=200)``
and ``render_clip(spec, config, fps=500)``; ``iter_frames(..., indices=...)`` renders only some frames.
"""

from .aus import (AU_DEFS, AU_LANDMARKS, EMFACS_RECIPES, OVERLAPPING_PATTERNS, SUPPORTED_AUS,
                  au_landmark_displacement)
from .camera import ClipRenderer, Scene, clip_truth, iter_frames, jpeg_quality, render_clip
from .cli import main
from .config import (DFME_CLASS_SHARE, EMOTION_ID, EMOTIONS, GENERATOR_VERSION, PRESETS, SPLIT_DIRS, SPLITS,
                     TABLE_COLUMNS, TEST_TABLE_COLUMNS, TRUTH_COLUMNS, ClipSpec, SynthConfig, config_dict)
from .dynamics import HEAD_COLUMNS, clip_curves, clip_details, times_ms
from .faces import ASTRONAUT_LANDMARKS, BUILTIN_PHOTOS, MIRROR_PERM, PYFEAT_PHOTOS, load_photo, pyfeat_file
from .layout import (CURVE_KEYS, default_truth_dir, generate, plan_dataset, single_clip_spec, truth_row,
                     write_clip, write_xlsx)

__all__ = [
    "AU_DEFS", "AU_LANDMARKS", "ClipRenderer", "ASTRONAUT_LANDMARKS", "BUILTIN_PHOTOS", "CURVE_KEYS", "ClipSpec",
    "DFME_CLASS_SHARE", "EMFACS_RECIPES", "EMOTIONS", "EMOTION_ID", "GENERATOR_VERSION", "HEAD_COLUMNS",
    "MIRROR_PERM", "OVERLAPPING_PATTERNS", "PRESETS", "PYFEAT_PHOTOS", "SPLITS", "SPLIT_DIRS", "SUPPORTED_AUS", "Scene",
    "SynthConfig",
    "TABLE_COLUMNS", "TEST_TABLE_COLUMNS", "TRUTH_COLUMNS", "au_landmark_displacement", "clip_curves",
    "clip_details", "clip_truth", "config_dict", "default_truth_dir", "generate", "iter_frames",
    "jpeg_quality", "load_photo", "main", "plan_dataset", "pyfeat_file", "render_clip", "single_clip_spec",
    "times_ms", "truth_row", "write_clip", "write_xlsx",
]
