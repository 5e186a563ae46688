"""The report of a training run: scores over ALL out-of-fold predictions (never averaged per
fold), per class, per seed and for the seed ensemble, with a confusion matrix and learning curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .config import stable_hash
from .files import atomic, write_text_atomic
from .metrics import confusion, format_scores, scores

log = logging.getLogger("mer.report")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def read_oof(run_dir: Path) -> pd.DataFrame:
    """Every out-of-fold prediction of a run: one row per (sample, seed)."""
    files = sorted(Path(run_dir).glob("fold*/seed*/oof.csv"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_csv(f, dtype={"sample": str, "subject": str, "dataset": str}) for f in files], ignore_index=True)


def logit_columns(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))


def ensemble_oof(oof: pd.DataFrame) -> pd.DataFrame:
    """Per sample, the mean class probabilities over the run's seeds (as predict.py combines them)."""
    cols = logit_columns(oof)
    probs = pd.DataFrame(softmax(oof[cols].to_numpy()), columns=[f"p_{c.split('_')[1]}" for c in cols])
    keys = [c for c in ("sample", "subject", "dataset", "label", "fold") if c in oof]
    probs[keys] = oof[keys].to_numpy()
    if "dataset" in keys:
        probs["dataset"] = probs["dataset"].fillna("").astype(str)
    return probs.groupby(keys, sort=False).mean().reset_index()


def per_database(ens: pd.DataFrame, pred: np.ndarray, k: int) -> dict[str, dict]:
    """Scores of the seed ensemble on each database's clips (composite protocol), when the run
    holds several."""
    if "dataset" not in ens or ens["dataset"].nunique() < 2:
        return {}
    out = {}
    for name, idx in ens.groupby("dataset", sort=True).indices.items():
        s = scores(ens["label"].to_numpy()[idx].astype(int), pred[idx], k)
        out[str(name)] = {"uf1": float(s["uf1"]), "uar": float(s["uar"]), "acc": float(s["acc"]), "n": int(len(idx))}
    return out


def au_scores(oof: pd.DataFrame, keep_sides: bool = False) -> dict[str, dict]:
    """Per-AU F1 / precision / recall of the auxiliary AU head, out of fold: the mean AU logit over
    seeds > 0 against the table's AU string (parsed as in training: keep_sides =
    train.au_keep_sides), on clips with at least one AU coded."""
    cols = [c for c in oof.columns if c.startswith("au_")]
    if not cols or "aus" not in oof:
        return {}
    from sklearn.metrics import precision_recall_fscore_support

    from .aus import multi_hot, parse_aus

    vocab = [c[3:] for c in cols]
    mean = oof.groupby("sample", sort=False)[cols].mean()  # NaN where the clip's fold had no head for it
    aus = oof.groupby("sample", sort=False)["aus"].first().fillna("").astype(str)
    parsed = [parse_aus(a, keep_sides) for a in aus]
    known = np.array([len(p) > 0 for p in parsed])
    y = multi_hot(parsed, vocab)
    out = {}
    for j, a in enumerate(vocab):
        rows = known & mean[cols[j]].notna().to_numpy()
        if not rows.any():
            continue
        pred = (mean[cols[j]].to_numpy()[rows] > 0).astype(int)
        pr, rc, f1, _ = precision_recall_fscore_support(y[rows, j], pred, average="binary", zero_division=0)
        out[a] = {"f1": float(f1), "precision": float(pr), "recall": float(rc), "support": int(y[rows, j].sum()),
                  "clips": int(rows.sum())}
    return out


def _run_setting(run_dir: Path, section: str, key: str, default):
    import yaml

    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return (cfg.get(section) or {}).get(key, default)


