"""Readers of the micro-expression databases as released: CASME II, SAMM, CAS(ME)^3, and the
composite protocol over them (MEGC 2019), beside DFME and manifests (mer/data.py).

Each reader normalises its released table to `mer.data.SCHEMA`, one row per micro-expression:

| database | frames | sample name | fps |
|---|---|---|---|
| CASME II | `sub01/EP02_01f/img46.jpg` (cropped release: `reg_img46.jpg`) | `sub01_EP02_01f` | 200 |
| SAMM | `006/006_1_2/006_05562.jpg` | `006_1_2` | 200 |
| CAS(ME)^3 part A | `spNO.1/e/color/62.jpg` (one long recording, several MEs) | `spNO.1_e_62` (subject, recording, onset) | 30 |

A clip runs from its onset to its offset frame inside the folder. Bad key frames are repaired per
row with one warning line saying what was done, never by dropping the database: an offset of 0
or before the onset ends the clip `data.missing_offset_ms` after the apex (or the onset); an apex
outside onset..offset is ignored (onset and offset kept); a row without an apex is kept.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import UserError
from .data import (
    SPLITS, Dataset, Issue, _assign_labels, _finish, _norm_col, _rows_from_table, _split_pattern, canonical_emotion,
    index_folders, match_columns, read_dfme, read_manifest, read_table, tables_under,
)

log = logging.getLogger("mer.data")

NEGATIVE = ("anger", "contempt", "disgust", "fear", "sadness", "repression")
TO_3CLASS = {**{n: "negative" for n in NEGATIVE}, "happiness": "positive", "surprise": "surprise"}
"""MEGC 2019 composite classes; 'others' has no 3-class label (its rows are not used)."""
TO_4CLASS = {**TO_3CLASS, "others": "others"}
"""CAS(ME)^3's 4-class protocol: negative, positive, surprise, others."""
GROUPINGS = {"3class": TO_3CLASS, "4class": TO_4CLASS}

PROTOCOLS: dict[str, dict[str, list[str] | None]] = {
    "casme2": {"5class": ["disgust", "happiness", "others", "repression", "surprise"],
               "3class": ["negative", "positive", "surprise"], "all": None},
    "samm": {"5class": ["anger", "contempt", "happiness", "others", "surprise"],
             "3class": ["negative", "positive", "surprise"], "all": None},
    "casme3": {"7class": ["anger", "disgust", "fear", "happiness", "others", "sadness", "surprise"],
               "4class": ["negative", "others", "positive", "surprise"],
               "3class": ["negative", "positive", "surprise"], "all": None},
}
"""Class names (id order) of each database's protocols; None: every emotion of the table, sorted."""


def _digits(fmt: str) -> Callable[[str], str]:
    """Subject ids written as numbers ('1', '01', 6) -> the folder name format ('sub01', '006')."""
    return lambda s: fmt.format(int(s)) if str(s).isdigit() else str(s)


@dataclass(frozen=True)
class MEDatabase:
    """What differs between the released ME databases; the reading is shared (`read_me_database`)."""

    kind: str
    title: str
    fps: float
    default_protocol: str
    subject: Callable[[str], str]               # table value -> subject folder name
    sample: Callable[[str, str, float, int], str]  # (subject, clip, onset, row) -> sample name
    layout: str                                 # for messages
    leaf: str = ""                              # frames sit in this sub-folder of the clip's folder
    needs_onset: bool = False                   # clips are MEs inside long recordings
    numbered_subjects: bool = True              # subject folders may also be named by the number alone

    def parents(self, subject: str) -> set[str]:
        """Names the folder holding a clip's folder may have ('sub01', '01', '1')."""
        names = {subject}
        digits = re.sub(r"\D", "", subject)
        if digits and self.numbered_subjects:
            names |= {digits, str(int(digits))}
        return {n.lower() for n in names}


def _casme3_sample(subject: str, clip: str, onset: float, row: int) -> str:
    return f"{subject}_{clip}_{int(onset)}" if not np.isnan(onset) else f"{subject}_{clip}_row{row + 2}"


