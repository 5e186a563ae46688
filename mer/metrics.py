"""Competition metrics (CCAC 2024 / DFME): UF1, UAR, ACC over ALL predictions.

Scores are computed once over the pooled predictions of every fold / test sample, never
averaged per fold (per-fold averaging is a common pitfall in public MER code).

Classes that are absent are handled like scikit-learn's macro scores, whose functions we reuse:

- UF1: macro F1 over the classes present in the truth OR the predictions. A class that is
  only predicted counts with F1 = 0; a class absent from both is left out of the mean.
  Equals ``sklearn.metrics.f1_score(y, p, average="macro")`` with its default labels.
- UAR: mean recall over the classes present in the truth (a class never in the truth has no
  recall). Equals ``sklearn.metrics.balanced_accuracy_score(y, p)``.
- ACC: sum(TP) / sum(N).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)

__all__ = ["scores", "uf1", "confusion", "format_scores"]


def _check(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return both label arrays as 1-D int64 numpy arrays."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    arrays = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if hasattr(y, "detach"):  # torch tensor
            y = y.detach().cpu().numpy()
        a = np.asarray(y)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
        arrays.append(a.astype(np.int64))
    t, p = arrays
    if len(t) != len(p):
        raise ValueError(f"length mismatch: y_true has {len(t)} labels, y_pred has {len(p)}")
    if len(t) == 0:
        raise ValueError("empty input: no labels to score")
    for name, a in (("y_true", t), ("y_pred", p)):
        bad = np.flatnonzero((a < 0) | (a >= n_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {a[i]} is outside [0, {n_classes}) "
                             f"({bad.size} value(s) out of range)")
    return t, p


def uf1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """UF1 alone, as `scores` defines it, without validation or sklearn's overhead: for the
    searches (ensemble weights, class biases) that score thousands of candidates."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)  # 2 TP + FP + FN
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present]))


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """K x K confusion matrix: rows = truth, columns = prediction, all K classes kept."""
    t, p = _check(y_true, y_pred, n_classes)
    return confusion_matrix(t, p, labels=np.arange(n_classes))


def scores(y_true, y_pred, n_classes: int = 7,
           class_names: Sequence[str] | None = None) -> dict:
    """UF1, UAR, ACC over all predictions, plus a per-class table for all K classes.

    Returns ``{"uf1", "uar", "acc", "n", "per_class"}``; ``acc`` is a fraction in [0, 1] and
    ``per_class`` a DataFrame with columns class, support, precision, recall, f1, predicted
    (an ill-defined precision or recall, i.e. 0/0, is reported as 0). Absent classes: see the
    module docstring (UF1 = sklearn macro F1 over classes in truth or predictions;
    UAR = balanced accuracy = mean recall over classes in the truth).
    """
    t, p = _check(y_true, y_pred, n_classes)
    if class_names is None:
        class_names = [str(k) for k in range(n_classes)]
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {n_classes} classes")

    labels = np.arange(n_classes)
    prec, rec, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, average=None, zero_division=0.0
    )
    per_class = pd.DataFrame({
        "class": list(class_names),
        "support": support.astype(np.int64),
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "predicted": np.bincount(p, minlength=n_classes),
    })
    return {
        "uf1": float(f1_score(t, p, average="macro", zero_division=0.0)),
        # recall over the truth's classes == balanced_accuracy_score, without its warning for
        # classes that are predicted but never true
        "uar": float(recall_score(t, p, labels=np.unique(t), average="macro", zero_division=0.0)),
        "acc": float(accuracy_score(t, p)),
        "n": int(len(t)),
        "per_class": per_class,
    }


def format_scores(s: dict) -> str:
    """One log line: ``UF1 0.4123  UAR 0.4210  ACC 48.73%  (n=1234)``."""
    return f"UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  ACC {100 * s['acc']:.2f}%  (n={s['n']})"
