"""Prediction: every fold x seed model of one or more runs, averaged, on a test split's cache."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import cache as C
from .errors import UserError
from .models import build_model
from .report import softmax
from .training import ClipData, Normaliser, load_clips, mirror_inputs, predict_logits

log = logging.getLogger("mer.predict")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    model_name: str
    norm_scale: np.ndarray
    fold: int
    seed: int
    apex_source: str
    classes: list[str]
    config_hash: str
    path: Path
    channels: list[str] | None = None  # feature channels the model reads, by name (None: all cached)
    rois: list[dict] | None = None  # the ROI definitions it was trained on (mirroring needs their twins)
    blink: str = "none"  # blink handling of its inputs (model.blink)
    au_vocab: list[str] | None = None  # AUs of its auxiliary head, if any


def run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run (no run.json): train it with train.py --name {run_dir.name}")
    return json.loads(path.read_text())


def run_cache(run_dir: Path, info: dict | None = None) -> Path:
    """The cache a run was trained on: where run.json says, or at the same place relative to the
    run (a project moved or copied as a whole); an error names both paths when neither exists."""
    info = info or run_info(run_dir)
    absolute = Path(info["cache"])
    if (absolute / "meta.yaml").is_file():
        return absolute
    if info.get("cache_relative"):
        moved = (Path(run_dir) / info["cache_relative"]).resolve()
        if (moved / "meta.yaml").is_file():
            return moved
    raise UserError(f"the cache of run {run_dir} is missing: not at {absolute}"
                    + (f" nor at {Path(run_dir) / info['cache_relative']}" if info.get("cache_relative") else "")
                    + "; rerun preprocess.py with the run's settings (runs/<name>/config.yaml) or move the cache back")


def load_models(run_dir: str | Path, device: str = "cpu") -> list[LoadedModel]:
    """Every fold x seed model of a run; a fold without a finished model is an error naming it."""
    run_dir = Path(run_dir)
    run_info(run_dir)
    folds = pd.read_csv(run_dir / "folds.csv")
    n_folds = int(folds["fold"].max()) + 1
    files = sorted(run_dir.glob("fold*/seed*/model.pt"))
    have = {int(p.parent.parent.name[4:]) for p in files}
    missing = [f for f in range(n_folds) if f not in have]
    if missing:
        raise UserError(f"run {run_dir} has no finished model for fold(s) {', '.join(map(str, missing))}: "
                        f"finish them with `python train.py --fold all --name {run_dir.name}`")
    models = []
    for p in files:
        try:  # always onto the CPU first: a GPU problem must not look like a broken file
            state = torch.load(p, map_location="cpu", weights_only=False)
            model = build_model(state["model_name"], state["n_rois"], state["n_channels"], len(state["classes"]),
                                n_aus=len(state.get("au_vocab") or []), **state["model_settings"])
            model.load_state_dict(state["model"])
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user problem
            raise UserError(f"model file {p} is corrupt or from another version ({type(e).__name__}: {e}); "
                            f"retrain that model: delete {p.parent} and rerun train.py --name {run_dir.name}") from None
        models.append(LoadedModel(to_device(model, device, p), state["model_name"], state["norm_scale"],
                                  state["fold"], state["seed"], state["apex_source"], list(state["classes"]),
                                  state["config_hash"], p, state.get("channels"), state.get("rois"),
                                  state.get("blink", "none"), state.get("au_vocab")))
    return models


def to_device(model: torch.nn.Module, device: str, path: Path | None = None) -> torch.nn.Module:
    """The model on `device`, in eval mode; a device failure (no such GPU, out of memory, a busy
    GPU) is reported as a device problem, never as a broken model."""
    from .devices import describe_device_error

    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError, torch.cuda.OutOfMemoryError) as e:
        told = describe_device_error(e, device) or f"cannot use device {device} ({type(e).__name__}: {e})"
        raise UserError(f"{told}; the model files are fine{f' ({path})' if path else ''}") from None


def split_clips(cdir: Path, split: str, apex_source: str, channels: list[str] | None = None,
                blink: str = "none") -> ClipData:
    """Every row of a split's table, in table order; an error names the rows without a cache entry."""
    if not (cdir / split / "manifest.csv").is_file():
        meta = C.read_meta(cdir)
        if split not in ("train", "test_A", "test_B"):
            raise UserError(f"no split '{split}': splits are train, test_A and test_B "
                            f"(cached here: {', '.join(meta.get('splits', []))})")
        raise UserError(f"split {split} is not in the cache {cdir}: run "
                        f"`python preprocess.py --root {meta.get('root', 'DATASET')} --splits {split}` "
                        "with the same settings")
    clips = load_clips(cdir, split, apex_source, require_all=True, channels=channels, blink=blink)
    if len(clips) == 0:
        raise UserError(f"split {split} has no rows in the cache {cdir}: nothing to predict")
    rows = C.read_meta(cdir).get("table_rows", {}).get(split)
    if rows is not None and rows != len(clips):
        raise UserError(f"the {split} table has {rows} rows but the cache holds {len(clips)}: "
                        f"rerun preprocess.py --splits {split}")
    order = np.argsort(clips.manifest["row"].to_numpy(), kind="stable")
    return clips.subset(order)


