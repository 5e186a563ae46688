"""Benchmarks that print figures (never timed tests): `python -m mer.bench preprocess|train`.

preprocess: CPU per frame read against the floor of decoding those frames; CPU per clip against
a reference pipeline (Farneback on the full 256 px crop for every frame, as public MER code
does), with the accuracy of both feature sets on the same clips; peak memory for a 500-frame clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .cli import run_main, setup_logging
from .config import load_config
from .errors import UserError

log = logging.getLogger("mer.bench")


def _dataset(path: Path | None, clips: int, seed: int, workers: int, width: int = 640, height: int = 480,
             frame_format: str = "png") -> Path:
    """A generated benchmark set (easy preset; reused if it exists)."""
    from .synth import SynthConfig, generate

    name = f"mer_bench_{clips}_{seed}" + ("" if (width, height, frame_format) == (640, 480, "png")
                                          else f"_{width}x{height}_{frame_format}")
    out = path or Path(tempfile.gettempdir()) / name
    if (out / "train.xlsx").is_file():
        log.info("reusing generated set %s", out)
        return out
    subjects = max(6, clips // 5)
    n_test = max(1, subjects // 5)
    cfg = SynthConfig(subjects=subjects, clips_per_subject=max(1, round(clips / subjects)), seed=seed,
                      split_subjects=(subjects - 2 * n_test, n_test, n_test), width=width, height=height,
                      frame_format=frame_format)
    generate(out, cfg, workers=workers, progress=True)
    return out


def _summary_features(features: np.ndarray, channels: list[str]) -> np.ndarray:
    """Per-ROI temporal statistics of (T, R, C) features (u and v found by name), for a linear
    probe of feature quality."""
    u, v = features[..., channels.index("u")], features[..., channels.index("v")]
    mag = np.hypot(u, v)
    peak = mag.argmax(0)
    r = np.arange(mag.shape[1])
    return np.concatenate([mag.max(0), mag.mean(0), u[peak, r], v[peak, r], u.mean(0), v.mean(0),
                           peak / len(mag)])


def probe_uf1(feats: list[np.ndarray], labels: np.ndarray, subjects: np.ndarray, channels: list[str],
              seed: int = 0) -> float:
    """Out-of-fold UF1 of a class-balanced logistic regression on per-ROI statistics
    (subject-independent folds): a cheap, model-free measure of how informative features are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .metrics import scores

    x = np.stack([_summary_features(f, channels) for f in feats])
    n_splits = min(5, len(np.unique(subjects)), np.bincount(labels).max())
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, class_weight="balanced", max_iter=3000))
    pred = cross_val_predict(clf, x, labels, groups=subjects,
                             cv=StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed))
    return scores(labels, pred, n_classes=int(labels.max()) + 1)["uf1"]


REFERENCE_CHANNELS = ("u", "v", "mag")


def reference_features(clip, cfg: dict, extractor) -> np.ndarray:
    """Public-code style: decode EVERY frame, crop at 256 px, Farneback from the first frame,
    same ROIs and pooling."""
    from .data import list_frames
    from .face import crop_matrix, transform_points
    from .features import RoiPooler, global_motion, roi_boxes
    from .flow import make_flow

    p = cfg["preprocess"]
    size = p["crop_size"]
    frames = list_frames(clip.frames_dir)
    first = cv2.imread(str(frames[0]), cv2.IMREAD_GRAYSCALE)
    landmarks = extractor.landmarker(first).landmarks
    m = crop_matrix(landmarks, size, p["crop_scale"], p["crop_center_y"])
    lm = transform_points(m, landmarks)
    layout = roi_boxes(lm, extractor.specs, size, p["roi_size"], p["nose_landmarks"])
    pool = RoiPooler(layout.boxes, size, p["top_frac"], REFERENCE_CHANNELS)
    flow_fn = make_flow("farneback")
    ref = cv2.warpAffine(first, m, (size, size))
    feats = []
    for f in frames[1:]:
        cur = cv2.warpAffine(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), m, (size, size))
        flow = flow_fn(ref, cur)
        flow -= global_motion(flow, layout.nose)
        feats.append(pool(flow))
    unit = 100.0 / float(np.hypot(*(lm[42] - lm[39])))
    return np.stack(feats) * unit