DATABASES = {
    "casme2": MEDatabase("casme2", "CASME II", 200.0, "5class", _digits("sub{:02d}"),
                         lambda s, c, o, r: f"{s}_{c}", "sub01/EP02_01f/img46.jpg"),
    "samm": MEDatabase("samm", "SAMM", 200.0, "5class", _digits("{:03d}"),
                       lambda s, c, o, r: c, "006/006_1_2/006_05562.jpg"),
    "casme3": MEDatabase("casme3", "CAS(ME)^3", 30.0, "7class", str, _casme3_sample,
                         "spNO.1/e/color/62.jpg", leaf="color", needs_onset=True, numbered_subjects=False),
}


# ----------------------------------------------------------------------------- recognising tables

def table_kind(path: Path) -> str | None:
    """casme2 | samm | casme3 when a table looks like that database's release, else None."""
    try:
        df = read_table(path, nrows=60)
    except UserError:
        return None
    cols = {_norm_col(c) for c in df.columns}
    if "inducementcode" in cols:
        return "samm"
    if "objectiveclass" in cols:
        return "casme3"
    names = next((df[c].dropna().astype(str) for c in df.columns if _norm_col(c) == "filename"), pd.Series([], dtype=str))
    if len(names):
        if names.str.fullmatch(r"EP\d+_\w+").mean() > 0.8:
            return "casme2"
        if names.str.fullmatch(r"\d{3}_\d+_\d+").mean() > 0.8:
            return "samm"
    stem = path.stem.lower()
    for kind, pattern in (("casme3", r"cas\W?me\W*3|casme_?3"), ("casme2", r"casme_?(2|ii)(?![0-9])"), ("samm", r"samm")):
        if re.search(pattern, stem) and {"subject", "filename"} <= cols:
            return kind
    return None


def find_databases(root: Path) -> list[tuple[str, Path, Path]]:
    """(kind, database folder, table) of every ME database table under root (up to 3 levels)."""
    found = []
    for p in tables_under(root):
        kind = table_kind(p)
        if kind:
            rel = p.relative_to(root)
            found.append((kind, root / rel.parts[0] if len(rel.parts) > 1 else root, p))
    return found


def detect_kind(root: Path) -> str:
    """The reader for `root`: manifest (a CSV file), dfme (split tables named train / test_A /
    test_B), one ME database, composite (several), else dfme."""
    if root.is_file():
        return "manifest"
    tables = tables_under(root)
    kinds = {p: table_kind(p) for p in tables}
    if any(k is None and any(_split_pattern(s).search(p.stem) for s in SPLITS) for p, k in kinds.items()):
        return "dfme"
    found = {k for k in kinds.values() if k}
    if len(found) > 1:
        return "composite"
    return found.pop() if found else "dfme"


def database_table(root: Path, db: MEDatabase, configured: str | None) -> Path:
    """The annotation table of a database: data.tables.train, else the one table that looks like it."""
    if configured:
        path = Path(configured)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise UserError(f"data.tables.train = {configured}: file not found under {root}")
        return path
    hits = [p for p in tables_under(root) if table_kind(p) == db.kind]
    if len(hits) != 1:
        raise UserError(f"{db.title}: expected one annotation table under {root}, found {len(hits)}"
                        f"{': ' + ', '.join(map(str, hits)) if hits else ''}; choose it with --set data.tables.train=PATH")
    return hits[0]


# ----------------------------------------------------------------------------- the shared reader

def resolve_protocol(db: MEDatabase, protocol: str | None) -> str:
    protocol = protocol or "auto"
    protocol = db.default_protocol if protocol == "auto" else "3class" if protocol == "composite" else protocol
    if protocol not in PROTOCOLS[db.kind]:
        raise UserError(f"data.protocol={protocol} is not defined for {db.title}: use auto or one of "
                        f"{', '.join(PROTOCOLS[db.kind])}")
    return protocol


def protocol_classes(db: MEDatabase, protocol: str, names: list[str | None]) -> tuple[list[str], list]:
    """The protocol's classes and each row's name under it ('sad' -> 'negative' in 3class)."""
    grouping = GROUPINGS.get(protocol)
    mapped = [grouping.get(n, n) if grouping and n else n for n in names]
    classes = PROTOCOLS[db.kind][protocol]
    if classes is None:
        classes = sorted({n for n in mapped if n})
    return list(classes), mapped


