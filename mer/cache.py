"""The tensor cache: one .npz per clip under a folder keyed by the settings that made it.

Layout: <cache_dir>/<dataset>/<key>/{meta.yaml, <split>/manifest.csv, <split>/clips/<sample>.npz}.
Files are written to a temporary name and renamed, so a killed run never leaves a half file and
a rerun resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import UserError
from .config import stable_hash

log = logging.getLogger("mer.cache")

FEATURE_VERSION = 3  # bump when the preprocessing code changes what it computes (2: anti-aliased crop, IRLS head
                     # fit; 3: IRLS stopping rule, strain at box edges, every apex_frame choice's map)
MANIFEST_COLUMNS = ["split", "row", "sample", "subject", "label", "status", "reason", "fps",
                    "frames_total", "frames_read", "unreadable", "steps", "duration_ms",
                    "landmark_conf", "detect_frame", "faces", "head_motion", "reanchors", "apex_motion_frame",
                    "apex_annotated_frame", "seconds", "file", "dataset", "truncated_from_ms", "aus"]


NOT_IN_KEY = {"cache_dir", "fan_worker_mb"}  # preprocess settings that say where or how fast, not what
# Settings added later: at the value the code used before they existed, they leave the key (and
# older caches) as it was.
ADDED_LATER = {"flow_blur": 0.0, "farneback_levels": 3, "farneback_iters": 3, "match_gain": False}


def feature_settings(cfg: dict) -> dict:
    """The settings that shape every clip's tensors, whatever the dataset (the preprocess section,
    ROIs resolved, and the code's feature version): caches with equal ones can be mixed."""
    from .features import roi_specs

    settings = {k: v for k, v in cfg["preprocess"].items()
                if k not in NOT_IN_KEY and not (k in ADDED_LATER and v == ADDED_LATER[k])
                and not (k.startswith("farneback_") and cfg["preprocess"]["flow"] != "farneback")}
    settings["rois"] = roi_specs(settings["rois"])  # 'default' resolved: its definition counts
    return {"preprocess": settings, "version": FEATURE_VERSION}


def cache_key(cfg: dict) -> str:
    """Hash of every setting that changes the cached tensors or the rows and labels cached (not
    where they are stored)."""
    data = {k: cfg["data"].get(k) for k in ("fps", "protocol", "image_exts", "classes", "label_base",
                                            "missing_offset_ms")}
    return stable_hash({**feature_settings(cfg), "data": data})


def dataset_id(root: str | Path) -> str:
    """The cache folder name of a dataset: its folder (or manifest) name."""
    root = Path(root).resolve()
    return re.sub(r"[^\w.\-]+", "_", root.stem if root.is_file() else root.name) or "dataset"


def cache_dir(cfg: dict, root: str | Path) -> Path:
    return Path(cfg["preprocess"]["cache_dir"]) / dataset_id(root) / cache_key(cfg)


def clip_file(cdir: Path, split: str, sample: str) -> Path:
    safe = re.sub(r"[^\w.\-]+", "_", sample)
    return cdir / split / "clips" / f"{safe}.npz"


def save_clip(path: Path, arrays: dict) -> None:
    """Write one clip atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_clip(path: str | Path, small_only: bool = False) -> dict:
    """All arrays of one cached clip (small_only: only those stored in under 1 KB, i.e. the status
    fields, without reading the tensors); a missing or corrupt file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cache file missing: {path} (run preprocess.py for this dataset and split)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = [k for k in z.files if not small_only or z.zip.getinfo(f"{k}.npy").file_size < 1024]
            return {k: z[k] for k in keys}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"cache file corrupt: {path} ({e}); delete it and rerun preprocess.py") from None


def read_clip_record(path: Path) -> dict:
    """The scalar status fields of a cached clip (for the manifest), read without the tensors."""
    return {k: v.item() for k, v in load_clip(path, small_only=True).items() if v.ndim == 0}


def write_meta(cdir: Path, meta: dict) -> None:
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / f"meta.yaml.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(cdir / "meta.yaml")


def read_meta(cdir: Path) -> dict:
    p = Path(cdir) / "meta.yaml"
    if not p.is_file():
        raise UserError(f"{cdir} is not a preprocessed cache (no meta.yaml); run preprocess.py")
    return yaml.safe_load(p.read_text(encoding="utf-8"))


def read_cache_config(cdir: Path) -> dict:
    """The resolved config that produced a cache (as saved, not re-validated)."""
    path = Path(cdir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{cdir} has no config.yaml: not a cache made by preprocess.py")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_manifest(cdir: Path, split: str, df: pd.DataFrame) -> Path:
    path = cdir / split / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(cdir: Path, split: str) -> pd.DataFrame:
    path = Path(cdir) / split / "manifest.csv"
    if not path.is_file():
        raise UserError(f"no manifest for split '{split}' in {cdir}: run preprocess.py --splits {split}")
    m = pd.read_csv(path, dtype={"sample": str, "subject": str, "dataset": str, "aus": str}, keep_default_na=False,
                    na_values={c: [""] for c in MANIFEST_COLUMNS if c not in ("sample", "subject", "dataset", "aus")})
    if "dataset" not in m:  # a cache made before manifests named each clip's database
        m["dataset"] = ""
    return m


def find_cache(cache_root: str | Path, root: str | Path | None = None, cache: str | Path | None = None,
               cfg: dict | None = None) -> Path:
    """The cache folder a training or prediction run should read.

    --cache DIR wins; otherwise the dataset given by --root, or the only dataset cached. Within a
    dataset the cache matching the current preprocessing settings is preferred, else the newest."""
    if cache is not None:
        read_meta(Path(cache))
        return Path(cache)
    base = Path(cache_root)
    if root is not None:
        datasets = [base / dataset_id(root)]
        if not datasets[0].is_dir():
            raise UserError(f"no cache for {root} under {base}: run `python preprocess.py --root {root}` first")
    else:
        datasets = sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
        if not datasets:
            raise UserError(f"no preprocessed dataset under {base}/: run `python preprocess.py --root DATASET` first")
        if len(datasets) > 1:
            raise UserError(f"several datasets are cached under {base}/ ({', '.join(p.name for p in datasets)}): "
                            "choose one with --root DATASET or --cache DIR")
    keyed = [p for p in datasets[0].glob("*") if (p / "meta.yaml").is_file()]
    if not keyed:
        raise UserError(f"{datasets[0]} holds no finished cache: run preprocess.py")
    if cfg is not None and (datasets[0] / cache_key(cfg)).is_dir():
        return datasets[0] / cache_key(cfg)
    newest = max(keyed, key=lambda p: (p / "meta.yaml").stat().st_mtime)
    if len(keyed) > 1:
        log.warning("%d caches of %s with different settings; using the newest, %s (choose with --cache)",
                    len(keyed), datasets[0].name, newest)
    return newest