def _floors(ex, clip, res: dict, cfg: dict) -> tuple[float, float]:
    """CPU seconds to decode the frames a clip's preprocessing read, the way it reads them (JPEG
    reduced when the crop shrinks the face 2x or more), and of one flow call per frame read."""
    from .face import Cropper
    from .frames import FolderFrames
    from .flow import flow_from_config

    p = cfg["preprocess"]
    frames = FolderFrames.of(clip.frames_dir)
    first = frames.read(0)
    crop = Cropper(res["crop_matrix"], p["flow_size"], first.shape, blur=p.get("flow_blur", 0.0))
    wanted = set(int(n) for n in res["frame_numbers"])
    t0 = time.process_time()
    imgs = [frames.read(i, crop.factor) for i, n in enumerate(frames.numbers) if int(n) in wanted]
    decode = (time.process_time() - t0) / max(len(imgs), 1) * float(res["frames_read"])
    crops = [crop(img, first.shape) for img in imgs[:: max(1, len(imgs) // 8)]]
    flow = flow_from_config(p)
    t0 = time.process_time()
    for c in crops[1:]:
        flow(crops[0], c)
    per_call = (time.process_time() - t0) / max(len(crops) - 1, 1)
    return decode, per_call * float(res["frames_read"])


def bench_preprocess(args: argparse.Namespace) -> None:
    """CPU per frame read against the floor of decoding those frames and one flow call each, on
    640x480 and 1024x768 frames as PNG and JPEG; CPU per clip and feature quality against a
    reference pipeline; peak memory."""
    from .data import load_dataset, resolve_issues
    from .preprocessing import Extractor, clips_of

    cv2.setNumThreads(1)
    cfg = load_config(args.config, args.set)
    p = cfg["preprocess"]
    flow = (f"farneback ({p['farneback_levels']} levels, {p['farneback_iters']} iterations)" if p["flow"] == "farneback"
            else f"dis ({p['dis_preset']})")
    print(f"preprocess benchmark: flow {flow} at {p['flow_size']} px, grid {p['grid_ms']:g} ms, "
          f"head motion {p['head_motion']}; generated clips (easy preset), {args.limit} per frame kind")
    ex = Extractor(cfg)  # the CPU path: decoding and flow are CPU work on every machine
    ex.landmarker  # model loading is once per worker, not per clip: keep it out of the timings
    probe_root, biggest = None, (0, None)
    for kind in args.frames:
        size, fmt = kind.split(":")
        w, h = (int(v) for v in size.split("x"))
        root = _dataset(args.data if kind == args.frames[0] else None, args.clips if kind == args.frames[0]
                        else args.limit, args.seed, args.workers, w, h, fmt)
        probe_root = probe_root or root
        biggest = max(biggest, (w * h, root), key=lambda b: b[0])
        ds = resolve_issues(load_dataset(root, cfg))
        clips = clips_of(ds, ds.splits, cfg["data"]["image_exts"])[: args.limit]
        cpu = decode = flow = 0.0
        read = 0
        for clip in clips:
            t0 = time.process_time()
            res = ex.process(clip)
            cpu += time.process_time() - t0
            d, f = _floors(ex, clip, res, cfg)
            decode, flow, read = decode + d, flow + f, read + int(res["frames_read"])
        per, dec, fl = (1000 * v / read for v in (cpu, decode, flow))
        line = (f"  {kind:13s} CPU per frame read {per:6.2f} ms; decode {dec:5.2f} ms + one flow call {fl:5.2f} ms "
                f"-> {per / (dec + fl):.2f}x decode+flow (target <= 1.25)")
        if fmt == "png":
            line += f", {per / dec:.2f}x decode (target <= 1.5)"
        print(line + f"; {read / len(clips):.0f} frames read per clip", flush=True)
    if not args.skip_reference:
        _reference_comparison(probe_root, cfg, ex, args)
    print(f"  peak memory of one worker on a 500-frame clip: {_peak_memory(biggest[1], args):.0f} MB (target < 1024 MB)")
    if args.device != "cpu":
        _landmarks_per_second(probe_root, cfg, args.device)


def _landmarks_per_second(root: Path, cfg: dict, device: str) -> None:
    """Frames per second of the FAN landmarker on `device` against dlib on one CPU core."""
    from .face import make_landmarker
    from .frames import FolderFrames

    folder = next(p for p in sorted(root.rglob("*")) if p.is_dir() and any(p.glob("*.png")))
    frames = FolderFrames.of(folder)
    imgs = [frames.read(i) for i in range(min(20, len(frames)))]
    for name, dev in (("dlib", "cpu"), ("fan", device)):
        try:
            lm = make_landmarker(name, cfg["preprocess"]["detect_upsample"], dev, cfg["preprocess"]["detect_width"])
        except UserError as e:
            print(f"  landmarks {name} on {dev}: not measured ({e})")
            continue
        lm(imgs[0])  # warm-up (model load, CUDA kernels)
        t0 = time.time()
        for img in imgs:
            lm(img)
        print(f"  landmarks {name} on {dev}: {len(imgs) / (time.time() - t0):.1f} frames per second "
              f"({imgs[0].shape[1]}x{imgs[0].shape[0]})")


def _reference_comparison(root: Path, cfg: dict, ex, args: argparse.Namespace) -> None:
    """CPU per clip and linear-probe UF1 of our features against the public-code style pipeline."""
    from .data import load_dataset, resolve_issues
    from .preprocessing import clips_of

    ds = resolve_issues(load_dataset(root, cfg))
    clips = clips_of(ds, ds.splits, cfg["data"]["image_exts"])[: args.reference_clips]
    truth = _truth_labels(root, ds)
    ours, theirs, cpu, cpu_ref = [], [], 0.0, 0.0
    for clip in clips:
        t0 = time.process_time()
        ours.append(ex.process(clip)["features"])
        cpu += time.process_time() - t0
        t0 = time.process_time()
        theirs.append(reference_features(clip, cfg, ex))
        cpu_ref += time.process_time() - t0
    labels = np.array([truth[c.sample][0] for c in clips])
    subjects = np.array([truth[c.sample][1] for c in clips])
    print(f"  {len(clips)} clips of {root.name}: CPU per clip {1000 * cpu / len(clips):.0f} ms vs "
          f"{1000 * cpu_ref / len(clips):.0f} ms for the reference (Farneback, 256 px crop, every frame): "
          f"{cpu_ref / cpu:.1f}x less CPU (target >= 6x)")
    print(f"  linear-probe UF1 (subject-independent CV): ours {probe_uf1(ours, labels, subjects, ex.channels):.3f}, "
          f"reference {probe_uf1(theirs, labels, subjects, list(REFERENCE_CHANNELS)):.3f} (target: not lower)")


def _truth_labels(root: Path, ds) -> dict[str, tuple[int, str]]:
    from .synth import default_truth_dir

    truth = {}
    tdir = default_truth_dir(root)
    for split in ds.splits:
        t = pd.read_csv(tdir / f"{split}.csv", dtype={"Filename": str, "Subject": str})
        truth.update({r.Filename: (int(r.EmotionId), r.Subject) for r in t.itertuples()})
    return truth


def _peak_memory(root: Path, args: argparse.Namespace) -> float:
    """Peak RSS of a fresh process preprocessing one 500-frame clip (frames repeated from a real one)."""
    from .data import load_dataset

    src = load_dataset(root, load_config(args.config, args.set)).table.iloc[0]
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "long" / "clip"
        clip_dir.mkdir(parents=True)
        frames = sorted(Path(src["frames_dir"]).iterdir())
        for k in range(500):
            (clip_dir / f"{k + 1:05d}.png").symlink_to(frames[k % len(frames)])
        code = (
            "import resource,sys; sys.path.insert(0, %r)\n"
            "from mer.config import load_config\n"
            "from mer.preprocessing import Extractor, Clip\n"
            "r = Extractor(load_config()).process(Clip('test_B', 'long', %r, 500.0))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        ) % (str(Path(__file__).resolve().parents[1]), str(clip_dir))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1]) / 1024


def _replicate_cache(src: Path, dst: Path, n_clips: int, n_subjects: int) -> Path:
    """A cache of `n_clips` train clips made by repeating a real cache's clips under new names
    (for timing only: a CCAC-sized training set without generating 1,856 clips)."""
    from . import cache as C

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("clips", "*.npz"))
    m = C.read_manifest(src, "train")
    m = m[m["status"] == "ok"].reset_index(drop=True)
    rows = []
    for k in range(n_clips):
        r = m.iloc[k % len(m)].copy()
        r["sample"], r["subject"], r["row"] = f"rep{k:05d}", f"subj{k % n_subjects:03d}", k
        target = dst / "train" / "clips" / f"rep{k:05d}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((src / m.iloc[k % len(m)]["file"]).resolve())
        r["file"] = str(target.relative_to(dst))
        rows.append(r)
    C.write_manifest(dst, "train", pd.DataFrame(rows))
    return dst


def bench_train(args: argparse.Namespace) -> None:
    """Accuracy of the full-sequence model and of the onset-apex baseline on the same folds, then
    the wall time of a full 5-fold x 3-seed run on a CCAC-sized (1,856-clip) training set."""
    import json

    from .preprocessing import run as preprocess_run
    from .training import run_training

    work = Path(args.work or tempfile.mkdtemp(prefix="mer_bench_train_"))
    root = _dataset(args.data, args.clips, args.seed, args.workers)
    base = [f"preprocess.cache_dir={work / 'cache'}", f"train.run_dir={work / 'runs'}"] + args.set
    cfg = load_config(args.config, base)
    cdir = preprocess_run(root, cfg, workers=args.workers)
    figures = {}
    for model in () if args.only_full else ("sequence", "apex_cnn"):
        mcfg = load_config(args.config, base + [f"model.name={model}"])
        t0 = time.time()
        run_dir = run_training(cdir, mcfg, f"bench_{model}", "all", args.seeds, args.device, args.jobs)
        rep = json.loads((run_dir / "report.json").read_text())
        figures[model] = rep
        speed = pd.concat([pd.read_csv(f) for f in run_dir.glob("fold*/seed*/metrics.csv")])["clips_per_s"].median()
        print(f"  {model}: out-of-fold UF1 {rep['ensemble']['uf1']:.4f}  UAR {rep['ensemble']['uar']:.4f}  "
              f"ACC {100 * rep['ensemble']['acc']:.2f}%  over {rep['n_clips']} clips, seeds {rep['seeds']} "
              f"({time.time() - t0:.0f} s; {speed:.0f} training clips/s per job)", flush=True)
    if figures:
        gap = figures["sequence"]["ensemble"]["uf1"] - figures["apex_cnn"]["ensemble"]["uf1"]
        print(f"  full sequence - onset-apex: UF1 {gap:+.4f} (target: sequence >= 0.85 and gap >= 0.10)")
    if args.skip_full:
        return
    big = _replicate_cache(cdir, work / "cache_1856" / "x" / "key", 1856, 176)
    t0 = time.time()
    run_dir = run_training(big, load_config(args.config, base), "bench_full_1856", "all", None, args.device, args.jobs)
    wall = time.time() - t0
    n_models = len(list(run_dir.glob("fold*/seed*/model.pt")))
    speed = pd.concat([pd.read_csv(f) for f in run_dir.glob("fold*/seed*/metrics.csv")])["clips_per_s"].median()
    print(f"  full 5-fold x 3-seed run on 1,856 clips, device {args.device}: {wall / 60:.1f} min wall, "
          f"{n_models / (wall / 60):.2f} models per minute ({speed:.0f} training clips/s per job, jobs={args.jobs}; "
          "target < 15 min; its scores mean nothing: the clips are repeats, for timing only)")


class ListingCounter:
    """Counts os.scandir calls per folder while active (os.walk and list_frames both use it)."""

    def __init__(self):
        import collections
        import os

        self.os, self.counts, self._orig = os, collections.Counter(), os.scandir

    def __enter__(self):
        def counting(path="."):
            self.counts[str(Path(path))] += 1
            return self._orig(path)

        self.os.scandir = counting
        return self

    def __exit__(self, *exc):
        self.os.scandir = self._orig


def make_empty_tree(root: Path, clips: int, frames: int) -> pd.DataFrame:
    """A DFME-layout tree of empty frame files (train_data/<clip>/00001.png ...) and its train table."""
    import os

    names = [f"c{k:06d}" for k in range(clips)]
    for n in names:
        d = root / "train_data" / n
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, frames + 1):
            os.close(os.open(d / f"{i:05d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    table = pd.DataFrame({"Filename": names, "Subject": [f"s{k % 500:03d}" for k in range(clips)],
                          "Emotion": "happiness", "FPS": 200})
    table.to_csv(root / "train.csv", index=False)
    return table


def bench_scan(args: argparse.Namespace) -> None:
    """How often the frame tree is listed when a run reads a dataset and lists each clip's frames
    (as preprocessing does): a generated DFME-layout tree of --files empty frames."""
    from .data import load_dataset
    from .preprocessing import clips_of
    from .frames import FolderFrames

    frames = 500
    clips = max(1, args.files // frames)
    work = Path(args.work or tempfile.mkdtemp(prefix="mer_bench_scan_"))
    root = work / "DFME_scan"
    t0 = time.time()
    if not (root / "train.csv").is_file():
        make_empty_tree(root, clips, frames)
    print(f"scan benchmark: {clips:,} clip folders x {frames} empty frames = {clips * frames:,} files in {root} "
          f"(made in {time.time() - t0:.0f} s)")
    cfg = load_config(args.config, args.set)
    with ListingCounter() as lc:
        t0 = time.time()
        ds = load_dataset(root, cfg)
        t_read = time.time() - t0
        t0 = time.time()
        n = sum(len(FolderFrames.of(c.frames_dir, c.exts, c.start_frame, c.end_frame, c.files))
                for c in clips_of(ds, ["train"], cfg["data"]["image_exts"]))
        t_frames = time.time() - t0
    per_clip = [lc.counts[str(Path(r.frames_dir))] for r in ds.table.itertuples()]
    print(f"  read and validated the dataset in {t_read:.1f} s; every clip's frame list ({n:,} frames) in "
          f"{t_frames:.1f} s more")
    print(f"  folder listings: {sum(lc.counts.values()):,} in all for {clips:,} clip folders; each clip folder "
          f"listed {min(per_clip)} to {max(per_clip)} time(s) (target: once)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _fold_count(text: str) -> int:
    """argparse type for --folds: an integer of 2 or more, refused before anything is generated."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of folds, got '{text}'") from None
    if k < 2:
        raise argparse.ArgumentTypeError(f"needs 2 folds or more, got {k}")
    return k


def add_ablation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ablate")
    g.add_argument("--rows", nargs="+", help="ablate: rows to run, or the groups core (the default: the "
                   "two-hour table) and all (every row); the default row and the rows "
                   "a row combines are always added)")
    g.add_argument("--subjects", type=int, default=40, help="ablate: generated subjects")
    g.add_argument("--folds", type=_fold_count, default=3, help="ablate: subject-independent folds (train.folds; 3 keeps "
                   "the core table near two hours on 2 CPU cores, the calibration tables used 5)")
    g.add_argument("--difficulty", default="dfme", help="ablate: generator preset")
    g.add_argument("--synth-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ablate: change a generator setting, e.g. --synth-set label_noise=0")
    g.add_argument("--extra-synth-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="ablate: change a setting of the extra database (rows with extra training data), "
                        "e.g. --extra-synth-set width=320")
    g.add_argument("--out", help="ablate: table path without suffix (default WORK/ablation)")
    g.add_argument("--bootstrap", type=int, default=2000, help="ablate: bootstrap resamples")


def bench_ablate(args: argparse.Namespace) -> None:
    """The ablation table (mer/ablation.py) on a streamed dfme-difficulty set."""
    import yaml

    from .ablation import Bench, run_ablation, select_rows
    from .cli import cpu_count
    from .synth import SynthConfig

    own_flags = {"subjects": "--subjects", "total_clips": "--clips", "seed": "--seed", "difficulty": "--difficulty",
                 "split_subjects": "--subjects"}

    def overrides(texts: list[str], flag: str, taken: dict) -> dict:
        fields = {f.name for f in dataclasses.fields(SynthConfig)}
        out = {}
        for text in texts:
            key, eq, value = text.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in fields:
                raise UserError(f"{flag} {text}: expected FIELD=VALUE with a generator setting "
                                f"(one of {', '.join(sorted(fields))})")
            if key in taken:
                raise UserError(f"{flag} {text}: {key} has its own option, {taken[key]}")
            out[key] = yaml.safe_load(value)
        return out

    n = args.subjects
    extra_sets = overrides(args.extra_synth_set, "--extra-synth-set", {"difficulty": "(its name: casme3like)"})
    if "subjects" in extra_sets:
        extra_sets.setdefault("split_subjects", (extra_sets["subjects"], 0, 0))
    try:
        rows = select_rows(args.rows)
    except ValueError as e:
        raise UserError(f"--rows: {e}") from None
    if extra_sets and not any(r.extra for r in rows):
        log.warning("--extra-synth-set: no selected row trains with the extra database; ignored")
    try:  # both generated sets checked now, not after the first one has been rendered
        synth = SynthConfig.preset(args.difficulty, subjects=n, split_subjects=(n, 0, 0), total_clips=args.clips,
                                   seed=args.seed, **overrides(args.synth_set, "--synth-set", own_flags))
        Bench(Path("."), synth, [], [], extra_sets).extra_synth
    except (TypeError, ValueError) as e:
        raise UserError(f"ablate: the generator settings are not usable: {e}") from None
    seeds = args.seeds if args.seeds_given else [0, 1, 2]
    work = Path(args.work or Path(tempfile.gettempdir()) / f"mer_ablate_{args.difficulty}_{args.clips}_{args.seed}")
    table = run_ablation(work, synth, rows, seeds, workers=args.workers or cpu_count(), device=args.device,
                         jobs=args.jobs, base_sets=[f"train.folds={args.folds}", *args.set],
                         out=Path(args.out) if args.out else None, n_boot=args.bootstrap, extra_synth_sets=extra_sets)
    print((Path(args.out) if args.out else work / "ablation").with_suffix(".md").read_text())
    del table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mer.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["preprocess", "train", "ablate", "scan"])
    parser.add_argument("--files", type=int, default=1_000_000, help="scan: empty frame files in the generated tree")
    parser.add_argument("--data", type=Path, help="generated dataset to use (default: generate one in /tmp)")
    parser.add_argument("--clips", type=int, help="clips to generate (default 60; ablate: 400)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="generator (ablate: render+preprocess) processes")
    parser.add_argument("--skip-reference", action="store_true", help="preprocess: skip the Farneback reference")
    parser.add_argument("--reference-clips", type=int, help="preprocess: clips of the reference comparison "
                        "(default: every clip of the first set)")
    parser.add_argument("--limit", type=int, default=30, help="preprocess: clips to time per frame kind")
    parser.add_argument("--frames", nargs="+", default=["640x480:png", "640x480:jpg", "1024x768:png", "1024x768:jpg"],
                        help="preprocess: frame kinds WxH:png|jpg (the first one also gets the reference comparison)")
    parser.add_argument("--seeds", type=int, nargs="+", help="train: seeds for the accuracy runs (default 0); "
                        "ablate: seeds per row (default 0 1 2)")
    parser.add_argument("--jobs", default="auto", help="train: parallel training processes")
    parser.add_argument("--skip-full", action="store_true", help="train: skip the 1,856-clip timing run")
    parser.add_argument("--only-full", action="store_true", help="train: only the 1,856-clip timing run")
    parser.add_argument("--work", help="train: folder for caches and runs (default: a new temp folder)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto: where models train (train, "
                        "ablate) and FAN runs (preprocess); a GPU benchmark on a machine without one says so and "
                        "exits 0")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    add_ablation_args(parser)
    args = parser.parse_args(argv)
    args.seeds_given = args.seeds is not None
    args.clips = args.clips or (400 if args.what == "ablate" else 60)
    args.seeds = args.seeds or [0]
    setup_logging()
    from .devices import cuda_count, is_cuda, parse_device

    if is_cuda(args.device) and cuda_count() == 0:
        print(f"--device {args.device}: no CUDA device is visible on this machine, so the GPU benchmark cannot run "
              "here (CPU-only); run it where torch sees a GPU, or use --device cpu")
        return
    try:
        args.device = parse_device(args.device)
    except UserError as e:
        parser.error(str(e))
    {"preprocess": bench_preprocess, "train": bench_train, "ablate": bench_ablate, "scan": bench_scan}[args.what](args)


if __name__ == "__main__":
    run_main(main)
