"""Raw clips -> cached local-motion tensors: face, crop, flow from the first frame, ROI features.

One clip at a time, streaming its frames (only the reference and the current frame are in memory)
and decoding only the frames the millisecond grid needs.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from . import cache as C
from .errors import UserError
from .blinks import blink_score, eyelid_rois, suppress_blinks
from .data import FRAME_EXTS, TEST_SPLITS, Dataset, table_fingerprint
from .face import Cropper, Detection, centred_matrix, crop_matrix, make_landmarker, template_landmarks, transform_points
from .features import (APEX_FRAMES, HeadMotion, Motion, RoiPooler, grid_frames, motion_magnitude, roi_boxes,
                       roi_specs, spot_apex_score)
from .flow import flow_from_config, optical_strain
from .frames import FolderFrames, FrameSource
from .devices import jobs_that_fit
from .workers import Lost, run_jobs

log = logging.getLogger("mer.preprocess")


class ClipError(Exception):
    """This clip cannot be processed (the reason is recorded in the manifest)."""


@dataclass
class Clip:
    """What one clip needs: where its frames are and how to time them."""

    split: str
    sample: str
    frames_dir: str
    fps: float
    start_frame: float = np.nan
    end_frame: float = np.nan
    apex: float = np.nan
    exts: tuple = FRAME_EXTS
    files: tuple[str, ...] | None = None  # the folder's frame file names, listed once when the data was read

    @property
    def is_test(self) -> bool:
        return self.split in TEST_SPLITS


@dataclass
class Face:
    """Where the face is in a clip: crop matrix (frame -> flow crop), landmarks (frame px), ROI
    layout on the crop, feature unit (100 / inner-eye distance in crop px), status, head motion."""

    matrix: np.ndarray
    landmarks: np.ndarray
    layout: object
    unit: float
    status: str
    reason: str
    head: HeadMotion
    crop: Cropper
    shape: tuple


BLANK_CONTRAST = 0.1  # a face crop with less than this share of the reference's contrast is a dropped frame


@dataclass
class Track:
    """What the flow loop gathers: per-step features, times, frame numbers, head motion, total ROI
    motion and flow (kept until the onset-apex frames are chosen); the crop's re-anchoring."""

    ref: np.ndarray
    contrast: float = 0.0  # the reference crop's grey-level std: a crop with a tenth of it is blank
    brightness: float = 0.0  # the reference crop's mean grey level (preprocess.match_gain)
    feats: list = field(default_factory=list)
    times: list = field(default_factory=list)
    numbers: list = field(default_factory=list)
    head: list = field(default_factory=list)
    motion: list = field(default_factory=list)  # total ROI motion per step
    flows: list = field(default_factory=list)  # (raw flow, head Motion) per step
    offsets: list = field(default_factory=list)  # the crop's offset per step
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2))
    apexes: dict = field(default_factory=dict)  # apex_frame choice -> (frame number, head-free flow)
    best: tuple = (None, None)  # preprocess.apex_frame's choice: (frame number, head-free flow)
    apex_flow: np.ndarray | None = None  # the annotated apex's head-free flow, if on the grid


