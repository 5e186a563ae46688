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
from .training import ClipData, Normaliser, load_clips, predict_logits

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


def run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run (no run.json): train it with train.py --name {run_dir.name}")
    return json.loads(path.read_text())


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
        try:
            state = torch.load(p, map_location=device, weights_only=False)
            model = build_model(state["model_name"], state["n_rois"], state["n_channels"], len(state["classes"]),
                                **state["model_settings"])
            model.load_state_dict(state["model"])
        except Exception as e:  # noqa: BLE001 - any broken checkpoint is the same user problem
            raise UserError(f"cannot load model {p}: {e}; retrain it (delete its folder and rerun train.py)") from None
        model.to(device).eval()
        models.append(LoadedModel(model, state["model_name"], state["norm_scale"], state["fold"], state["seed"],
                                  state["apex_source"], list(state["classes"]), state["config_hash"], p,
                                  state.get("channels")))
    return models


def split_clips(cdir: Path, split: str, apex_source: str, channels: list[str] | None = None) -> ClipData:
    """Every row of a split's table, in table order; an error names the rows without a cache entry."""
    if not (cdir / split / "manifest.csv").is_file():
        meta = C.read_meta(cdir)
        if split not in ("train", "test_A", "test_B"):
            raise UserError(f"no split '{split}': splits are train, test_A and test_B "
                            f"(cached here: {', '.join(meta.get('splits', []))})")
        raise UserError(f"split {split} is not in the cache {cdir}: run "
                        f"`python preprocess.py --root {meta.get('root', 'DATASET')} --splits {split}` "
                        "with the same settings")
    clips = load_clips(cdir, split, apex_source, require_all=True, channels=channels)
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


def predict_run(run_dir: str | Path, split: str, device: str = "cpu",
                cache: str | Path | None = None) -> tuple[ClipData, np.ndarray, dict]:
    """Mean class probabilities of all of a run's models on `split`: (clips, probs (N, K), provenance)."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    cdir = split_cache(Path(info["cache"]), cache)
    models = load_models(run_dir, device)
    clips = split_clips(cdir, split, models[0].apex_source, models[0].channels)
    probs = np.mean([softmax(predict_logits(m.model, clips, Normaliser(m.norm_scale), device)) for m in models], 0)
    report = run_dir / "report.json"
    prov = {"run": str(run_dir), "cache": str(cdir), "model": models[0].model_name,
            "models": [str(m.path) for m in models], "config_hashes": sorted({m.config_hash for m in models}),
            "oof": json.loads(report.read_text()).get("ensemble") if report.is_file() else None,
            "extra_training_data": info.get("extra") or []}
    return clips, probs, prov


def log_fallbacks(clips: ClipData, split: str) -> list[str]:
    """List on stderr the clips whose face was not found (centred-box fallback)."""
    fb = clips.manifest[clips.manifest["status"] == "fallback"]
    for r in fb.itertuples():
        log.warning("fallback clip %s/%s: %s", split, r.sample, r.reason)
    return list(fb["sample"])
