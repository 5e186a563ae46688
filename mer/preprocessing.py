"""Raw clips -> cached local-motion tensors: face, crop, flow from the first frame, ROI features.

One clip at a time, streaming its frames (only the reference and the current frame are in memory)
and decoding only the frames the millisecond grid needs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from . import cache as C
from .cli import UserError
from .data import TEST_SPLITS, Dataset, frame_number, list_frames
from .face import centred_matrix, crop_matrix, make_landmarker, template_landmarks, transform_points
from .features import HeadMotion, RoiPooler, grid_frames, roi_boxes, roi_specs
from .flow import make_flow, optical_strain

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
    exts: tuple = (".png", ".jpg", ".jpeg", ".bmp")

    @property
    def is_test(self) -> bool:
        return self.split in TEST_SPLITS


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
        self._flow = make_flow(p["flow"], p["dis_preset"])

    @property
    def landmarker(self):
        if self._landmarker is None:
            p = self.cfg["preprocess"]
            self._landmarker = make_landmarker(p["landmarks"], p["detect_upsample"], self.device, p["detect_width"])
        return self._landmarker

    # ------------------------------------------------------------------ one clip
    def process(self, clip: Clip, debug: bool = False) -> dict:
        """Arrays and status fields of one clip (see cache.MANIFEST_COLUMNS)."""
        t0 = time.process_time()
        p = self.cfg["preprocess"]
        frames = list_frames(clip.frames_dir, clip.exts)
        numbers = np.array([frame_number(f) for f in frames], np.float64)
        if not np.isnan(clip.start_frame) and not np.isnan(clip.end_frame):
            keep = (numbers >= clip.start_frame) & (numbers <= clip.end_frame)
            frames, numbers = [f for f, k in zip(frames, keep) if k], numbers[keep]
        if len(frames) < 2:
            raise ClipError(f"only {len(frames)} frame(s) in {clip.frames_dir}")
        if not clip.fps or np.isnan(clip.fps) or clip.fps <= 0:
            raise ClipError(f"invalid frame rate {clip.fps}")
        duration = (numbers[-1] - numbers[0]) * 1000.0 / clip.fps
        truncated = duration > p["max_ms"]
        if truncated:
            log.warning("%s/%s: %.0f ms long, truncated to preprocess.max_ms=%.0f (the rest is not used; "
                        "manifest column truncated_from_ms)", clip.split, clip.sample, duration, p["max_ms"])
        rec = {"fps": float(clip.fps), "frames_total": len(frames), "unreadable": 0, "frames_read": 0,
               "truncated_from_ms": float(duration) if truncated else np.nan}

        def read(i: int) -> np.ndarray | None:
            rec["frames_read"] += 1
            img = cv2.imread(str(frames[i]), cv2.IMREAD_GRAYSCALE)
            if img is None:
                rec["unreadable"] += 1
                log.warning("%s/%s: unreadable frame %s (skipped)", clip.split, clip.sample, frames[i].name)
            return img

        # Reference frame: the first readable one.
        ref_pos, ref_img = None, None
        for i in range(min(len(frames), 5)):
            ref_img = read(i)
            if ref_img is not None:
                ref_pos = i
                break
        if ref_img is None:
            raise ClipError("the first frames are unreadable")

        # Face on the reference frame, else on the following frames.
        status, reason, found = "ok", "", None
        for i in range(ref_pos, min(len(frames), ref_pos + max(1, p["detect_frames"]))):
            img = ref_img if i == ref_pos else read(i)
            if img is None:
                continue
            found = self.landmarker(img)
            if found is not None:
                rec["detect_frame"] = int(numbers[i])
                break
        size, fsize = p["crop_size"], p["flow_size"]
        if found is not None:
            try:
                m = crop_matrix(found[0], fsize, p["crop_scale"], p["crop_center_y"])
                landmarks, conf = found
            except ValueError:  # degenerate landmarks: as good as no face
                found = None
        if found is None and clip.is_test:
            status, reason = "fallback", f"no face found in the first {p['detect_frames']} frames: centred box, template landmarks"
            m = centred_matrix(ref_img.shape, fsize)
            landmarks = transform_points(cv2.invertAffineTransform(m), template_landmarks(fsize, p["crop_scale"], p["crop_center_y"]))
            conf = 0.0
            rec["detect_frame"] = -1
        elif found is None:
            raise ClipError(f"no face found in the first {p['detect_frames']} frames")
        rec["landmark_conf"] = float(conf)

        crop_lm = transform_points(m, landmarks)
        layout = roi_boxes(crop_lm, self.specs, fsize, p["roi_size"], p["nose_landmarks"])
        pool = RoiPooler(layout.boxes, fsize, p["top_frac"], self.channels)
        head_motion = HeadMotion(p["head_motion"], crop_lm, layout.nose, fsize)
        eye_dist = float(np.hypot(*(crop_lm[42] - crop_lm[39])))
        unit = 100.0 / eye_dist  # features in % of the inner-eye-corner distance: face-size free
        ref = cv2.warpAffine(ref_img, m, (fsize, fsize), flags=cv2.INTER_AREA)

        pos, times = grid_frames(numbers[ref_pos:], clip.fps, p["grid_ms"], p["max_ms"])
        pos = pos + ref_pos
        use_strain = "strain" in self.channels
        feats, kept_t, kept_n, head = [], [], [], []
        offset = np.zeros(2)
        reanchor = p["reanchor_px"] * fsize / size
        best = (-1.0, None, None)
        debug_out: dict = {}
        rec["reanchors"] = 0
        for i, t in zip(pos, times):
            img = ref_img if i == ref_pos else read(i)
            if img is None:
                continue
            mi = m.copy()
            mi[:, 2] -= offset
            cur = cv2.warpAffine(img, mi, (fsize, fsize), flags=cv2.INTER_AREA)
            flow = self._flow(ref, cur)
            motion, hm = head_motion(flow)
            flow -= motion
            g = hm[:2]
            strain = optical_strain(flow) if use_strain else None
            f = pool(flow, strain)
            feats.append(f)
            kept_t.append(t)
            kept_n.append(numbers[i])
            head.append(np.array([offset[0] + g[0], offset[1] + g[1], hm[2]]))
            motion = float(np.hypot(f[:, 0], f[:, 1]).sum()) if f.shape[1] >= 2 else 0.0
            if motion > best[0]:
                best = (motion, numbers[i], flow.copy())
            if reanchor > 0 and np.hypot(*g) > reanchor:
                offset += g
                rec["reanchors"] += 1
        if len(feats) < 2:
            raise ClipError("fewer than 2 readable frames on the time grid")

        features = np.stack(feats) * unit
        if "strain" in self.channels:
            features[..., self.channels.index("strain")] /= unit  # strain is unit-free
        apex_size = p["apex_size"]
        out = {
            "features": features.astype(np.float32),
            "times_ms": np.asarray(kept_t, np.float32),
            "frame_numbers": np.asarray(kept_n, np.int64),
            "head": np.asarray(head, np.float32) * np.array([unit, unit, 1.0], np.float32),
            "landmarks": landmarks.astype(np.float32),
            "crop_matrix": m.astype(np.float32),
            "apex_map": self._apex_map(best[2], unit, apex_size),
            "apex_motion_frame": np.int64(best[1]),
        }
        apex_annotated = -1
        if not np.isnan(clip.apex):
            hit = np.nonzero(numbers == clip.apex)[0]
            if len(hit) and (img := read(int(hit[0]))) is not None:
                mi = m.copy()
                mi[:, 2] -= offset
                flow = self._flow(ref, cv2.warpAffine(img, mi, (fsize, fsize), flags=cv2.INTER_AREA))
                flow -= head_motion(flow)[0]
                out["apex_map_annotated"] = self._apex_map(flow, unit, apex_size)
                apex_annotated = int(clip.apex)
        out["apex_annotated_frame"] = np.int64(apex_annotated)
        rec.update({
            "status": status, "reason": reason, "steps": len(feats),
            "duration_ms": float(kept_t[-1]),
            "head_motion": float(np.abs(out["head"][:, :2]).max()),
            "seconds": time.process_time() - t0,
        })
        out.update({k: np.asarray(v) for k, v in rec.items()})
        if debug:
            debug_out.update(ref_crop=cv2.warpAffine(ref_img, m * (size / fsize), (size, size), flags=cv2.INTER_AREA),
                             crop_landmarks=transform_points(m * (size / fsize), landmarks),
                             boxes=layout.boxes * (size / fsize), nose=layout.nose * (size / fsize),
                             peak_flow=best[2], roi_names=[r["name"] for r in self.specs])
            out["_debug"] = debug_out
        return out

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


def _init_worker(cfg: dict) -> None:
    global _WORKER
    cv2.setNumThreads(1)
    _WORKER = Extractor(cfg)


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


def _failed(path: Path) -> bool:
    try:
        return C.read_clip_record(path).get("status") == "failed"
    except UserError:  # corrupt: redo it
        return True


def clips_of(ds: Dataset, splits: list[str], exts) -> list[Clip]:
    return [Clip(r.split, r.sample, r.frames_dir, float(r.fps), float(r.start_frame), float(r.end_frame),
                 float(r.apex), tuple(exts))
            for r in ds.table[ds.table["split"].isin(splits)].itertuples()]


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


def preprocess(ds: Dataset, cfg: dict, splits: list[str], cdir: Path, workers: int = 1,
               force: bool = False, shard: tuple[int, int] = (0, 1)) -> dict[str, pd.DataFrame]:
    """Cache every clip of `splits` (skipping those already cached), then write the manifests."""
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
        if workers > 1:
            ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
                for _ in pool.imap_unordered(_run_one, todo, chunksize=1):
                    bar.update()
        else:
            _init_worker(cfg)
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
                   label=r.label if not pd.isna(r.label) else None,
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


def inspect_clip(ds: Dataset, cfg: dict, sample: str, out: Path) -> Path:
    """A PNG to check a clip by eye: the crop with landmarks and ROIs, the flow at peak motion,
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
        res = Extractor(cfg).process(clip, debug=True)
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
    ax.set_title(f"flow from frame 1 to peak motion (frame {int(res['apex_motion_frame'])}), arrows x{gain:.0f}",
                 fontsize=9)
    ax.axis("off")
    ax = axes[2]
    f, t = res["features"], res["times_ms"]
    mag = np.hypot(f[..., 0], f[..., 1])
    cmap = plt.get_cmap("tab20")
    for r, name in enumerate(d["roi_names"]):
        ax.plot(t, mag[:, r], label=name, color=cmap(r % 20), lw=1.2)
    ax.set_xlabel("time from the first frame (ms)")
    ax.set_ylabel("ROI motion |(u, v)| (% of inner-eye distance)")
    ax.set_title(f"ROI motion after head-motion removal ({len(t)} steps of {cfg['preprocess']['grid_ms']:g} ms, "
                 f"{float(res['fps']):g} fps)", fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(root: str | Path, cfg: dict, splits: list[str] | None = None, workers: int = 1, force: bool = False,
        shard: str | None = None, inspect: str | None = None, inspect_out: str | None = None) -> Path:
    """What `python preprocess.py` does: validate the dataset, then cache (or inspect) its clips."""
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
        inspect_clip(ds, cfg, inspect, out)
        log.info("wrote %s", out)
        return out
    cdir = C.cache_dir(cfg, root)
    try:
        Extractor(cfg).landmarker  # a bad setting or a missing model: one clear error, before any work
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
            "table_rows": {**old.get("table_rows", {}), **table_rows}}
    C.write_meta(cdir, meta)
    log.info("cache: %s", cdir)
    preprocess(ds, cfg, splits, cdir, workers=workers, force=force, shard=parse_shard(shard))
    return cdir


def _cached_splits(cdir: Path) -> set[str]:
    return {p.parent.name for p in cdir.glob("*/manifest.csv")}