@dataclass
class Extractor:
    """The per-process machinery (landmarker, flow), built once per worker."""

    cfg: dict
    device: str = "cpu"
    _landmarker: object = None
    _flow: object = None
    specs: list = field(default_factory=list)

    def __post_init__(self):
        p = self.cfg["preprocess"]
        self.specs = roi_specs(p["rois"])
        self.channels = tuple(p["channels"])
        self._flow = flow_from_config(p)
        self.match_gain = bool(p.get("match_gain", False))
        if p["apex_frame"] not in APEX_FRAMES:
            raise ValueError(f"preprocess.apex_frame must be one of {', '.join(APEX_FRAMES)}, "
                             f"got '{p['apex_frame']}'")
        blinks_seen = "v" in self.channels and len(eyelid_rois(self.specs)) >= 2
        where = "which these settings lack (preprocess.channels, preprocess.rois)"
        if p["apex_frame"] == "spotted" and not {"u", "v"} <= set(self.channels):
            log.warning(f"preprocess.apex_frame=spotted spots the apex in the u and v channels, {where}: the "
                        "onset-apex map uses the max-motion frame (set preprocess.apex_frame=max_motion to say so)")
        elif p["apex_frame"] != "max_motion" and not blinks_seen:
            log.warning(f"preprocess.apex_frame={p['apex_frame']} finds blinks in the v channel of the two "
                        f"lower-eyelid ROIs, {where}: blink steps are not excluded from the onset-apex frame")

    @property
    def landmarker(self):
        if self._landmarker is None:
            p = self.cfg["preprocess"]
            self._landmarker = make_landmarker(p["landmarks"], p["detect_upsample"], self.device, p["detect_width"])
        return self._landmarker

    # ------------------------------------------------------------------ one clip
    def process(self, clip: Clip, debug: bool = False, frames: FrameSource | None = None) -> dict:
        """Arrays and status fields of one clip (see cache.MANIFEST_COLUMNS).

        `frames`: where to read the clip's frames (default: the image files of clip.frames_dir)."""
        t0 = time.process_time()
        if frames is None:
            frames = FolderFrames.of(clip.frames_dir, clip.exts, clip.start_frame, clip.end_frame, clip.files)
        rec = self._check(clip, frames)
        read = self._reader(clip, frames, rec)
        ref_pos, ref_img = self._reference(read, len(frames))
        pos, img, found = self._find_face(clip, frames, read, ref_pos, ref_img, rec)
        if found is not None and pos != ref_pos:  # the face came later: motion is measured from there
            ref_pos, ref_img = pos, img
        face = self._face(clip, ref_img, found, rec)
        track = self._track(clip, frames, read, ref_pos, ref_img, face, rec)
        out = self._outputs(clip, frames, read, ref_img, face, track)
        rec.update({
            "status": face.status, "reason": face.reason, "steps": len(track.feats),
            "duration_ms": float(track.times[-1]),
            "head_motion": float(np.abs(out["head"][:, :2]).max()),
            "seconds": time.process_time() - t0,
        })
        out.update({k: np.asarray(v) for k, v in rec.items()})
        if debug:
            out["_debug"] = self._debug(ref_img, face, track)
        return out

    def _check(self, clip: Clip, frames: FrameSource) -> dict:
        """The clip's status record, after checks that need no decoding."""
        if len(frames) < 2:
            raise ClipError(f"only {len(frames)} frame(s) in {clip.frames_dir}")
        if not clip.fps or np.isnan(clip.fps) or clip.fps <= 0:
            raise ClipError(f"invalid frame rate {clip.fps}")
        p = self.cfg["preprocess"]
        duration = (frames.numbers[-1] - frames.numbers[0]) * 1000.0 / clip.fps
        truncated = duration > p["max_ms"]
        if truncated:
            log.warning("%s/%s: %.0f ms long, truncated to preprocess.max_ms=%.0f (the rest is not used; "
                        "manifest column truncated_from_ms)", clip.split, clip.sample, duration, p["max_ms"])
        return {"fps": float(clip.fps), "frames_total": len(frames), "unreadable": 0, "frames_read": 0,
                "truncated_from_ms": float(duration) if truncated else np.nan}

    @staticmethod
    def _reader(clip: Clip, frames: FrameSource, rec: dict):
        """read(i, reduce=1): frame i in grey (see FrameSource.read), counted. An undecodable frame,
        or one whose size differs from the clip's first frame read (a stray or re-saved file: its
        crop would put the face elsewhere and fake a burst of motion), is logged and skipped (None).
        At each `reduce` the first frame read (the reference) sets the size the others must have: a
        JPEG twice the size decoded at 1/2 would otherwise pass for a full-size frame."""
        sizes: dict[int, tuple[int, int]] = {}  # reduce -> (h, w) every frame read so must have

        def read(i: int, reduce: int = 1) -> np.ndarray | None:
            rec["frames_read"] += 1
            img = frames.read(i, reduce)
            if img is None:
                rec["unreadable"] += 1
                log.warning("%s/%s: unreadable frame %s (undecodable or cut short: skipped; replace it to use it)",
                            clip.split, clip.sample, frames.name(i))
                return None
            shape, full = img.shape[:2], sizes.get(1)
            if reduce in sizes:
                fits = shape == sizes[reduce]
            else:  # decoded whole (PNG) or reduced by libjpeg: ceil(size / reduce)
                fits = full is None or shape in (full, tuple(-(-n // reduce) for n in full))
                if fits:
                    sizes[reduce] = shape
            if not fits:
                rec["unreadable"] += 1
                read.other_size += 1
                (h, w), (h0, w0) = shape, full or sizes[reduce]
                log.warning("%s/%s: frame %s is %dx%d%s, unlike the clip's first frame (%dx%d): skipped (replace "
                            "it to use it)", clip.split, clip.sample, frames.name(i), w, h,
                            f" at 1/{reduce} scale" if reduce > 1 else "", w0, h0)
                return None
            return img
        read.other_size = 0  # frames skipped for their size (said when too few are left)
        return read

    @staticmethod
    def _reference(read, n: int) -> tuple[int, np.ndarray]:
        """The reference frame: the first readable one (motion is measured from it)."""
        for i in range(min(n, 5)):
            img = read(i)
            if img is not None:
                return i, img
        raise ClipError("the first frames are unreadable")

    def _find_face(self, clip: Clip, frames: FrameSource, read, ref_pos: int, ref_img: np.ndarray,
                   rec: dict) -> tuple[int, np.ndarray | None, Detection | None]:
        """The first frame with a face: the reference frame and the next `detect_frames`, then
        `detect_sparse` frames spread over the rest of the clip and, where one of those has a face,
        a bisection back to the first frame that has it (a face entering the picture late).
        Returns (position, frame, detection), detection None if no face was found."""
        p = self.cfg["preprocess"]
        n = len(frames)
        cache: dict[int, tuple[np.ndarray | None, Detection | None]] = {}

        def look(i: int) -> Detection | None:
            if i not in cache:
                img = ref_img if i == ref_pos else read(i)
                cache[i] = (img, self.landmarker(img) if img is not None else None)
            return cache[i][1]

        dense = list(range(ref_pos, min(n, ref_pos + max(1, p["detect_frames"]))))
        hit = next((i for i in dense if look(i) is not None), None)
        if hit is None and dense[-1] + 1 < n and p["detect_sparse"] > 0:
            sparse = np.unique(np.linspace(dense[-1] + 1, n - 1, int(p["detect_sparse"])).round().astype(int))
            before = dense[-1]
            for i in sparse:
                if look(int(i)) is not None:
                    lo, hi = before, int(i)  # no face at lo, a face at hi
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        lo, hi = (lo, mid) if look(mid) is not None else (mid, hi)
                    hit = hi
                    break
                before = int(i)
        if hit is None:
            rec["detect_frame"] = -1
            return ref_pos, ref_img, None
        img, found = cache[hit]
        rec["detect_frame"] = int(frames.numbers[hit])
        if hit != ref_pos:
            log.info("%s/%s: no face before frame %s; motion is measured from there", clip.split, clip.sample,
                     frames.name(hit))
        if found.faces > 1:
            log.info("%s/%s: %d faces in frame %s; using the largest, most central one", clip.split, clip.sample,
                     found.faces, frames.name(hit))
        rec["faces"] = found.faces
        return hit, img, found

    def _face(self, clip: Clip, ref_img: np.ndarray, found: Detection | None, rec: dict) -> "Face":
        """The crop and the ROI layout from the detected landmarks.

        A train clip without a face fails; a test clip gets a centred box (status 'fallback')."""
        p = self.cfg["preprocess"]
        where = f"{p['detect_frames']} first frames and {p['detect_sparse']} more spread over the clip"
        fsize = p["flow_size"]
        status, reason = "ok", ""
        if found is not None:
            try:
                m = crop_matrix(found.landmarks, fsize, p["crop_scale"], p["crop_center_y"])
                landmarks, conf = found.landmarks, found.score
            except ValueError:  # degenerate landmarks: as good as no face
                found = None
        if found is None and clip.is_test:
            status = "fallback"
            reason = f"no face found in the {where}: centred box, template landmarks"
            m = centred_matrix(ref_img.shape, fsize)
            landmarks = transform_points(cv2.invertAffineTransform(m),
                                         template_landmarks(fsize, p["crop_scale"], p["crop_center_y"]))
            conf = 0.0
            rec["detect_frame"] = -1
        elif found is None:
            raise ClipError(f"no face found in the {where}")
        rec["landmark_conf"] = float(conf)
        crop_lm = transform_points(m, landmarks)
        layout = roi_boxes(crop_lm, self.specs, fsize, p["roi_size"], p["nose_landmarks"])
        eye_dist = float(np.hypot(*(crop_lm[42] - crop_lm[39])))
        return Face(m, landmarks, layout, 100.0 / eye_dist, status, reason,
                    HeadMotion(p["head_motion"], crop_lm, layout.nose, fsize),
                    Cropper(m, fsize, ref_img.shape, margin=0.1 * fsize, blur=p.get("flow_blur", 0.0)), ref_img.shape)

    def _flow_at(self, track: "Track", img: np.ndarray, face: "Face", offset: np.ndarray,
                 name: str) -> tuple[np.ndarray, Motion] | None:
        """Flow from the reference crop to this frame's crop, and the head's motion in it; None for a
        blank crop (a dropped black or white frame: almost none of the reference's contrast, so its
        flow would be noise and its head fit would throw the next steps off), logged as `name`."""
        cur = face.crop(img, face.shape, offset)
        sample = cur[::4, ::4]
        if float(sample.std()) < BLANK_CONTRAST * track.contrast:
            log.warning("%s is blank (almost no contrast in the face crop: a dropped frame?): skipped", name)
            return None
        if self.match_gain:  # the reference's mean grey level: flicker and exposure drift are a gain
            cur = cv2.convertScaleAbs(cur, alpha=track.brightness / max(float(sample.mean()), 1.0))
        flow = self._flow(track.ref, cur)
        return flow, face.head(flow)

    @staticmethod
    def _head_free(flow: np.ndarray, motion: Motion) -> np.ndarray:
        return flow - motion.field(flow.shape[0])

    def _track(self, clip: Clip, frames: FrameSource, read, ref_pos: int, ref_img: np.ndarray, face: "Face",
               rec: dict) -> "Track":
        """ROI features on the ms grid, each step's flow from the reference frame, head motion
        removed; the crop re-anchored when the head moved more than reanchor_px."""
        p = self.cfg["preprocess"]
        fsize = p["flow_size"]
        pool = RoiPooler(face.layout.boxes, fsize, p["top_frac"], self.channels)
        factor = face.crop.factor
        small = read(ref_pos, factor) if factor > 1 else ref_img  # JPEG: decoded reduced, as every frame
        if small is None:
            raise ClipError("the reference frame is unreadable at reduced size")
        ref = face.crop(small, face.shape)
        pos, times = grid_frames(frames.numbers[ref_pos:], clip.fps, p["grid_ms"], p["max_ms"])
        pos = pos + ref_pos
        track = Track(ref, contrast=float(ref[::4, ::4].std()), brightness=float(ref[::4, ::4].mean()))
        reanchor = p["reanchor_px"] * fsize / p["crop_size"]
        rec["reanchors"] = 0
        for i, t in zip(pos, times):
            img = small if i == ref_pos else read(i, factor)
            if img is None:
                continue
            step = self._flow_at(track, img, face, track.offset,
                                 f"{clip.split}/{clip.sample}: frame {frames.name(i)}")
            if step is None:
                rec["unreadable"] += 1
                continue
            flow, head = step
            g = head.summary[:2]
            f = pool(flow, head)
            track.feats.append(f)
            track.times.append(t)
            track.numbers.append(frames.numbers[i])
            track.head.append(np.array([track.offset[0] + g[0], track.offset[1] + g[1], head.summary[2]]))
            track.motion.append(pool.last_motion)  # |(u, v)| summed over the ROIs, whatever channels are kept
            track.flows.append((flow, head))  # ~0.3 MB a step: the apex frames need no second decode
            track.offsets.append(track.offset)
            if reanchor > 0 and np.hypot(*g) > reanchor:
                track.offset = track.offset + g
                rec["reanchors"] += 1
        if len(track.feats) < 2:
            odd = getattr(read, "other_size", 0)
            raise ClipError("fewer than 2 readable frames on the time grid" + (
                f" ({odd} of another size than the first frame: if the first frame is the odd one, replace it)"
                if odd else ""))
        self._apex_flows(track, face.unit, clip.apex)
        return track

    def _apex_steps(self, track: "Track", unit: float, margin_ms: float = 40.0) -> dict[str, int]:
        """The step of every onset-apex frame choice (APEX_FRAMES): `max_motion` the largest total
        ROI motion; `blink_free` the same among steps at least `margin_ms` from any blink step (the
        lid starts moving before the eyelid ROIs pass the blink threshold); `spotted` the step that
        stands out most from the steps `apex_spot_ms` before and after it (features.spot_apex_score,
        on features with the blinks interpolated away, so that a blink next to a step does not make
        it stand out), blink steps excluded the same way. Without a blink-free step, or without the
        channels a choice needs, it falls back towards max_motion."""
        p = self.cfg["preprocess"]
        feats = np.stack(track.feats) * unit  # % of the eye distance, as the blink thresholds
        t = np.asarray(track.times)
        motion = np.asarray(track.motion)
        near = np.zeros(len(t), bool)
        for ms in t[blink_score(feats, self.specs, list(self.channels)) > 0]:
            near |= np.abs(t - ms) <= margin_ms
        exclude = near.any() and not near.all()

        def pick(score: np.ndarray) -> int:
            return int(np.argmax(np.where(near, -np.inf, score) if exclude else score))

        steps = {"max_motion": int(np.argmax(motion)), "blink_free": pick(motion)}
        if {"u", "v"} <= set(self.channels):
            clean = suppress_blinks(feats, self.specs, list(self.channels), "interp")
            uv = clean[..., [self.channels.index("u"), self.channels.index("v")]]
            steps["spotted"] = pick(spot_apex_score(uv, t, p["apex_spot_ms"]))
        else:
            steps["spotted"] = steps["max_motion"]
        return steps

    def _apex_flows(self, track: "Track", unit: float, annotated: float) -> None:
        """Every choice's onset-apex frame and head-free flow (`track.apexes`), preprocess.apex_frame's
        as `track.best`, the annotated apex's flow if it lies on the grid; then the steps' flows go."""
        steps = self._apex_steps(track, unit)
        flows = {k: self._head_free(*track.flows[k]) for k in set(steps.values())}
        track.apexes = {mode: (int(track.numbers[k]), flows[k]) for mode, k in steps.items()}
        track.best = track.apexes[self.cfg["preprocess"]["apex_frame"]]
        on_grid = np.nonzero(np.asarray(track.numbers) == annotated)[0]
        if len(on_grid):
            track.apex_flow = self._head_free(*track.flows[on_grid[0]])
        track.flows = []

    def _outputs(self, clip: Clip, frames: FrameSource, read, ref_img: np.ndarray, face: "Face",
                 track: "Track") -> dict:
        """The cached arrays: features in % of the inner-eye distance (strain unit-free), apex maps."""
        p = self.cfg["preprocess"]
        unit = face.unit
        features = np.stack(track.feats) * unit
        if "strain" in self.channels:
            features[..., self.channels.index("strain")] /= unit  # strain is unit-free
        out = {
            "features": features.astype(np.float32),
            "times_ms": np.asarray(track.times, np.float32),
            "frame_numbers": np.asarray(track.numbers, np.int64),
            "head": np.asarray(track.head, np.float32) * np.array([unit, unit, 1.0], np.float32),
            "landmarks": face.landmarks.astype(np.float32),
            "crop_matrix": face.matrix.astype(np.float32),
            "apex_map": self._apex_map(track.best[1], unit, p["apex_size"]),
            "apex_motion_frame": np.int64(track.best[0]),
        }
        for mode, (number, flow) in track.apexes.items():  # every choice's frame; its map where it differs
            out[f"apex_frame_{mode}"] = np.int64(number)
            if number != track.best[0]:
                out[f"apex_map_{mode}"] = self._apex_map(flow, unit, p["apex_size"])
        apex_annotated = -1
        if not np.isnan(clip.apex) and clip.apex >= track.numbers[0]:  # (not before the reference frame)
            flow = track.apex_flow
            hit = np.nonzero(frames.numbers == clip.apex)[0]
            if flow is None and len(hit) and (img := read(int(hit[0]), face.crop.factor)) is not None:
                later = int(np.searchsorted(track.numbers, clip.apex))  # off the grid: the next step's crop
                offset = track.offsets[later] if later < len(track.offsets) else track.offset
                step = self._flow_at(track, img, face, offset,
                                     f"{clip.split}/{clip.sample}: frame {frames.name(int(hit[0]))}")
                flow = None if step is None else self._head_free(*step)
            if flow is not None:
                out["apex_map_annotated"] = self._apex_map(flow, unit, p["apex_size"])
                apex_annotated = int(clip.apex)
        out["apex_annotated_frame"] = np.int64(apex_annotated)
        return out

    def _debug(self, ref_img: np.ndarray, face: "Face", track: "Track") -> dict:
        """What --inspect draws: the crop at crop_size, landmarks, ROI boxes, the peak flow."""
        p = self.cfg["preprocess"]
        k = p["crop_size"] / p["flow_size"]
        size = p["crop_size"]
        return dict(ref_crop=cv2.warpAffine(ref_img, face.matrix * k, (size, size), flags=cv2.INTER_AREA),
                    crop_landmarks=transform_points(face.matrix * k, face.landmarks),
                    boxes=face.layout.boxes * k, nose=face.layout.nose * k,
                    peak_flow=track.best[1], roi_names=[r["name"] for r in self.specs])

    def _apex_map(self, flow: np.ndarray | None, unit: float, side: int) -> np.ndarray:
        """(3, side, side): u, v in % of eye distance, and strain, of the first-to-apex flow."""
        if flow is None:
            return np.zeros((3, side, side), np.float32)
        small = cv2.resize(flow, (side, side), interpolation=cv2.INTER_AREA)
        strain = optical_strain(flow)
        strain = cv2.resize(strain, (side, side), interpolation=cv2.INTER_AREA)
        return np.stack([small[..., 0] * unit, small[..., 1] * unit, strain * 100]).astype(np.float32)


# ---------------------------------------------------------------------- the whole dataset

_WORKER: Extractor | None = None


def _init_worker(cfg: dict, device: str = "cpu") -> None:
    global _WORKER
    cv2.setNumThreads(1)
    _WORKER = Extractor(cfg, device)


def start_method(cfg: dict, device: str) -> str:
    """How preprocessing workers start: 'fork' (cheap) unless a worker will use CUDA (FAN on a
    GPU: CUDA cannot run in a forked child) or the platform forks badly (macOS)."""
    if (cfg["preprocess"]["landmarks"] == "fan" and device.startswith("cuda")) or sys.platform == "darwin":
        return "spawn"
    return "fork"


def _run_one(job: tuple[Clip, str]) -> tuple[str, str, str]:
    """Process and cache one clip in a worker; returns (split, sample, status)."""
    clip, path = job
    try:
        arrays = _WORKER.process(clip)
    except ClipError as e:
        arrays = {"status": np.asarray("failed"), "reason": np.asarray(str(e)),
                  "fps": np.asarray(float(clip.fps) if clip.fps else np.nan)}
    except Exception as e:  # noqa: BLE001 - one broken clip must not stop a night-long run
        log.exception("%s/%s: unexpected error", clip.split, clip.sample)
        arrays = {"status": np.asarray("failed"), "reason": np.asarray(f"{type(e).__name__}: {e}")}
    C.save_clip(Path(path), arrays)
    return clip.split, clip.sample, str(arrays["status"])


def _job_name(job: tuple[Clip, str]) -> str:
    return f"{job[0].split}/{job[0].sample}"


def _cached_since(path: Path, t0: float) -> bool:
    """Whether this run wrote the clip's cache file already (a worker may die after saving a clip
    and before saying so: the clip is then done, not lost)."""
    try:
        return path.stat().st_mtime >= t0 and not _failed(path)
    except OSError:
        return False


def _failed(path: Path) -> bool:
    try:
        return C.read_clip_record(path).get("status") == "failed"
    except UserError:  # corrupt: redo it
        return True


def clips_of(ds: Dataset, splits: list[str], exts) -> list[Clip]:
    t = ds.table[ds.table["split"].isin(splits)]
    files = t["frame_files"] if "frame_files" in t else [None] * len(t)
    return [Clip(r.split, r.sample, r.frames_dir, float(r.fps), float(r.start_frame), float(r.end_frame),
                 float(r.apex), tuple(exts), f if isinstance(f, tuple) else None)
            for r, f in zip(t.itertuples(), files)]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard expects i/n (e.g. 0/4), got '{text}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def preprocess(ds: Dataset, cfg: dict, splits: list[str], cdir: Path, *, workers: int = 1, force: bool = False,
               shard: tuple[int, int] = (0, 1), device: str = "cpu") -> dict[str, pd.DataFrame]:
    """Cache every clip of `splits` (skipping those already cached), then write the manifests.

    A worker that dies on a clip (killed, crashed) costs only that clip: it is recorded as failed
    with the reason, a new worker takes over, and the next run retries it."""
    cv2.setNumThreads(1)
    clips = clips_of(ds, splits, cfg["data"]["image_exts"])
    clips = [c for k, c in enumerate(clips) if k % shard[1] == shard[0]]
    jobs = [(c, str(C.clip_file(cdir, c.split, c.sample))) for c in clips]
    todo = [j for j in jobs if force or not Path(j[1]).is_file() or _failed(Path(j[1]))]
    if len(todo) < len(jobs):
        log.info("%d of %d clips already cached (use --force to redo them; failed ones are retried)",
                 len(jobs) - len(todo), len(jobs))
    t0 = time.time()
    if todo:
        bar = tqdm(total=len(todo), desc="preprocess", unit="clip", file=sys.stderr, dynamic_ncols=True)
        if workers > 1 and start_method(cfg, device) == "spawn" and device.startswith("cuda"):
            fit = jobs_that_fit(device, float(cfg["preprocess"].get("fan_worker_mb", 1500)))
            if fit < workers:
                log.info("FAN on %s: %d worker(s) of %d (each holds a model on the GPU; "
                         "preprocess.fan_worker_mb)", device, fit, workers)
                workers = fit
        if workers > 1:
            for job, result in run_jobs(_run_one, todo, workers, _init_worker, (cfg, device),
                                        start_method(cfg, device), describe=_job_name):
                if isinstance(result, Lost) and not _cached_since(Path(job[1]), t0):
                    clip, path = job  # the worker died on this clip: record it, retried next run
                    C.save_clip(Path(path), {"status": np.asarray("failed"), "reason": np.asarray(result.reason),
                                             "fps": np.asarray(float(clip.fps) if clip.fps else np.nan)})
                bar.update()
        else:
            _init_worker(cfg, device)
            for job in todo:
                _run_one(job)
                bar.update()
        bar.close()
    manifests = {s: build_manifest(ds, s, cdir) for s in splits}
    _log_summary(manifests, {str(Path(p).relative_to(cdir)) for _, p in todo}, time.time() - t0)
    return manifests


def build_manifest(ds: Dataset, split: str, cdir: Path) -> pd.DataFrame:
    """One row per table row of the split: status from the cached file, 'pending' if none yet."""
    rows = []
    for r in ds.split(split).itertuples():
        path = C.clip_file(cdir, split, r.sample)
        rec = C.read_clip_record(path) if path.is_file() else {"status": "pending", "reason": "not processed yet"}
        rec.update(split=split, row=r.row, sample=r.sample, subject=r.subject, dataset=r.dataset,
                   label=r.label if not pd.isna(r.label) else None, aus=str(r.aus or ""),
                   file=str(path.relative_to(cdir)))
        rows.append({k: rec.get(k) for k in C.MANIFEST_COLUMNS})
    df = pd.DataFrame(rows, columns=C.MANIFEST_COLUMNS)
    C.write_manifest(cdir, split, df)
    return df


def _log_summary(manifests: dict[str, pd.DataFrame], done_files: set[str], seconds: float) -> None:
    for split, m in manifests.items():
        counts = m["status"].value_counts().to_dict()
        log.info("%s: %s", split, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        cut = pd.to_numeric(m["truncated_from_ms"], errors="coerce").notna().sum()
        if cut:
            log.warning("%s: %d clip(s) longer than preprocess.max_ms were truncated (manifest column "
                        "truncated_from_ms)", split, cut)
        for r in m[m["status"].isin(["failed", "fallback"])].itertuples():
            log.warning("  %s %s/%s: %s", r.status, split, r.sample, r.reason)
    if done_files:
        done = pd.concat(manifests.values())
        done = done[done["file"].isin(done_files)]
        frames = pd.to_numeric(done["frames_read"], errors="coerce").sum()
        log.info("processed %d clips in %.1f s (%.0f frames read, %.0f frames/s)", len(done_files), seconds,
                 frames, frames / max(seconds, 1e-9))


def inspect_clip(ds: Dataset, cfg: dict, sample: str, out: Path, device: str = "cpu") -> Path:
    """A PNG to check a clip by eye: the crop with landmarks and ROIs, the flow at the apex frame,
    and every ROI's motion over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .flow import flow_to_rgb

    rows = ds.table[ds.table["sample"] == sample]
    if rows.empty:
        raise UserError(f"--inspect {sample}: no such sample in {ds.root}")
    clip = clips_of(ds, [rows.iloc[0]["split"]], cfg["data"]["image_exts"])
    clip = next(c for c in clip if c.sample == sample)
    cv2.setNumThreads(1)
    try:
        res = Extractor(cfg, device).process(clip, debug=True)
    except ClipError as e:
        raise UserError(f"--inspect {sample}: {e}") from None
    d = res["_debug"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    ax = axes[0]
    ax.imshow(d["ref_crop"], cmap="gray")
    ax.scatter(*d["crop_landmarks"].T, s=6, c="yellow")
    for (x0, y0, x1, y1), name in zip(d["boxes"], d["roi_names"]):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.8, ec="cyan"))
    x0, y0, x1, y1 = d["nose"]
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec="red"))
    ax.set_title(f"{sample}: crop, landmarks, ROIs (red: head-motion reference)\n"
                 f"status {res['status']}, landmark score {float(res['landmark_conf']):.2f}", fontsize=9)
    ax.axis("off")
    ax = axes[1]
    size = d["ref_crop"].shape[0]
    flow = cv2.resize(d["peak_flow"], (size, size)) if d["peak_flow"] is not None else np.zeros((size, size, 2))
    ax.imshow(d["ref_crop"], cmap="gray")
    ax.imshow(flow_to_rgb(flow), alpha=0.65)
    step = max(4, size // 24)
    yy, xx = np.mgrid[step // 2:size:step, step // 2:size:step]
    scale = size / d["peak_flow"].shape[0] if d["peak_flow"] is not None else 1
    u, v = flow[yy, xx, 0] * scale, flow[yy, xx, 1] * scale
    gain = step / max(float(np.percentile(np.hypot(u, v), 99)), 1e-6)
    ax.quiver(xx, yy, u * gain, v * gain, color="white", angles="xy", scale_units="xy", scale=1, width=0.003)
    ax.set_title(f"flow from frame 1 to the onset-apex frame ({cfg['preprocess']['apex_frame']}: frame "
                 f"{int(res['apex_motion_frame'])}), arrows x{gain:.2g}",
                 fontsize=9)
    ax.axis("off")
    ax = axes[2]
    f, t = res["features"], res["times_ms"]
    mag, what = motion_magnitude(f, list(cfg["preprocess"]["channels"]))
    cmap = plt.get_cmap("tab20")
    for r, name in enumerate(d["roi_names"]):
        ax.plot(t, mag[:, r], label=name, color=cmap(r % 20), lw=1.2)
    ax.set_xlabel("time from the first frame (ms)")
    ax.set_ylabel(what)
    step = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    ax.set_title(f"ROI motion after head-motion removal ({len(t)} steps, {step:.3g} ms apart: "
                 f"{cfg['preprocess']['grid_ms']:g} ms grid, {float(res['fps']):g} fps)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(root: str | Path, cfg: dict, *, splits: list[str] | None = None, workers: int = 1, force: bool = False,
        shard: str | None = None, inspect: str | None = None, inspect_out: str | None = None,
        device: str = "cpu") -> Path:
    """What `python preprocess.py` does: validate the dataset, then cache (or inspect) its clips.

    device: where FAN landmarks run (dlib always runs on the CPU); flow is CPU work either way."""
    from .config import save_config
    from .data import load_dataset, resolve_issues, summary

    ds = load_dataset(root, cfg)
    splits = splits or ds.splits
    unknown = [s for s in splits if s not in ds.splits]
    if unknown:
        raise UserError(f"--splits {' '.join(unknown)}: not in {root} (found: {', '.join(ds.splits)})")
    table_rows = {s: int((ds.table["split"] == s).sum()) for s in splits}
    ds = resolve_issues(ds, splits)
    log.info("%s", summary(ds))
    if inspect:
        out = Path(inspect_out or f"inspect_{inspect}.png")
        inspect_clip(ds, cfg, inspect, out, device)
        log.info("wrote %s", out)
        return out
    cdir = C.cache_dir(cfg, root)
    try:
        Extractor(cfg, device).landmarker  # a bad setting or a missing model: one clear error, before any work
    except ValueError as e:
        raise UserError(str(e)) from None
    old = C.read_meta(cdir) if (cdir / "meta.yaml").is_file() else {}
    if old.get("root") and old["root"] != str(Path(root).resolve()):
        log.warning("cache %s was made from %s, now %s: clips cached from the old root are reused "
                    "(use --force or another preprocess.cache_dir if the data differ)", cdir, old["root"],
                    Path(root).resolve())
    save_config(cfg, cdir / "config.yaml")
    meta = {"dataset": ds.name, "root": str(Path(root).resolve()), "key": cdir.name, "classes": ds.classes,
            "label_base": ds.label_base, "databases": sorted(set(ds.table["dataset"])),
            "rois": roi_specs(cfg["preprocess"]["rois"]),
            "channels": list(cfg["preprocess"]["channels"]), "splits": sorted(set(splits) | _cached_splits(cdir)),
            "feature_version": C.FEATURE_VERSION,
            "table_rows": {**old.get("table_rows", {}), **table_rows},
            "tables": {**old.get("tables", {}), **{s: table_fingerprint(ds.sources[s], s) for s in splits
                                                   if s in ds.sources}}}
    C.write_meta(cdir, meta)
    log.info("cache: %s", cdir)
    preprocess(ds, cfg, splits, cdir, workers=workers, force=force, shard=parse_shard(shard), device=device)
    return cdir


def _cached_splits(cdir: Path) -> set[str]:
    return {p.parent.name for p in cdir.glob("*/manifest.csv")}
