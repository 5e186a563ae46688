"""Dataset readers: one per database, each normalising its annotation table to a common schema.

Every reader returns a `Dataset` whose `table` has one row per clip with the columns of `SCHEMA`.
Unknown fields stay empty (NaN / ""), never invented. `load_dataset()` then checks the table
against the frames on disk and says, one line per problem, what is wrong and with which sample.
This module holds the shared machinery, the DFME and manifest readers and the validation; the
released ME databases (CASME II, SAMM, CAS(ME)^3, composite) are read in `mer.databases`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .errors import UserError

log = logging.getLogger("mer.data")

SCHEMA = [
    "dataset", "split", "sample", "subject", "frames_dir", "fps", "onset", "apex", "offset",
    "emotion", "label", "aus", "start_frame", "end_frame", "row",
]
"""Common columns. onset/apex/offset/start_frame/end_frame are frame NUMBERS as in the file
names (not positions); start/end delimit the clip inside its folder (empty = whole folder);
`row` is the row's position in its split's annotation table (the submission order)."""

SPLITS = ("train", "test_A", "test_B")
TEST_SPLITS = ("test_A", "test_B")

DFME_CLASSES = ["anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise"]

EMOTION_ALIASES = {
    "anger": ["anger", "angry", "ang", "愤怒", "生气"],
    "contempt": ["contempt", "contemptuous", "con", "鄙视", "轻蔑"],
    "disgust": ["disgust", "disgusted", "dis", "厌恶"],
    "fear": ["fear", "fearful", "afraid", "fea", "恐惧", "害怕"],
    "happiness": ["happiness", "happy", "hap", "joy", "高兴", "快乐", "开心"],
    "sadness": ["sadness", "sad", "sadnes", "伤心", "悲伤", "难过"],
    "surprise": ["surprise", "surprised", "sur", "惊讶"],
    "repression": ["repression", "repressed", "rep", "压抑"],
    "others": ["others", "other", "其他"],
    "negative": ["negative", "neg"],
    "positive": ["positive", "pos"],
}
_EMOTION_LOOKUP = {alias: name for name, aliases in EMOTION_ALIASES.items() for alias in aliases}

COLUMN_ALIASES = {
    "sample": ["filename", "file", "sample", "samplename", "sampleid", "clip", "clipname", "video",
               "videoname", "name", "文件名"],
    "subject": ["subject", "subjectid", "sub", "participant", "person", "被试"],
    "emotion": ["emotion", "emotionlabel", "estimatedemotion", "emotionname", "expression",
                "category", "情绪", "表情"],
    "label": ["emotionid", "emotionlabelid", "labelid", "label", "classid", "class", "emotionclass"],
    "onset": ["onset", "onsetframe", "onsetf"],
    "apex": ["apex", "apexframe", "apexf"],
    "offset": ["offset", "offsetframe", "offsetf"],
    "fps": ["fps", "framerate", "framespersecond", "rate", "帧率"],
    "aus": ["actionunits", "actionunit", "au", "aus", "aulabel"],  # the coded string before a parsed copy
    "frames": ["frames", "framesdir", "frames_path", "path", "framespath", "folder", "dir"],
    "split": ["split", "set", "subset"],
}


def _norm_col(name: object) -> str:
    return re.sub(r"[\s_\-()（）]+", "", str(name)).lower()


_KNOWN_COLUMNS = {a for aliases in COLUMN_ALIASES.values() for a in aliases}


def canonical_emotion(value: object) -> str | None:
    """'Happy', 'HAPPINESS', '高兴' -> 'happiness'; None if unrecognised or empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return _EMOTION_LOOKUP.get(str(value).strip().lower())


@dataclass
class Issue:
    """One problem found in a table or on disk. fatal: stop before any work; skip: drop the row;
    warn: keep the row, note the problem."""

    level: str
    split: str
    sample: str
    message: str

    def __str__(self) -> str:
        where = f"{self.split}/{self.sample}" if self.sample else self.split
        return f"[{self.level}] {where}: {self.message}"


@dataclass
class Dataset:
    """A normalised dataset: the table (SCHEMA columns), its class names in id order, and the
    problems found while reading it."""

    name: str
    root: Path
    table: pd.DataFrame
    classes: list[str]
    issues: list[Issue] = field(default_factory=list)
    label_base: int = 0  # the id of the first class in the train table (and in submissions)
    listing: dict[str, list[str]] = field(default_factory=dict, repr=False)  # folder -> file names, if walked
    sources: dict[str, Path] = field(default_factory=dict)  # split -> the table file its rows came from

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.table["split"]))


# --------------------------------------------------------------------------- frames on disk

