"""Combining runs: weights chosen on out-of-fold predictions to maximise UF1, optional per-class
logit biases tuned nested over folds (so the gain they report is honest), and the submission."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .metrics import scores, uf1
from .predicting import check_split_table, log_fallbacks, predict_run, run_info
from .report import ensemble_oof, read_oof
from . import submission as S

log = logging.getLogger("mer.ensemble")


def resolve_runs(cfg: dict, names: list[str] | None) -> list[Path]:
    """Run folders from --name, else the only run, else the run named like the model."""
    base = Path(cfg["train"]["run_dir"])
    if names:
        runs = [Path(n) if Path(n).is_dir() and (Path(n) / "run.json").is_file() else base / n for n in names]
        for r in runs:
            run_info(r)
        return runs
    runs = sorted(p.parent for p in base.glob("*/run.json"))
    if len(runs) == 1:
        return runs
    named = base / cfg["model"]["name"]
    if (named / "run.json").is_file():
        return [named]
    if not runs:
        raise UserError(f"no training run under {base}/: run train.py first")
    raise UserError(f"several runs under {base}/ ({', '.join(r.name for r in runs)}): choose with --name")


# ----------------------------------------------------------------------------- out-of-fold search

def oof_table(runs: list[Path]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Aligned out-of-fold probabilities of several runs (seed-averaged), on the same folds."""
    tables = []
    for r in runs:
        oof = read_oof(r)
        if oof.empty:
            raise UserError(f"run {r} has no out-of-fold predictions: train it first")
        tables.append(ensemble_oof(oof).set_index("sample"))
    base = tables[0]
    for r, t in zip(runs[1:], tables[1:]):
        if set(t.index) != set(base.index) or not (t.loc[base.index, "fold"] == base["fold"]).all():
            raise UserError(f"runs {runs[0].name} and {r.name} were not trained on the same clips and folds: "
                            "their out-of-fold predictions cannot be combined")
    k = len([c for c in base.columns if c.startswith("p_")])
    probs = [t.loc[base.index, [f"p_{i}" for i in range(k)]].to_numpy(float) for t in tables]
    info = base[["subject", "label", "fold"]].reset_index()
    return info, probs