def split_cache(run_cache: Path, cache: str | Path | None) -> Path:
    """The run's own cache, or another one (e.g. a test set delivered in its own folder) made
    with the same preprocessing settings."""
    if cache is None:
        return run_cache
    cache = Path(cache)
    C.read_meta(cache)
    if cache.name != run_cache.name:
        raise UserError(f"{cache} was preprocessed with other settings than the run's cache {run_cache} "
                        f"(key {cache.name} vs {run_cache.name}): preprocess it with the same --config/--set")
    return cache


def predict_run(run_dir: str | Path, split: str, device: str = "cpu", cache: str | Path | None = None,
                tta: str | None = None) -> tuple[ClipData, np.ndarray, dict]:
    """Mean class probabilities of all of a run's models on `split`: (clips, probs (N, K), provenance).

    tta: predict.tta (none | mirror)."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    cdir = split_cache(run_cache(run_dir, info), cache)
    models = load_models(run_dir, device)
    clips = split_clips(cdir, split, models[0].apex_source, models[0].channels, models[0].blink)
    tta = tta if tta is not None else "none"
    mirror_with = mirror_inputs({"rois": models[0].rois or info["rois"], "channels": models[0].channels
                                 or info["channels"]})
    probs = np.mean([softmax(predict_logits(m.model, clips, Normaliser(m.norm_scale), device, tta=tta,
                                            mirror_with=mirror_with)) for m in models], 0)
    report = run_dir / "report.json"
    prov = {"run": str(run_dir), "cache": str(cdir), "model": models[0].model_name,
            "models": [str(m.path) for m in models], "config_hashes": sorted({m.config_hash for m in models}),
            "oof": json.loads(report.read_text()).get("ensemble") if report.is_file() else None, "tta": tta,
            "extra_training_data": info.get("extra") or []}
    return clips, probs, prov


def log_fallbacks(clips: ClipData, split: str) -> list[str]:
    """List on stderr the clips whose face was not found (centred-box fallback)."""
    fb = clips.manifest[clips.manifest["status"] == "fallback"]
    for r in fb.itertuples():
        log.warning("fallback clip %s/%s: %s", split, r.sample, r.reason)
    return list(fb["sample"])


def check_split_table(cdir: Path, split: str, clips: ClipData, cfg: dict, root: str | Path | None = None) -> dict:
    """Re-read the split's annotation table and check that the clips to predict are its rows:
    same names, same count, same order. The table is the one the cache was made from, or the
    `split` table found under `root`. Returns the table's fingerprint (for the provenance).

    A table that changed since preprocessing, or a cache made from another dataset, is an error:
    never a silently reordered prediction.txt."""
    from .data import find_tables, table_fingerprint

    meta = C.read_meta(cdir)
    stored = (meta.get("tables") or {}).get(split)
    how = f"python preprocess.py --root {root or meta.get('root', 'DATASET')} --splits {split}"
    if root is not None:
        found = find_tables(Path(root), cfg["data"].get("tables") or {})
        if split not in found:
            raise UserError(f"--root {root}: no {split} table found there (or set data.tables.{split}=PATH)")
        path = found[split]
    elif stored is not None:
        path = Path(stored["file"])
        if not path.is_file():
            raise UserError(f"the {split} table {path} that the cache was made from is gone; pass --root DATASET "
                            "(where the table is now) so that the submission can be checked against it")
    else:
        raise UserError(f"the cache {cdir} has no record of its {split} table (made by an older version): rerun "
                        f"`{how}` (cached clips are reused) so that the submission can be checked against it")
    now = table_fingerprint(path, split)
    from .data import table_samples

    names = table_samples(path, split)
    if names != clips.samples:
        first = next((k for k, (a, b) in enumerate(zip(names, clips.samples)) if a != b), min(len(names), len(clips)))
        where = (f"first difference at row {first + 1}: table '{names[first] if first < len(names) else '-'}', "
                 f"cache '{clips.samples[first] if first < len(clips) else '-'}'")
        raise UserError(f"the {split} table {path} does not match the cache {cdir}: {len(names)} rows in the table, "
                        f"{len(clips)} cached; {where}. The table changed since preprocessing or the cache was made "
                        f"from another dataset: rerun `{how}`")
    if stored is not None and stored.get("file_sha256") != now["file_sha256"]:
        log.info("the %s table %s was re-saved since preprocessing; its rows (names and order) are unchanged",
                 split, path)
    return now