_DIGITS = re.compile(r"\d+")
FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp")  # frame files where no data.image_exts is passed


def frame_number(path: str | Path) -> int | None:
    """The frame number in a file name: '00012.png' -> 12, 'img_12.jpg' -> 12, 'reg_img7' -> 7."""
    nums = _DIGITS.findall(os.path.splitext(os.path.basename(path))[0])
    return int(nums[-1]) if nums else None


def list_frames(folder: str | Path, exts: Iterable[str] = FRAME_EXTS,
                names: Iterable[str] | None = None) -> list[Path]:
    """Image files of a folder sorted by their frame number (not lexically: 2 < 10).

    names: the folder's file names when they are already known (from the walk that indexed the
    tree), so that a folder is never listed twice."""
    folder = Path(folder)
    return [folder / n for _, n in numbered_frames(folder, exts, names)]


def numbered_frames(folder: str | Path, exts: Iterable[str] = FRAME_EXTS,
                    names: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """(frame number, file name) of a folder's image files, sorted by number (list_frames' order);
    each name parsed once: a clip folder holds hundreds of files. One file per number: where
    several carry it (00012.png beside 00012.jpg, a folder converted in place), the first of
    `exts`, then by name (check_frames warns about the others)."""
    return _frame_files(folder, exts, names)[0]


def _frame_files(folder: str | Path, exts: Iterable[str], names: Iterable[str] | None) -> tuple[list, list[str]]:
    """numbered_frames, and the names left out because another file carries their number."""
    rank = {e: k for k, e in enumerate(dict.fromkeys(e.lower() for e in exts))}  # the order of preference
    if names is None and _LISTED is not None:  # inside load_dataset: listed once, whoever asks first
        names = _list_dir(str(folder))[1]
    if names is None:
        names = [e.name for e in os.scandir(folder) if e.is_file()]
    numbered = []
    for n in names:
        if (k := rank.get(os.path.splitext(n)[1].lower())) is not None and (number := frame_number(n)) is not None:
            numbered.append((number, k, n))
    numbered.sort()
    kept, left_out = [], []
    for number, _, n in numbered:
        if kept and kept[-1][0] == number:
            left_out.append(n)
        else:
            kept.append((number, n))
    return kept, left_out


_LISTED: dict | None = None  # while load_dataset runs: folder -> (sub-folders, files), each listed once


def _list_dir(path: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of a folder (symbolic links followed), listed once per
    load_dataset call however many walks pass by."""
    if _LISTED is not None and path in _LISTED:
        return _LISTED[path]
    dirs, files = [], []
    with os.scandir(path) as entries:
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.name)
            except OSError:  # a dangling link: not a folder
                files.append(e.name)
    if _LISTED is not None:
        _LISTED[path] = (dirs, files)
    return dirs, files


def walk(root: Path, max_depth: int | None = None) -> Iterable[tuple[str, list[str], list[str]]]:
    """Top-down walk like os.walk (prune by editing the yielded folder list) that follows
    symbolic links (a composite root may link its databases) without looping, skips hidden
    folders, stops `max_depth` folder levels below root, and shares folder listings between
    the walks of one load_dataset call."""
    seen, stack = set(), [str(Path(root))]
    while stack:
        dirpath = stack.pop()
        real = os.path.realpath(dirpath)
        if real in seen:
            continue
        seen.add(real)
        try:
            dirnames, filenames = _list_dir(dirpath)
        except OSError:
            continue
        depth = len(Path(dirpath).relative_to(root).parts)
        keep = max_depth is None or depth + 1 < max_depth
        dirnames = sorted(d for d in dirnames if not d.startswith(".")) if keep else []
        yield dirpath, dirnames, filenames
        stack.extend(os.path.join(dirpath, d) for d in reversed(dirnames))


def index_folders(root: Path, listing: dict[str, list[str]] | None = None) -> dict[str, list[Path]]:
    """Map every folder name under `root` to the folders of that name (samples may be nested).

    listing: filled with each folder's file names on the way (the same walk), for check_frames."""
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in walk(root):
        if listing is not None and filenames:
            listing[str(Path(dirpath))] = list(filenames)
        for d in dirnames:
            index.setdefault(d, []).append(Path(dirpath) / d)
    return index


def _find_folder(sample: str, split: str, index: dict[str, list[Path]]) -> tuple[Path | None, str]:
    """The frame folder of a sample, preferring one under a folder named like its split."""
    cands = index.get(sample)
    if not cands and sample.isdigit():  # Excel may have dropped leading zeros from a numeric name
        cands = [p for k, ps in index.items() if k.isdigit() and int(k) == int(sample) for p in ps]
    if not cands:
        return None, f"frame folder not found (no folder named '{sample}' under the root)"
    if len(cands) == 1:
        return cands[0], ""
    hint = _split_pattern(split)
    preferred = [p for p in cands if any(hint.search(part) for part in p.parts)]
    if len(preferred) == 1:
        return preferred[0], ""
    return None, "several folders have this name: " + ", ".join(str(p) for p in cands)


# --------------------------------------------------------------------------- tables

def _split_pattern(split: str) -> re.Pattern:
    if split == "train":
        return re.compile(r"train", re.I)
    letter = split[-1]
    return re.compile(rf"(test|leaderboard|eval)[\W_]*(data[\W_]*|set[\W_]*)?{letter}(?![a-z])", re.I)


def read_table(path: str | Path, nrows: int | None = None) -> pd.DataFrame:
    """An annotation table (.xlsx/.xls/.csv/.tsv) as a DataFrame; names in CSVs stay text.

    A block of title rows above the column names (SAMM's release) is skipped: the header is the
    first row, or else the first of the top 40 rows naming at least two known columns."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            df = pd.read_excel(path, nrows=nrows)
        elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            df = pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                             na_values=[""], nrows=nrows)  # names stay text: '0001' keeps its zeros
        else:
            raise UserError(f"{path}: unsupported table format (use .xlsx or .csv)")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is the same user problem
        raise UserError(f"cannot read annotation table {path}: {e}") from None
    df = _below_header_block(df, path)
    df = df.dropna(how="all")
    df = df.loc[:, [not str(c).startswith("Unnamed") for c in df.columns]]
    return df


def _below_header_block(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    if any(_norm_col(c) in _KNOWN_COLUMNS for c in df.columns):
        return df
    for i in range(min(len(df), 40)):
        cells = list(df.iloc[i])
        if sum(_norm_col(c) in _KNOWN_COLUMNS for c in cells if not pd.isna(c)) >= 2:
            names = [f"Unnamed: {k}" if pd.isna(c) else str(c).strip() for k, c in enumerate(cells)]
            log.debug("%s: column names on row %d (the rows above are a header block)", path, i + 2)
            out = df.iloc[i + 1:].copy()
            out.columns = names
            return out.reset_index(drop=True)
    return df


_TABLES_SEEN: dict | None = None  # while load_dataset runs: root -> tables found (one walk per root)


def tables_under(root: Path, max_depth: int = 3) -> list[Path]:
    """Table files (.xlsx/.xls/.csv) at most `max_depth` levels below root. Frame folders are not
    listed: the walk stops at that depth and does not enter a folder's sub-folders when it holds
    more than 300 (a folder of samples, e.g. DFME's train_data). Within one load_dataset call a
    root is walked once (recognising the database and finding its tables share the walk)."""
    key = (str(Path(root).resolve()), max_depth)
    if _TABLES_SEEN is not None and key in _TABLES_SEEN:
        return list(_TABLES_SEEN[key])
    found = _walk_tables(root, max_depth)
    if _TABLES_SEEN is not None:
        _TABLES_SEEN[key] = found
    return list(found)


def _walk_tables(root: Path, max_depth: int) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in walk(root, max_depth):
        if len(dirnames) > 300:
            dirnames[:] = []
        found += [Path(dirpath) / f for f in filenames
                  if Path(f).suffix.lower() in (".xlsx", ".xls", ".csv") and not f.startswith(("~$", "."))]
    return sorted(found)


def match_columns(df: pd.DataFrame, required: Iterable[str], where: str) -> dict[str, str]:
    """Map schema fields to the table's columns by alias, case- and punctuation-insensitively."""
    normed = {_norm_col(c): c for c in df.columns}
    found: dict[str, str] = {}
    for fieldname, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in normed and normed[alias] not in found.values():
                found[fieldname] = normed[alias]
                break
    missing = [r for r in required if r not in found]
    if missing:
        raise UserError(
            f"{where}: no column for {', '.join(missing)} "
            f"(accepted names: {'; '.join(f'{m}: ' + '/'.join(COLUMN_ALIASES[m][:6]) for m in missing)}); "
            f"columns found: {', '.join(map(str, df.columns))}"
        )
    return found


def _sample_name(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _to_int(value: object) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return np.nan
    return v if np.isfinite(v) else np.nan


def find_tables(root: Path, configured: dict) -> dict[str, Path]:
    """The annotation table of each split: from the config, else found by file name under root."""
    tables: dict[str, Path] = {}
    candidates = tables_under(root)
    for split in SPLITS:
        if configured.get(split):
            p = Path(configured[split])
            p = p if p.is_absolute() else root / p
            if not p.is_file():
                raise UserError(f"data.tables.{split} = {configured[split]}: file not found under {root}")
            tables[split] = p
            continue
        pat = _split_pattern(split)
        hits = [p for p in candidates if pat.search(p.stem)]
        if split == "train":
            hits = [p for p in hits if not _split_pattern("test_A").search(p.stem)
                    and not _split_pattern("test_B").search(p.stem)]
        if len(hits) > 1:
            raise UserError(
                f"several tables look like the {split} table: {', '.join(str(h) for h in hits)}; "
                f"choose one with --set data.tables.{split}=PATH"
            )
        if hits:
            tables[split] = hits[0]
    return tables


# --------------------------------------------------------------------------- class maps

def label_base(ids: pd.Series, n_classes: int, setting: object, has_names: bool, where: str) -> int:
    """The id of the first class in a train table's EmotionId column: 0 or 1.

    setting 'auto' (data.label_base): 0, unless the ids run 1..K, which is ambiguous (a 1-based
    table, or a 0-based one without class 0): then stop and say how to declare it."""
    setting = str(setting).strip().lower()
    if setting not in ("auto", "0", "1"):
        raise UserError(f"data.label_base must be auto, 0 or 1, got '{setting}'")
    numeric = pd.to_numeric(ids, errors="coerce").dropna()
    if setting == "1" and len(numeric) and numeric.min() < 1:
        raise UserError(f"{where}: data.label_base=1 but EmotionId {int(numeric.min())} occurs; "
                        "set data.label_base=0 (or auto)")
    if setting != "auto":
        return int(setting)
    if len(numeric) and numeric.min() >= 1 and numeric.max() == n_classes:
        k = n_classes
        raise UserError(
            f"{where}: EmotionId runs 1..{k}{'' if has_names else ' and there is no emotion name column'}: "
            f"declare the base with --set data.label_base=1 (ids 1..{k} are read as classes 0..{k - 1} and "
            f"submissions are written 1..{k}) or --set data.label_base=0 (ids are 0-based; id {k} is then "
            "outside the class map and its rows are skipped)")
    return 0


def class_map_from_table(names: pd.Series, ids: pd.Series, default: list[str], where: str) -> list[str]:
    """Class names in id order (0-based ids), derived from a table carrying both names and ids."""
    pairs = {}
    for n, i in zip(names, ids):
        c, v = canonical_emotion(n), _to_int(i)
        if c is None or c not in default or np.isnan(v) or not 0 <= v < len(default):
            continue  # rows the class map cannot hold are reported and skipped later
        if pairs.setdefault(int(v), c) != c:
            raise UserError(f"{where}: EmotionId {int(v)} is used for both '{pairs[int(v)]}' and '{c}'")
    by_name = {}
    for i, c in pairs.items():
        if by_name.setdefault(c, i) != i:
            raise UserError(f"{where}: emotion '{c}' has two ids, {by_name[c]} and {i}")
    classes = list(default)
    for i, c in pairs.items():
        classes[i] = c
    if len(set(classes)) != len(classes):  # the table permuted the default order: fill the rest
        rest = [c for c in default if c not in pairs.values()]
        classes = [pairs.get(i) or rest.pop(0) for i in range(len(default))]
    return classes


# --------------------------------------------------------------------------- readers

def _rows_from_table(df: pd.DataFrame, cols: dict[str, str], split: str, dataset: str) -> pd.DataFrame:
    out = pd.DataFrame({"row": np.arange(len(df))})
    out["dataset"] = dataset
    out["split"] = split
    out["sample"] = [_sample_name(v) for v in df[cols["sample"]]]
    out["subject"] = [_sample_name(v) for v in df[cols["subject"]]] if "subject" in cols else ""
    out["subject"] = out["subject"].replace("nan", "")
    for k in ("fps", "onset", "apex", "offset"):
        out[k] = [_to_int(v) for v in df[cols[k]]] if k in cols else np.nan
    out["emotion_raw"] = list(df[cols["emotion"]]) if "emotion" in cols else None
    out["label_raw"] = list(df[cols["label"]]) if "label" in cols else None
    out["aus"] = [("" if pd.isna(v) else _sample_name(v)) for v in df[cols["aus"]]] if "aus" in cols else ""
    out["start_frame"] = np.nan
    out["end_frame"] = np.nan
    return out


def _assign_labels(t: pd.DataFrame, classes: list[str], issues: list[Issue], protocol: str = "") -> pd.DataFrame:
    """Fill emotion (canonical name) and label (id) from whichever of the two the table has."""
    outside = f"not a class of protocol {protocol}" if protocol else "outside the class map"
    labels, emotions = [], []
    for _, r in t.iterrows():
        if r["split"] in TEST_SPLITS:  # a test table's labels (if any) are not used: never drop its rows
            labels.append(np.nan)
            emotions.append("")
            continue
        name = canonical_emotion(r["emotion_raw"]) if r["emotion_raw"] is not None else None
        lid = _to_int(r["label_raw"]) if r["label_raw"] is not None else np.nan
        has_truth = name is not None or not np.isnan(lid) or (
            r["emotion_raw"] is not None and not pd.isna(r["emotion_raw"]))
        if not has_truth:
            labels.append(np.nan)
            emotions.append("")
            continue
        if name is None and r["emotion_raw"] is not None and not pd.isna(r["emotion_raw"]):
            issues.append(Issue("skip", r["split"], r["sample"],
                                f"emotion '{r['emotion_raw']}' is not one of {', '.join(classes)} (or a known alias)"))
            labels.append(np.nan)
            emotions.append("?")
            continue
        if name is not None and name not in classes:
            issues.append(Issue("skip", r["split"], r["sample"],
                                f"emotion '{name}' is {outside} ({', '.join(classes)})"))
            labels.append(np.nan)
            emotions.append("?")
            continue
        if not np.isnan(lid) and not (0 <= lid < len(classes) and float(lid).is_integer()):
            issues.append(Issue("skip", r["split"], r["sample"],
                                f"label {r['label_raw']} is outside the class ids 0..{len(classes) - 1}"))
            labels.append(np.nan)
            emotions.append("?")
            continue
        label = classes.index(name) if name is not None else int(lid)
        labels.append(label)
        emotions.append(classes[label])
    t = t.copy()
    t["label"] = pd.array([None if np.isnan(v) else int(v) for v in labels], dtype="Int64")
    t["emotion"] = emotions
    return t


def _attach_frames(t: pd.DataFrame, root: Path, issues: list[Issue], listing: dict | None = None) -> pd.DataFrame:
    index = index_folders(root, listing)
    dirs = []
    for _, r in t.iterrows():
        folder, why = _find_folder(r["sample"], r["split"], index)
        if folder is None:
            issues.append(Issue("missing", r["split"], r["sample"], why))
        dirs.append(str(folder) if folder else "")
    t = t.copy()
    t["frames_dir"] = dirs
    return t


def read_dfme(root: str | Path, cfg: dict) -> Dataset:
    """DFME / CCAC 2024: one table per split (xlsx or csv), one frame folder per sample."""
    root = Path(root)
    dcfg = cfg["data"]
    tables = find_tables(root, dcfg.get("tables") or {})
    if not tables:
        raise UserError(
            f"no annotation table found under {root}: expected files whose names contain 'train', "
            f"'test_A' or 'test_B' (.xlsx or .csv), or set data.tables.<split>=PATH"
        )
    protocol = dcfg.get("protocol", "auto")
    if protocol not in ("auto", "7class"):
        raise UserError(f"data.protocol={protocol} is not defined for DFME (7 classes): use auto or 7class")
    default = list(dcfg.get("classes") or DFME_CLASSES)
    issues: list[Issue] = []
    parts, classes, base = [], default, 0
    for split, path in tables.items():
        df = read_table(path)
        cols = match_columns(df, ["sample"] if dcfg.get("fps") else ["sample", "fps"], str(path))
        if split == "train":
            if "emotion" not in cols and "label" not in cols:
                raise UserError(f"{path}: the train table needs an emotion name or EmotionId column; "
                                f"columns found: {', '.join(map(str, df.columns))}")
            if "label" in cols:
                base = label_base(df[cols["label"]], len(default), dcfg.get("label_base", "auto"),
                                  "emotion" in cols, str(path))
                if base:
                    df = df.copy()
                    df[cols["label"]] = pd.to_numeric(df[cols["label"]], errors="coerce") - base
            if "emotion" in cols and "label" in cols and not dcfg.get("classes"):
                classes = class_map_from_table(df[cols["emotion"]], df[cols["label"]], default, str(path))
        parts.append(_rows_from_table(df, cols, split, "dfme"))
    t = pd.concat(parts, ignore_index=True)
    if dcfg.get("fps"):
        t["fps"] = t["fps"].fillna(float(dcfg["fps"]))
    t = _assign_labels(t, classes, issues)
    listing: dict[str, list[str]] = {}
    t = _attach_frames(t, root, issues, listing)
    return Dataset("dfme", root, _finish(t), classes, issues, label_base=base, listing=listing, sources=tables)


def read_manifest(path: str | Path, cfg: dict) -> Dataset:
    """A generic CSV: sample, subject, emotion (or label), fps, frames (folder, relative to the CSV),
    optional split (default train), onset/apex/offset, aus — any other database without code."""
    path = Path(path)
    if cfg["data"].get("protocol", "auto") != "auto":
        raise UserError(f"data.protocol={cfg['data']['protocol']} does not apply to a manifest: its classes are "
                        "its emotion names (or data.classes); leave data.protocol=auto")
    df = read_table(path)
    cols = match_columns(df, ["sample", "fps", "frames"], str(path))
    splits = [str(s).strip() if "split" in cols and not pd.isna(s) else "train"
              for s in (df[cols["split"]] if "split" in cols else [None] * len(df))]
    t = pd.concat([_rows_from_table(df[np.array(splits) == s], cols, s, "manifest")
                   for s in dict.fromkeys(splits)], ignore_index=True)
    names = sorted({c for c in (canonical_emotion(v) for v in t["emotion_raw"]) if c}) if "emotion" in cols else []
    classes = list(cfg["data"].get("classes") or names or DFME_CLASSES)
    issues: list[Issue] = []
    t = _assign_labels(t, classes, issues)
    frames = []
    order = pd.concat([df[np.array(splits) == s] for s in dict.fromkeys(splits)])
    for (_, r), raw in zip(t.iterrows(), order[cols["frames"]]):
        d = Path(str(raw))
        d = d if d.is_absolute() else path.parent / d
        if not d.is_dir():
            issues.append(Issue("missing", r["split"], r["sample"], f"frame folder not found: {d}"))
        frames.append(str(d) if d.is_dir() else "")
    t["frames_dir"] = frames
    return Dataset("manifest", path.parent, _finish(t), classes, issues, sources={s: path for s in dict.fromkeys(splits)})


def _finish(t: pd.DataFrame) -> pd.DataFrame:
    for c in SCHEMA:
        if c not in t:
            t[c] = ""
    return t[SCHEMA].reset_index(drop=True)


def load_dataset(root: str | Path, cfg: dict, check_disk: bool = True) -> Dataset:
    """Read the dataset at `root` (a folder, or a manifest CSV) and validate it against disk.

    data.dataset=auto recognises DFME, CASME II, SAMM, CAS(ME)^3 (by their tables), a folder
    holding several of the last three (the composite protocol) and manifest CSVs."""
    global _TABLES_SEEN, _LISTED
    root = Path(root)
    if not root.exists():
        raise UserError(f"dataset root not found: {root}")
    _TABLES_SEEN, _LISTED = {}, {}
    try:
        return _load_dataset(root, cfg, check_disk)
    finally:
        _TABLES_SEEN = _LISTED = None


def _load_dataset(root: Path, cfg: dict, check_disk: bool) -> Dataset:
    from .databases import READERS, detect_kind

    kind = cfg["data"]["dataset"]
    if kind == "auto":
        kind = "composite" if cfg["data"].get("protocol") == "composite" and root.is_dir() else detect_kind(root)
    if kind not in READERS:
        raise UserError(f"data.dataset must be auto or one of {', '.join(READERS)}, got '{kind}'")
    ds = READERS[kind](root, cfg)
    if check_disk:
        ds.issues += check_frames(ds.table, cfg["data"]["image_exts"], ds.listing)
        ds.listing.clear()  # each clip's frames are in the table now (frame_files)
    ds.issues += check_table(ds.table)
    ds.issues += check_aus(ds.table)
    return ds


# --------------------------------------------------------------------------- table fingerprints

def table_samples(path: str | Path, split: str) -> list[str]:
    """The sample names of `split` in a table file, in its row order (read as the readers read
    them): what a submission's row order must follow."""
    df = read_table(path)
    cols = match_columns(df, ["sample"], str(path))
    if "split" in cols:  # a manifest holding several splits
        keep = [(str(v).strip() if not pd.isna(v) else "train") == split for v in df[cols["split"]]]
        df = df[np.array(keep, bool)]
    return [_sample_name(v) for v in df[cols["sample"]]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_fingerprint(path: str | Path, split: str) -> dict:
    """What identifies a split's table: its file, the file's SHA-256, and the row count and
    SHA-256 of its sample names in order (stored with the cache, checked at prediction)."""
    path = Path(path)
    names = table_samples(path, split)
    return {"file": str(path.resolve()), "file_sha256": _sha256(path.read_bytes()), "rows": len(names),
            "samples_sha256": _sha256("\n".join(names).encode("utf-8"))}


# --------------------------------------------------------------------------- validation

def check_table(t: pd.DataFrame) -> list[Issue]:
    """Problems visible in the table alone: duplicates, missing fps, subject leakage."""
    issues = []
    dup = t[t.duplicated("sample", keep=False)]
    for sample, g in dup.groupby("sample", sort=False):
        issues.append(Issue("fatal", ",".join(dict.fromkeys(g["split"])), sample,
                            f"sample listed {len(g)} times (table rows {', '.join(str(r + 2) for r in g['row'])}); "
                            "sample names must be unique"))
    for _, r in t[t["fps"].isna()].iterrows():
        level = "fatal" if r["split"] in TEST_SPLITS else "skip"
        issues.append(Issue(level, r["split"], r["sample"],
                            "no frame rate (add an FPS column or set data.fps)"))
    for _, r in t[(t["split"] == "train") & t["label"].isna() & (t["emotion"] == "")].iterrows():
        issues.append(Issue("skip", r["split"], r["sample"], "train row without an emotion label"))
    subj = t[t["subject"].astype(str) != ""]
    for s, g in subj.groupby("subject"):
        splits = list(dict.fromkeys(g["split"]))
        if len(splits) > 1:
            issues.append(Issue("fatal", ",".join(splits), "",
                                f"subject '{s}' appears in several splits ({', '.join(splits)}): "
                                "splits must be subject-disjoint"))
    return issues


def check_frames(t: pd.DataFrame, exts: Iterable[str], listing: dict[str, list[str]] | None = None) -> list[Issue]:
    """Problems on disk: empty folders, clips and key frames outside the frames present, frame
    numbers that several files carry (one is used: `numbered_frames`).

    A clip inside a longer recording (start/end frames) that runs past the frames present is cut to
    them, one that is not there at all is skipped; a key frame outside the frames present is ignored
    on its own (the others are kept). Each row gets at most one line saying what was done.

    Each row's frame file names go to column `frame_files`, so preprocessing does not list the
    folder again; `listing` (folder -> file names, from the walk that found the folders) spares
    listing it even once here."""
    issues = []
    listing = listing or {}
    exts = list(exts)
    t["frame_files"] = None
    for i, r in t.iterrows():
        if not r["frames_dir"]:
            continue
        names = listing.get(str(Path(r["frames_dir"])))
        numbered, twice = _frame_files(r["frames_dir"], exts, names)
        frames = [Path(r["frames_dir"]) / n for _, n in numbered]
        t.at[i, "frame_files"] = tuple(f.name for f in frames)
        notes = []
        if twice:
            notes.append(f"{len(twice)} frame file(s) carry the number of another (e.g. {twice[0]}): one file per "
                         f"frame number is used, the first of data.image_exts ({', '.join(exts)}), then by name "
                         "(move the others out of the folder to silence this)")
        if not frames:
            issues.append(Issue("missing", r["split"], r["sample"], f"no image frames in {r['frames_dir']}"))
            t.at[i, "frames_dir"] = ""
            continue
        lo, hi = frame_number(frames[0]), frame_number(frames[-1])
        start, end = r["start_frame"], r["end_frame"]
        if not pd.isna(start) and not pd.isna(end):
            if end < lo or start > hi:
                issues.append(Issue("skip", r["split"], r["sample"], f"clip frames {int(start)}..{int(end)} are not in "
                                    f"{r['frames_dir']} (frames {lo}..{hi} there)"))
                continue
            if start < lo or end > hi:
                start, end = max(start, lo), min(end, hi)
                notes.append(f"clip {int(r['start_frame'])}..{int(r['end_frame'])} runs past the frames present "
                             f"({lo}..{hi}): cut to {int(start)}..{int(end)}")
                t.at[i, "start_frame"], t.at[i, "end_frame"] = start, end
            n = sum(start <= frame_number(f) <= end for f in frames)
            if n < 2:
                issues.append(Issue("skip", r["split"], r["sample"],
                                    f"only {n} frame(s) between {int(start)} and {int(end)} in {r['frames_dir']}"))
                continue
        bad = [k for k in ("onset", "apex", "offset") if not pd.isna(r[k]) and not lo <= r[k] <= hi]
        if bad:
            kept = [k for k in ("onset", "apex", "offset") if k not in bad and not pd.isna(r[k])]
            notes.append(f"{', '.join(f'{k} {int(r[k])}' for k in bad)} outside the frames present ({lo}..{hi}): "
                         f"{'/'.join(bad)} ignored" + (f" ({', '.join(kept)} kept)" if kept else ""))
            for k in bad:
                t.at[i, k] = np.nan
        if notes:
            issues.append(Issue("warn", r["split"], r["sample"], "; ".join(notes)))
    return issues


def check_aus(t: pd.DataFrame) -> list[Issue]:
    """AU strings with tokens the AU parser cannot read (the rest of the string is used)."""
    from .aus import parse_aus_report

    issues = []
    for r in t[t["aus"].astype(str) != ""].itertuples():
        _, bad = parse_aus_report(r.aus)
        if bad:
            issues.append(Issue("warn", r.split, r.sample, f"AU string '{r.aus}': "
                                f"{', '.join(repr(b) for b in bad)} not understood (skipped)"))
    return issues


SEVERITY = ("warn", "skip", "fatal")


def one_line_per_row(issues: list[Issue]) -> list[Issue]:
    """The issues of each row merged into one (the most severe level, the messages joined), in
    the order rows first appear: a user reads one line per row that says everything done to it."""
    merged: dict[tuple[str, str], Issue] = {}
    for i in issues:
        key = (i.split, i.sample) if i.sample else (i.split, f"#{len(merged)}")  # split-wide: never merged
        if key not in merged:
            merged[key] = Issue(i.level, i.split, i.sample, i.message)
            continue
        m = merged[key]
        if SEVERITY.index(i.level) > SEVERITY.index(m.level):
            m.level = i.level
        if i.message not in m.message.split("; "):
            m.message = f"{m.message}; {i.message}"
    return list(merged.values())


def resolve_issues(ds: Dataset, splits: Iterable[str] | None = None) -> Dataset:
    """Log the issues, one line per row; stop on fatal ones; drop skipped train rows.

    A test row without frames is fatal: every test row must get a prediction."""
    splits = list(splits) if splits is not None else ds.splits
    keep = ds.table["split"].isin(splits)
    relevant = [i for i in ds.issues if any(s in splits for s in i.split.split(","))]
    for issue in relevant:
        if issue.level == "missing":
            issue.level = "fatal" if issue.split in TEST_SPLITS else "skip"
    fatal = []
    for issue in one_line_per_row(relevant):
        (fatal.append(issue) if issue.level == "fatal" else log.warning("%s", issue))
    if fatal:
        for issue in fatal:
            log.error("%s", issue)
        raise UserError(f"{len(fatal)} fatal problem(s) in {ds.root} (listed above); fix them and rerun")
    skipped = {(i.split, i.sample) for i in relevant if i.level == "skip"}
    mask = keep & ~pd.Series([(s, n) in skipped for s, n in zip(ds.table["split"], ds.table["sample"])],
                             index=ds.table.index)
    if skipped:
        log.warning("skipped %d row(s) with problems (listed above)", len(skipped))
    return replace(ds, table=ds.table[mask].reset_index(drop=True), issues=relevant)


def summary(ds: Dataset, rows_in: int | None = None) -> str:
    """A few lines describing a loaded dataset: clips per database and split, classes, frame rates."""
    lines = [f"{ds.name} at {ds.root}: {len(ds.table)} clips"
             + (f" from {rows_in} table rows ({rows_in - len(ds.table)} not used, one line each above)"
                if rows_in is not None else "")
             + "; classes (id order): " + ", ".join(f"{i + ds.label_base}={c}" for i, c in enumerate(ds.classes))]
    several = ds.table["dataset"].nunique() > 1
    for (database, split), t in ds.table.groupby(["dataset", "split"], sort=False):
        fps = ", ".join(f"{k:g} fps: {v}" for k, v in t["fps"].value_counts().sort_index().items())
        subjects = t["subject"][t["subject"] != ""].nunique()
        line = (f"  {database + ' ' if several else ''}{split}: {len(t)} clips, "
                f"{f'{subjects} subjects' if subjects else 'subjects not given'} ({fps})")
        if t["label"].notna().any():
            counts = t["label"].value_counts().sort_index()
            line += "; " + ", ".join(f"{ds.classes[int(k)]} {v}" for k, v in counts.items())
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m mer.data --root DFME`: read and validate a dataset, print what was found."""
    import argparse

    from .cli import add_config_args, config_from_args, run_main, setup_logging

    parser = argparse.ArgumentParser(prog="python -m mer.data", description=main.__doc__)
    parser.add_argument("--root", required=True, help="dataset folder (or manifest CSV)")
    add_config_args(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        setup_logging(args.verbose)
        ds = load_dataset(args.root, config_from_args(args))
        rows_in = len(ds.table)
        ds = resolve_issues(ds)
        print(summary(ds, rows_in))  # the summary is this command's output; problems were logged on stderr
        return 0

    run_main(run)


if __name__ == "__main__":
    main()