def combine(probs: list[np.ndarray], weights: np.ndarray, biases: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of probabilities, in log space with per-class biases added (argmax-ready)."""
    p = sum(w * q for w, q in zip(weights, probs))
    logp = np.log(np.clip(p, 1e-9, None))
    return logp + (biases if biases is not None else 0.0)


def _uf1(y: np.ndarray, logp: np.ndarray) -> float:
    return uf1(y, logp.argmax(1), logp.shape[1])


def search_weights(probs: list[np.ndarray], y: np.ndarray, step: float = 0.1) -> tuple[np.ndarray, float]:
    """Weights on a simplex grid maximising out-of-fold UF1 (ties: the most even weights)."""
    n = len(probs)
    if n == 1:
        return np.ones(1), _uf1(y, combine(probs, np.ones(1)))
    ticks = int(round(1 / step))
    best = (-1.0, None)
    for c in itertools.product(range(ticks + 1), repeat=n - 1):
        if sum(c) > ticks:
            continue
        w = np.array(list(c) + [ticks - sum(c)], float) / ticks
        u = _uf1(y, combine(probs, w))
        evenness = -np.abs(w - 1 / n).sum()
        if (u, evenness) > (best[0], best[2] if best[1] is not None else -np.inf):
            best = (u, w, evenness)
    return best[1], best[0]


def tune_biases(logp: np.ndarray, y: np.ndarray, grid: np.ndarray, passes: int) -> np.ndarray:
    """Per-class additive biases by coordinate ascent on UF1. Starts at zero and accepts only
    strict improvements, so the tuned score is never below the untuned one."""
    k = logp.shape[1]
    b = np.zeros(k)
    best = _uf1(y, logp)
    for _ in range(passes):
        improved = False
        for c in range(k):
            for v in grid:
                trial = b.copy()
                trial[c] = v
                u = _uf1(y, logp + trial)
                if u > best + 1e-12:
                    best, b, improved = u, trial, True
        if not improved:
            break
    return b


def nested_bias_predictions(logp: np.ndarray, y: np.ndarray, folds: np.ndarray, grid: np.ndarray,
                            passes: int) -> np.ndarray:
    """Predicted classes with per-class biases, each fold's biases tuned on the OTHER folds only."""
    pred = logp.argmax(1).copy()
    for f in np.unique(folds):
        inner = folds != f
        b = tune_biases(logp[inner], y[inner], grid, passes)
        pred[~inner] = (logp[~inner] + b).argmax(1)
    return pred


def nested_bias_gain(logp: np.ndarray, y: np.ndarray, folds: np.ndarray, grid: np.ndarray,
                     passes: int) -> tuple[float, float]:
    """Out-of-fold UF1 without and with biases, the biases for each fold tuned on the OTHER folds."""
    pred = nested_bias_predictions(logp, y, folds, grid, passes)
    return _uf1(y, logp), scores(y, pred, logp.shape[1])["uf1"]


def fit_ensemble(runs: list[Path], cfg: dict, oof: tuple[pd.DataFrame, list[np.ndarray]] | None = None) -> dict:
    """Weights and biases for `runs` from their out-of-fold predictions (`oof_table(runs)`, read
    here unless given), with honest figures."""
    ecfg = cfg["ensemble"]
    info, probs = oof if oof is not None else oof_table(runs)
    y = info["label"].to_numpy().astype(int)
    folds = info["fold"].to_numpy().astype(int)
    if ecfg["weights"] == "search":
        weights, uf1_w = search_weights(probs, y)
    elif ecfg["weights"] == "equal":
        weights = np.full(len(runs), 1 / len(runs))
        uf1_w = _uf1(y, combine(probs, weights))
    else:
        raise UserError(f"ensemble.weights must be search or equal, got '{ecfg['weights']}'")
    logp = combine(probs, weights)
    result = {"runs": [str(r) for r in runs], "weights": weights.tolist(), "oof_uf1_weighted": uf1_w,
              "biases": [0.0] * logp.shape[1], "n_oof": int(len(y))}
    if ecfg["bias"] == "nested":
        lo, hi, n = ecfg["bias_grid"]
        grid = np.linspace(float(lo), float(hi), int(n))
        before, after = nested_bias_gain(logp, y, folds, grid, int(ecfg["bias_steps"]))
        result.update(oof_uf1_no_bias=before, oof_uf1_nested_bias=after, bias_gain_nested=after - before)
        if after > before:
            result["biases"] = tune_biases(logp, y, grid, int(ecfg["bias_steps"])).tolist()
            result["bias_used"] = True
        else:
            result["bias_used"] = False
            log.info("nested bias search did not improve out-of-fold UF1 (%.4f -> %.4f): biases not used",
                     before, after)
    elif ecfg["bias"] != "none":
        raise UserError(f"ensemble.bias must be nested or none, got '{ecfg['bias']}'")
    final = combine(probs, weights, np.array(result["biases"]))
    result["oof"] = {m: float(v) for m, v in scores(y, final.argmax(1), final.shape[1]).items()
                     if m in ("uf1", "uar", "acc")}
    return result


def oof_biases(runs: list[Path], cfg: dict) -> dict | None:
    """predict.bias: per-class logit biases for the runs averaged with equal weights, tuned on their
    out-of-fold predictions and used only if the same search, nested over the folds, gains (the
    ablation row bias_nested). None when off, not gaining, or without out-of-fold predictions."""
    mode = cfg.get("predict", {}).get("bias", "none")
    if mode == "none":
        return None
    if mode != "nested":
        raise UserError(f"predict.bias must be nested or none, got '{mode}'")
    try:
        oof = oof_table(runs)
    except UserError as e:
        log.warning("predict.bias=nested: %s; predicting without per-class biases", e)
        return None
    if oof[0]["fold"].nunique() < 2:
        log.warning("predict.bias=nested needs out-of-fold predictions of 2 or more folds (train.py --fold all); "
                    "predicting without per-class biases")
        return None
    ens = fit_ensemble(runs, {**cfg, "ensemble": {**cfg["ensemble"], "weights": "equal", "bias": "nested"}}, oof)
    log.info("per-class biases (predict.bias=nested): out-of-fold UF1 %.4f -> %.4f with biases tuned on the other "
             "folds: %s", ens["oof_uf1_no_bias"], ens["oof_uf1_nested_bias"],
             "used" if ens["bias_used"] else "not used")
    return ens if ens["bias_used"] else None


# ----------------------------------------------------------------------------- submission

def predict_and_submit(cfg: dict, names: list[str] | None, split: str, device: str, *, truth: str | None = None,
                       archive_files: bool = True, ensemble: dict | None = None,
                       cache: str | None = None, root: str | None = None) -> pd.DataFrame:
    """Predict `split` with the runs, check the rows against the split's table (re-read now: the
    cache's own, or the one under `root`), validate, print the CSV on stdout and archive the files."""
    runs = resolve_runs(cfg, names)
    tta = cfg.get("predict", {}).get("tta", "none")
    tag = ("ens-" if ensemble else "") + ("+".join(r.name for r in runs) if len(runs) <= 3 else f"{len(runs)}runs")
    if ensemble is None:
        ensemble = oof_biases(runs, cfg)
    results = [predict_run(r, split, device, cache, tta) for r in runs]
    clips = results[0][0]
    table = check_split_table(Path(results[0][2]["cache"]), split, clips, cfg, root)
    for r, (c, _, _) in zip(runs[1:], results[1:]):
        if c.samples != clips.samples:
            raise UserError(f"run {r.name} was preprocessed from a different {split} table than {runs[0].name}")
    info = run_info(runs[0])
    classes, base = info["classes"], int(info.get("label_base", 0))
    rows = clips.manifest["row"].to_numpy()
    if not np.array_equal(rows, np.arange(len(rows))):
        raise UserError(f"the {split} cache does not hold every table row in order; rerun preprocess.py --splits {split}")
    weights = np.array(ensemble["weights"]) if ensemble else np.full(len(runs), 1 / len(runs))
    biases = np.array(ensemble["biases"]) if ensemble else None
    logp = combine([p for _, p, _ in results], weights, biases)
    probs = np.exp(logp - logp.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    sub = S.build(clips.samples, probs, classes, base)
    S.validate(sub, clips.samples, len(classes), base)
    fallbacks = log_fallbacks(clips, split)
    prov = {"runs": [p for _, _, p in results], "weights": weights.tolist(),
            "biases": None if biases is None else biases.tolist(), "ensemble": ensemble, "classes": classes,
            "cache_status": clips.manifest["status"].value_counts().to_dict(), "fallback_clips": fallbacks,
            "label_base": base, "extra_training_data": declared_extra(results), "table": table, "tta": tta}
    scored = S.score_against(sub, truth, classes, base) if truth else None
    if scored:
        log.info("scored against %s:\n%s", truth, S.describe_scores(scored, classes))
        prov["scores"] = {m: scored[m] for m in ("uf1", "uar", "acc", "n")}
    if archive_files:
        folder = S.archive(sub, split, tag, cfg["submission"]["out_dir"], prov, cfg)
        log.info("submission archived in %s (upload %s)", folder, folder / "prediction.zip")
    sys.stdout.write(S.to_csv(sub))  # last: an error above leaves stdout empty
    sys.stdout.flush()
    return sub


def declared_extra(results: list[tuple]) -> list[dict]:
    """The extra training data of every run combined, once each (what CCAC asked to declare)."""
    seen = {}
    for _, _, prov in results:
        for r in prov.get("extra_training_data") or []:
            seen.setdefault(r["cache"], {k: r.get(k) for k in ("dataset", "root", "source", "clips", "per_class", "cache")})
    return list(seen.values())


def run_ensemble(cfg: dict, names: list[str], split: str, device: str, *, truth: str | None = None,
                 archive_files: bool = True, cache: str | None = None, root: str | None = None) -> pd.DataFrame:
    runs = resolve_runs(cfg, names)
    ens = fit_ensemble(runs, cfg)
    msg = f"ensemble of {len(runs)} run(s): weights {np.round(ens['weights'], 2).tolist()}"
    if "bias_gain_nested" in ens:
        msg += (f"; nested bias search: out-of-fold UF1 {ens['oof_uf1_no_bias']:.4f} -> "
                f"{ens['oof_uf1_nested_bias']:.4f} (gain {ens['bias_gain_nested']:+.4f}, "
                f"{'used' if ens['bias_used'] else 'not used'})")
    log.info("%s; out-of-fold UF1 %.4f UAR %.4f ACC %.2f%% (in-sample: weights and biases were tuned "
             "on these predictions)", msg, ens["oof"]["uf1"], ens["oof"]["uar"],
             100 * ens["oof"]["acc"])
    return predict_and_submit(cfg, [str(r) for r in runs], split, device, truth=truth, archive_files=archive_files,
                              ensemble=ens, cache=cache, root=root)