def _results_fingerprint(run_dir: Path) -> str:
    """What a report is made of: every model's out-of-fold file, by name, size and time."""
    files = sorted(run_dir.glob("fold*/seed*/oof.csv"))
    return stable_hash([[str(f.relative_to(run_dir)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def write_report_locked(run_dir: str | Path) -> dict:
    """write_report under an exclusive lock on the run folder, and only when results were saved
    since the last report: processes training folds of one run (--fold k on several GPUs or nodes)
    each take the lock in turn and read every result saved before it, so the complete report is
    written once, by whichever process finishes last."""
    run_dir = Path(run_dir)
    try:
        import fcntl
    except ImportError:  # not POSIX: unlocked (each write is still atomic)
        return write_report(run_dir)
    with open(run_dir / ".report.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            inputs = _results_fingerprint(run_dir)
            try:
                last = json.loads((run_dir / "report.json").read_text())
            except (OSError, ValueError):
                last = {}
            if last.get("inputs") == inputs:
                return last  # another process already reported exactly these results
            return write_report(run_dir, inputs=inputs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_report(run_dir: str | Path, *, inputs: str | None = None) -> dict:
    """Write report.json, report.md, per_class.csv, oof_ensemble.csv, confusion.png and
    learning_curves.png into the run folder; return the summary."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    classes = info["classes"]
    k = len(classes)
    oof = read_oof(run_dir)
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample": str})
    n_folds = int(folds["fold"].max()) + 1
    if oof.empty:
        log.warning("%s: no finished fold yet", run_dir)
        return {}
    seeds = sorted(oof["seed"].unique())
    done = oof.groupby("seed")["fold"].nunique()
    complete = all(done.get(s, 0) == n_folds for s in seeds)
    per_seed = {}
    for s in seeds:
        d = oof[oof["seed"] == s]
        per_seed[int(s)] = scores(d["label"], d[logit_columns(d)].to_numpy().argmax(1), k)
    ens = ensemble_oof(oof)
    pcols = [f"p_{i}" for i in range(k)]
    ens_pred = ens[pcols].to_numpy().argmax(1)
    ens_scores = scores(ens["label"].astype(int), ens_pred, k, class_names=classes)
    with atomic(run_dir / "oof_ensemble.csv") as tmp:
        ens.assign(pred=ens_pred).to_csv(tmp, index=False)
    with atomic(run_dir / "per_class.csv") as tmp:
        ens_scores["per_class"].to_csv(tmp, index=False)
    per_au = au_scores(oof, _run_setting(run_dir, "train", "au_keep_sides", False))
    by_db = per_database(ens, ens_pred, k)
    extra = info.get("extra") or []
    protocol = _run_setting(run_dir, "train", "protocol", "kfold")
    summary = {
        "model": info.get("model"), "complete": complete, "protocol": protocol, "folds": n_folds,
        "seeds": [int(s) for s in seeds],
        "n_clips": int(len(ens)),
        "ensemble": {m: float(ens_scores[m]) for m in ("uf1", "uar", "acc")},
        "per_seed": {s: {m: float(v[m]) for m in ("uf1", "uar", "acc")} for s, v in per_seed.items()},
        "per_database": by_db,
        "per_au": per_au,
        "extra": extra,
        "inputs": inputs,  # fingerprint of the results reported (write_report_locked)
    }
    lines = [f"# Run {run_dir.name}", "",
             f"Model `{info.get('model')}`, "
             + (f"leave-one-subject-out ({n_folds} folds)" if protocol == "loso" else
                f"{n_folds} subject-independent folds") + f", seeds {summary['seeds']}"
             + ("" if complete else " (INCOMPLETE: some folds have not finished)") + ".",
             "Scores over all out-of-fold predictions concatenated (not averaged per fold).", "",
             "| predictions | UF1 | UAR | ACC |", "|---|---|---|---|"]
    for s, v in per_seed.items():
        lines.append(f"| seed {s} | {v['uf1']:.4f} | {v['uar']:.4f} | {100 * v['acc']:.2f}% |")
    lines.append(f"| mean of the {len(seeds)} seeds' probabilities | {ens_scores['uf1']:.4f} | "
                 f"{ens_scores['uar']:.4f} | {100 * ens_scores['acc']:.2f}% |")
    if by_db:
        lines += ["", "Per database (seed ensemble; the row above is over all of them):", "",
                  "| database | clips | UF1 | UAR | ACC |", "|---|---|---|---|---|"]
        lines += [f"| {d} | {v['n']} | {v['uf1']:.4f} | {v['uar']:.4f} | {100 * v['acc']:.2f}% |" for d, v in by_db.items()]
    if per_au:
        lines += ["", "Auxiliary AU head, out of fold (seed ensemble; an AU is predicted when its mean logit > 0; "
                  "clips without a coded AU left out):", "", "| AU | clips with it | F1 | precision | recall |",
                  "|---|---|---|---|---|"]
        lines += [f"| {a} | {v['support']} | {v['f1']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} |"
                  for a, v in per_au.items()]
    lines += ["", "Per class (seed ensemble):", "", ens_scores["per_class"].to_markdown(index=False, floatfmt=".3f")
              if _has_tabulate() else ens_scores["per_class"].to_string(index=False)]
    from .extra import describe

    lines += ["", "Extra training data (declared; on the training side of every fold only, never in the "
              "held-out folds, these scores or ensemble weights):", ""] + [f"- {d}" for d in describe(extra)] \
        if extra else ["", "Extra training data: none."]
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    _plot_confusion(confusion(ens["label"].astype(int), ens_pred, k), classes, run_dir / "confusion.png",
                    f"{run_dir.name}: out-of-fold, seed ensemble\n{format_scores(ens_scores)}")
    _plot_curves(run_dir)
    # last: report.json (with the fingerprint of its inputs) says the whole report was written
    write_text_atomic(run_dir / "report.json", json.dumps(summary, indent=1))
    log.info("%s: out-of-fold %s%s", run_dir, format_scores(ens_scores), "" if complete else " (incomplete run)")
    return summary


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _plot_confusion(cm: np.ndarray, classes: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_curves(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(run_dir.glob("fold*/seed*/metrics.csv"))
    if not files:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for f in files:
        m = pd.read_csv(f)
        label = f"{f.parts[-3]} {f.parts[-2]}"
        axes[0].plot(m["epoch"], m["train_loss"], lw=1, label=label)
        if "heldout_uf1" in m:
            axes[1].plot(m["epoch"], m["heldout_uf1"], lw=1, label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("held-out fold UF1 per epoch (diagnostic, not used for selection)")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic(run_dir / "learning_curves.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
