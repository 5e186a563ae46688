"""The dataset on disk: which clips exist (splits, subjects, emotions, labels), frames written in the
DFME layout, annotation tables and the truth kept apart.

Output contract (what the readers are built on)::

    <out>/train_data/<Filename>/00001.png ...            5-digit, from 1, 8-bit BGR PNG (or .jpg)
    <out>/test_data_A/<Filename>/...
    <out>/test_data_B/test_data_B/<Filename>/...         nested one level, as in real releases
    <out>/train.xlsx       Filename Subject Emotion EmotionId OnsetFrame ApexFrame OffsetFrame FPS AU
    <out>/test_A.xlsx, <out>/test_B.xlsx                Filename FPS
    <truth>/train.csv, test_A.csv, test_B.csv           TRUTH_COLUMNS, same row order as the tables
    <truth>/curves/<Filename>.npz                       CURVE_KEYS
    <truth>/synth_config.yaml                           every setting used
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .aus import AU_DEFS, AU_LANDMARKS, SUPPORTED_AUS
from .camera import Scene, clip_truth, iter_frames, jpeg_quality
from .config import (DFME_CLASS_SHARE, EMOTIONS, FREQUENCY_ORDER, GENERATOR_VERSION, SPLIT_DIRS, SPLITS,
                     TABLE_COLUMNS, TEST_TABLE_COLUMNS, TRUTH_COLUMNS, ClipSpec, SynthConfig, check_emotion,
                     config_dict, rng_for, subject_name)
from .dynamics import HEAD_COLUMNS

log = logging.getLogger("mer.synth")

_FIXED_TIMESTAMP = "2024-01-01T00:00:00Z"
CURVE_KEYS = ("times_ms", "au_ids", "au_side", "au_curves", "au_amplitude_px", "au_amplitude_crop_px",
              "landmarks", "head", "blink", "fps", "emotion_id", "shown_emotion_id", "onset_frame",
              "apex_frame", "offset_frame")


# --------------------------------------------------------------------------------------------
# Which clips
# --------------------------------------------------------------------------------------------

def class_weights(config: SynthConfig) -> dict[str, float]:
    """Relative frequency of each class."""
    if config.class_mix == "dfme":
        return dict(DFME_CLASS_SHARE)
    k = len(FREQUENCY_ORDER)
    r = max(float(config.imbalance), 1.0)
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


def _noisy_label(config: SynthConfig, emotion: str, weights: dict[str, float], *key: int) -> str | None:
    """With probability label_noise, another class (by class frequency): annotators and self-reports
    disagree with what the face shows."""
    rng = rng_for(config, 8, *key)
    if rng.random() >= config.label_noise:
        return None
    others = [e for e in EMOTIONS if e != emotion]
    w = np.array([weights[e] for e in others])
    return others[int(rng.choice(len(others), p=w / w.sum()))]


def plan_dataset(config: SynthConfig) -> list[ClipSpec]:
    """All clips of the dataset (split, subject, filename, emotion, label, fps), in table order.

    Subjects are assigned to splits at random (subject-disjoint); emotions are allocated per split
    by quota (so every split follows the class distribution) and shuffled.
    """
    n = config.subjects
    perm = rng_for(config, 2).permutation(n)
    ntr, na, _ = config.split_subjects
    split_of = {}
    for rank, s in enumerate(perm):
        split_of[int(s)] = "train" if rank < ntr else ("test_A" if rank < ntr + na else "test_B")
    if config.total_clips is not None:
        base, extra = divmod(int(config.total_clips), n)
        per_subject = [base + (1 if s < extra else 0) for s in range(n)]
    else:
        per_subject = [int(config.clips_per_subject)] * n
    weights = class_weights(config)
    specs: list[ClipSpec] = []
    for split_id, split in enumerate(SPLITS):
        subjects = sorted(s for s in range(n) if split_of[s] == split)
        slots = [(s, c) for s in subjects for c in range(1, per_subject[s] + 1)]
        emotions = _quota(len(slots), weights)
        rng_for(config, 3, split_id).shuffle(emotions)
        for (s, c), emo in zip(slots, emotions):
            fps = int(rng_for(config, 1, s, c).choice(np.array(config.fps)))
            name = subject_name(s, n)
            specs.append(ClipSpec(filename=f"{name}_{c:03d}", subject=name, subject_index=s, clip_no=c,
                                  split=split, emotion=emo, fps=fps,
                                  label=_noisy_label(config, emo, weights, s, c)))
    return specs


def single_clip_spec(config: SynthConfig, emotion: str = "happiness", subject_index: int = 0,
                     clip_no: int = 1, fps: int | None = None,
                     aus: Sequence[int] | None = None) -> ClipSpec:
    """A hand-made clip spec (for tests and benchmarks), e.g. one AU alone via ``aus=[12]``."""
    check_emotion(emotion)
    if aus is not None and any(a not in AU_DEFS for a in aus):
        raise ValueError(f"unsupported AU in {aus}; supported: {SUPPORTED_AUS}")
    name = subject_name(subject_index, max(config.subjects, subject_index + 1))
    return ClipSpec(filename=f"{name}_{clip_no:03d}", subject=name, subject_index=subject_index,
                    clip_no=clip_no, split="train", emotion=emotion,
                    fps=int(fps if fps is not None else config.fps[0]),
                    aus_override=tuple(int(a) for a in aus) if aus is not None else None)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
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
    scene = Scene(spec, config)
    truth = clip_truth(spec, config, fps, scene)
    if config.frame_format == "jpg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(config.frame_quality)]
    else:
        ext, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, int(config.png_compression),
                               cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
                               cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]  # ~2x faster than defaults
    n = 0
    for n, frame in enumerate(iter_frames(spec, config, fps, scene), start=1):
        ok, buf = cv2.imencode(ext, frame, params)
        if not ok:
            raise OSError(f"encoding failed for {clip_dir}/{n:05d}{ext}")
        (clip_dir / f"{n:05d}{ext}").write_bytes(buf.tobytes())
    if n != len(truth["times_ms"]):
        raise RuntimeError("frame count mismatch")
    if curves_path is not None:
        curves_path = Path(curves_path)
        curves_path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(curves_path, {k: truth[k] for k in CURVE_KEYS})
    return truth


def truth_row(spec: ClipSpec, truth: dict) -> dict:
    """One row of the truth table (TRUTH_COLUMNS); its first columns are the train table's."""
    return dict(Filename=spec.filename, Subject=spec.subject, Emotion=spec.recorded,
                EmotionId=spec.emotion_id, OnsetFrame=int(truth["onset_frame"]),
                ApexFrame=int(truth["apex_frame"]), OffsetFrame=int(truth["offset_frame"]),
                FPS=int(truth["fps"]), AU=truth["au_label"], ShownEmotion=spec.emotion,
                LabelNoise=int(spec.label is not None), Photo=str(truth["photo"]), Blink=truth["blink_kind"],
                PeakAmplitudeCropPx=round(float(np.max(truth["au_amplitude_crop_px"], initial=0.0)), 3))