def unique_names(t: pd.DataFrame, issues: list[Issue]) -> pd.DataFrame:
    """Rows of one recording with the same name (same onset) are told apart by their offset; a row
    repeating another's subject, recording, onset and offset is not used (one line says so)."""
    t = t.copy()
    for name, g in t[t.duplicated("sample", keep=False)].groupby("sample", sort=False):
        several = g["offset"].nunique(dropna=False) > 1
        seen: dict[float, int] = {}
        for i, r in g.iterrows():
            key = -1.0 if pd.isna(r["offset"]) else float(r["offset"])
            if key in seen:
                t.at[i, "sample"] = f"{name}_repeat_row{int(r['row']) + 2}"
                issues.append(Issue("skip", r["split"], t.at[i, "sample"], f"repeats table row {seen[key] + 2} (same "
                                    "subject, recording, onset and offset): not used twice"))
                continue
            seen[key] = int(r["row"])
            if several:
                t.at[i, "sample"] = f"{name}-{int(key)}" if key >= 0 else f"{name}_row{int(r['row']) + 2}"
    return t


def fix_key_frames(t: pd.DataFrame, issues: list[Issue], fill_ms: float, needs_onset: bool) -> pd.DataFrame:
    """The clip window (start/end frames) of every row from its onset and offset, repairing bad
    key frames per row with one line that says what was done."""
    t = t.copy()
    for i, r in t.iterrows():
        on, ap, off = r["onset"], r["apex"], r["offset"]
        if np.isnan(on):
            if needs_onset:
                issues.append(Issue("skip", r["split"], r["sample"],
                                    "no onset frame: the micro-expression cannot be located in its recording"))
            else:
                issues.append(Issue("warn", r["split"], r["sample"], "no onset frame: the whole folder is the clip"))
            continue
        notes, end = [], off
        if np.isnan(off) or off <= on:
            base, what = (ap, "apex") if not np.isnan(ap) and ap > on else (on, "onset")
            end = base + max(1, round(fill_ms * r["fps"] / 1000.0))
            told = "missing" if np.isnan(off) else f"{int(off)} is not after onset {int(on)}"
            notes.append(f"offset {told}: clip ends {fill_ms:g} ms after the {what} (frame {int(end)}; "
                         "data.missing_offset_ms)")
            t.at[i, "offset"] = np.nan  # the table's value is wrong; the window end is ours
        if np.isnan(ap):
            notes.append("no apex in the table: kept without one (the max-motion frame stands in)")
        elif not on <= ap <= end:
            notes.append(f"apex {int(ap)} outside onset..offset ({int(on)}..{int(end)}): apex ignored, clip kept")
            t.at[i, "apex"] = np.nan
        t.at[i, "start_frame"], t.at[i, "end_frame"] = on, end
        if notes:
            issues.append(Issue("warn", r["split"], r["sample"], "; ".join(notes)))
    return t


def clip_folders(t: pd.DataFrame, root: Path, db: MEDatabase, issues: list[Issue]) -> list[str]:
    """The frame folder of every row: <root>/<subject>/<clip>[/<leaf>], or found by name anywhere
    below root under a folder named like the subject."""
    index, out = None, []
    for r in t.itertuples():
        parents = db.parents(r.subject)
        hits = [root / r.subject / r.clip] if (root / r.subject / r.clip).is_dir() else []
        if not hits:
            index = index_folders(root) if index is None else index
            hits = [d for d in index.get(r.clip, []) if d.parent.name.lower() in parents]
        if len(hits) == 1:
            d = hits[0] / db.leaf if db.leaf and (hits[0] / db.leaf).is_dir() else hits[0]
            out.append(str(d))
            continue
        why = (f"frame folder not found: expected {r.subject}/{r.clip}{'/' + db.leaf if db.leaf else ''} "
               f"under {root} (layout {db.layout})" if not hits else
               f"several frame folders: {', '.join(map(str, hits))}; point --root at one release")
        issues.append(Issue("missing", r.split, r.sample, why))
        out.append("")
    return out


