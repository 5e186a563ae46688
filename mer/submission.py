"""The submission: validated, printed as CSV, archived with the upload zip and its provenance.

Format (REFERENCE.md): prediction.txt holds one integer class id per line in the row order of the
split's annotation table, zipped as prediction.zip; the CSV `Filename,EmotionId` is for people.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .data import canonical_emotion, read_table
from .metrics import confusion, format_scores, scores

log = logging.getLogger("mer.submission")


def build(samples: list[str], probs: np.ndarray, classes: list[str], base: int = 0) -> pd.DataFrame:
    """One row per sample: Filename, EmotionId (argmax, counted from `base`: the train table's
    first id, data.label_base) and the class probabilities."""
    df = pd.DataFrame({"Filename": samples, "EmotionId": np.asarray(probs).argmax(1) + base})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = probs[:, k]
    return df


def validate(sub: pd.DataFrame, expected: list[str], n_classes: int, base: int = 0) -> None:
    """Exactly one row per table row, in the table's order, ids in range, no NaN."""
    if len(sub) != len(expected):
        raise UserError(f"submission has {len(sub)} rows for {len(expected)} table rows")
    wrong = [(i, a, b) for i, (a, b) in enumerate(zip(sub["Filename"], expected)) if str(a) != str(b)]
    if wrong:
        i, a, b = wrong[0]
        raise UserError(f"submission row {i + 1} is '{a}' but the table's row {i + 1} is '{b}' ({len(wrong)} rows differ)")
    ids = pd.to_numeric(sub["EmotionId"], errors="coerce")
    if ids.isna().any():
        raise UserError(f"submission has empty or non-numeric EmotionId in row(s) {list(np.nonzero(ids.isna().to_numpy())[0] + 1)}")
    bad = ~ids.between(base, base + n_classes - 1) | (ids != ids.round())
    if bad.any():
        raise UserError(f"submission EmotionId outside {base}..{base + n_classes - 1} in row(s) "
                        f"{list(np.nonzero(bad.to_numpy())[0] + 1)}")


def code_version() -> str:
    from . import __version__

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        if rev.returncode == 0:
            return f"{__version__}+{rev.stdout.strip()}{'-dirty' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def archive(sub: pd.DataFrame, split: str, tag: str, out_dir: str | Path, provenance: dict,
            cfg: dict | None = None) -> Path:
    """Write submission.csv, prediction.txt, prediction.zip (the upload), probabilities.csv,
    provenance.json and the resolved config.yaml under <out_dir>/<split>-<tag>-<time>/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(out_dir) / f"{split}-{tag}-{stamp}"
    k = 1
    while folder.exists():
        folder = Path(out_dir) / f"{split}-{tag}-{stamp}-{k}"
        k += 1
    folder.mkdir(parents=True)
    sub[["Filename", "EmotionId"]].to_csv(folder / "submission.csv", index=False)
    txt = "".join(f"{int(i)}\n" for i in sub["EmotionId"])
    (folder / "prediction.txt").write_text(txt)
    with zipfile.ZipFile(folder / "prediction.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("prediction.txt", txt)
    sub.drop(columns=["EmotionId"]).to_csv(folder / "probabilities.csv", index=False)
    provenance = dict(provenance, split=split, rows=len(sub), code_version=code_version(),
                      created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      predicted_counts=sub["EmotionId"].value_counts().sort_index().to_dict())
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=1, default=str))
    if cfg is not None:
        from .config import save_config

        save_config(cfg, folder / "config.yaml")
    return folder


def to_csv(sub: pd.DataFrame) -> str:
    buf = io.StringIO()
    sub[["Filename", "EmotionId"]].to_csv(buf, index=False)
    return buf.getvalue()


def score_against(sub: pd.DataFrame, truth_path: str | Path, classes: list[str], base: int = 0) -> dict:
    """Score a submission against a truth table (Filename + EmotionId or Emotion); ids in both
    count from `base`."""
    truth = read_table(truth_path)
    cols = {c.lower().replace("_", ""): c for c in truth.columns}
    name_col = cols.get("filename") or cols.get("sample")
    if name_col is None:
        raise UserError(f"{truth_path}: needs a Filename column; found {', '.join(map(str, truth.columns))}")
    if "emotionid" in cols:
        ids = pd.to_numeric(truth[cols["emotionid"]], errors="coerce") - base
    elif "emotion" in cols:
        ids = pd.Series([classes.index(canonical_emotion(v)) if canonical_emotion(v) in classes else np.nan
                         for v in truth[cols["emotion"]]])
    else:
        raise UserError(f"{truth_path}: needs an EmotionId or Emotion column")
    lookup = dict(zip(truth[name_col].astype(str), ids))
    missing = [s for s in sub["Filename"] if s not in lookup or pd.isna(lookup[s])]
    if missing:
        raise UserError(f"{truth_path}: no truth for {len(missing)} submission row(s), e.g. {missing[0]}")
    y = np.array([int(lookup[s]) for s in sub["Filename"]])
    pred = sub["EmotionId"].to_numpy().astype(int) - base
    s = scores(y, pred, len(classes), class_names=classes)
    s["confusion"] = confusion(y, pred, len(classes))
    return s


def describe_scores(s: dict, classes: list[str]) -> str:
    cm = pd.DataFrame(s["confusion"], index=[f"true {c}" for c in classes], columns=classes)
    return f"{format_scores(s)}\n{cm.to_string()}"