def _job(spec: ClipSpec, config: SynthConfig, out: str, truth_out: str) -> dict:
    clip_dir = Path(out) / SPLIT_DIRS[spec.split] / spec.filename
    curves = Path(truth_out) / "curves" / f"{spec.filename}.npz"
    truth = write_clip(spec, config, clip_dir, curves_path=curves)
    row = truth_row(spec, truth)
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


def generate(out: Path | str, config: SynthConfig, truth_out: Path | str | None = None,
             workers: int = 1, progress: bool = False, overwrite: bool = False) -> pd.DataFrame:
    """Generate a synthetic DFME-layout dataset at ``out`` and its truth at ``truth_out``.

    Returns one row per clip (all splits, table order) with columns ``Split`` + TRUTH_COLUMNS +
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
        part[list(TRUTH_COLUMNS)].to_csv(truth_dir / f"{split}.csv", index=False, lineterminator="\n")
        if split == "train":
            write_xlsx(part[list(TABLE_COLUMNS)].reset_index(drop=True), out / "train.xlsx")
        else:
            write_xlsx(part[list(TEST_TABLE_COLUMNS)].reset_index(drop=True), out / f"{split}.xlsx")
    meta = dict(config=config_dict(config), generator_version=GENERATOR_VERSION,
                jpeg_quality_effective=jpeg_quality(config), layout=dict(SPLIT_DIRS), emotions=list(EMOTIONS),
                au_landmarks=AU_LANDMARKS,
                au_side_convention="0 both sides, -1 subject-left (image right), "
                                   "+1 subject-right (image left)",
                head_columns=list(HEAD_COLUMNS),
                head_convention="p' = (1 + zoom) R(roll) (p - c) + c + (dx, dy); c = centroid of frame-1 "
                                "landmarks; roll in deg, clockwise on screen (y down); yaw and pitch (deg) "
                                "move each point by its depth times the angle",
                clips=int(len(df)), frames=int(df.NFrames.sum()),
                label_noise_clips=int(df.LabelNoise.sum()), blinks=df.Blink.value_counts().to_dict())
    (truth_dir / "synth_config.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    dt = time.perf_counter() - t0
    log.info("wrote %d clips / %d frames to %s (truth: %s) in %.1f s", len(df), int(df.NFrames.sum()),
             out, truth_dir, dt)
    return df