def read_me_database(db: MEDatabase, root: str | Path, cfg: dict) -> Dataset:
    """One released ME database: its table normalised to SCHEMA, every row a 'train' clip
    (evaluation is by subject-independent folds, e.g. leave-one-subject-out)."""
    root = Path(root)
    dcfg = cfg["data"]
    protocol = resolve_protocol(db, dcfg.get("protocol"))
    path = database_table(root, db, (dcfg.get("tables") or {}).get("train"))
    df = read_table(path)
    cols = match_columns(df, ["sample", "subject", "emotion", "onset", "offset"], str(path))
    t = _rows_from_table(df, cols, "train", db.kind)
    t["clip"] = t["sample"]
    t["subject"] = [db.subject(s) for s in t["subject"]]
    t["sample"] = [db.sample(s, c, o, r) for s, c, o, r in zip(t["subject"], t["clip"], t["onset"], t["row"])]
    t["fps"] = t["fps"].fillna(float(dcfg.get("fps") or db.fps))
    issues: list[Issue] = []
    t = unique_names(t, issues)
    t = fix_key_frames(t, issues, float(dcfg.get("missing_offset_ms", 500.0)), db.needs_onset)
    classes, t["emotion_raw"] = protocol_classes(db, protocol, [canonical_emotion(v) or v for v in t["emotion_raw"]])
    classes = list(dcfg.get("classes") or classes)
    t["label_raw"] = None
    t = _assign_labels(t, classes, issues, protocol)
    t["frames_dir"] = clip_folders(t, root, db, issues)
    return Dataset(f"{db.kind}-{protocol}", root, _finish(t), classes, issues)


def read_composite(root: str | Path, cfg: dict) -> Dataset:
    """The composite 3-class protocol (MEGC 2019): every ME database found in the sub-folders of
    root (CASME II, SAMM, CAS(ME)^3), negative / positive / surprise, samples and subjects
    prefixed by their database so that none collide."""
    root = Path(root)
    dcfg = cfg["data"]
    if dcfg.get("protocol", "auto") not in ("auto", "composite", "3class"):
        raise UserError(f"data.protocol={dcfg['protocol']}: a folder of several databases is read with the "
                        "composite protocol (auto, composite or 3class)")
    parts = find_databases(root)
    if not parts:
        raise UserError(f"no CASME II, SAMM or CAS(ME)^3 table found under {root} (up to 3 levels)")
    kinds = pd.Series([k for k, _, _ in parts])
    if kinds.duplicated().any():
        twice = kinds[kinds.duplicated()].iloc[0]
        raise UserError(f"{root} holds several {DATABASES[twice].title} tables "
                        f"({', '.join(str(p) for k, _, p in parts if k == twice)}): keep one per database")
    if dcfg.get("fps"):
        log.warning("data.fps is ignored by the composite protocol: each database has its own frame rate")
    tables, issues = [], []
    for kind, folder, table in parts:
        sub = copy.deepcopy(cfg)
        sub["data"].update(dataset=kind, protocol="3class", classes=None, fps=None,
                           tables={"train": str(table), "test_A": None, "test_B": None})
        ds = read_me_database(DATABASES[kind], folder, sub)
        t = ds.table.copy()
        t["sample"] = kind + "_" + t["sample"]
        t["subject"] = kind + "_" + t["subject"]
        tables.append(t)
        issues += [Issue(i.level, i.split, f"{kind}_{i.sample}" if i.sample else i.sample, i.message) for i in ds.issues]
        log.info("composite: %s from %s (%d rows)", DATABASES[kind].title, table, len(t))
    classes = list(PROTOCOLS["casme2"]["3class"])
    return Dataset("composite-3class", root, _finish(pd.concat(tables, ignore_index=True)), classes, issues)


READERS: dict[str, Callable[[Path, dict], Dataset]] = {
    "dfme": read_dfme,
    "casme2": lambda root, cfg: read_me_database(DATABASES["casme2"], root, cfg),
    "samm": lambda root, cfg: read_me_database(DATABASES["samm"], root, cfg),
    "casme3": lambda root, cfg: read_me_database(DATABASES["casme3"], root, cfg),
    "composite": read_composite,
    "manifest": read_manifest,
}
