"""Declared extra training data: other databases' clips on the training side of every fold.

    python preprocess.py --root CASME2 --set data.protocol=all   # its own cache, same preprocess settings
    python train.py --fold all --extra CASME2 [--extra SAMM ...]

CCAC 2024 allowed extra training data if declared. Each extra database keeps its own cache
(`cache/<dataset>/<key>`), which must have been made with the same `preprocess` settings as the
run's cache (checked: otherwise an error says what to run). Its labelled train clips are mapped to
the run's classes (`train.extra_class_map`), their samples and subjects are prefixed by the
database (`CASME2/sub01`), so none can collide with the run's own, and they join the training side
of every fold only: never the held-out fold (out-of-fold scores), the inner validation subjects
(`train.select=inner_val`) or the ensemble's weights. `run.json`, the report and every submission's
`provenance.json` list them.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from . import cache as C
from .errors import UserError
from .data import canonical_emotion

log = logging.getLogger("mer.train")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + str(k))
    return keys


def resolve_extra_cache(entry: str | Path, cfg: dict, run_cache: Path) -> Path:
    """The cache of one --extra entry (a cache folder, or a dataset root looked up under
    preprocess.cache_dir), preprocessed with the same settings as the run's cache."""
    path = Path(entry)
    want = C.feature_settings(C.read_cache_config(run_cache))
    if (path / "meta.yaml").is_file():
        candidates = [path]
    elif path.exists():
        base = Path(cfg["preprocess"]["cache_dir"]) / C.dataset_id(path)
        candidates = sorted(d for d in base.glob("*") if (d / "meta.yaml").is_file())
        if not candidates:
            raise UserError(f"--extra {entry}: no cache under {base}: run `python preprocess.py --root {entry}` "
                            "first, with the same preprocess settings as the run")
    else:
        raise UserError(f"--extra {entry}: not found (give a dataset root or a cache folder cache/<dataset>/<key>)")
    same = [d for d in candidates if C.feature_settings(C.read_cache_config(d)) == want]
    if not same:
        differ = _diff(C.feature_settings(C.read_cache_config(candidates[-1])), want)
        raise UserError(f"--extra {entry}: its cache ({', '.join(str(d) for d in candidates)}) was preprocessed with "
                        f"other settings than the run's cache {run_cache} (differ: {', '.join(differ[:6])}); run "
                        f"`python preprocess.py --root {entry}` with the run's --config/--set preprocess settings")
    chosen = max(same, key=lambda d: (d / "meta.yaml").stat().st_mtime)
    if chosen.resolve() == Path(run_cache).resolve():
        raise UserError(f"--extra {entry} is the run's own dataset: extra data must be another database")
    return chosen


def class_mapping(extra_classes: list[str], run_classes: list[str], class_map: dict) -> dict[str, str | None]:
    """Each extra class -> a class of the run, or None (dropped).

    train.extra_class_map first (null drops); else the same name when the run has it; else, for a
    3-class run (negative, positive, surprise), the composite protocol's grouping; else dropped."""
    from .databases import TO_3CLASS

    given = {canonical_emotion(k) or str(k): (None if v is None else canonical_emotion(v) or str(v))
             for k, v in (class_map or {}).items()}
    bad = {k: v for k, v in given.items() if v is not None and v not in run_classes}
    if bad:
        k, v = next(iter(bad.items()))
        raise UserError(f"train.extra_class_map maps '{k}' to '{v}', which is not a class of this run "
                        f"({', '.join(run_classes)})")
    out = {}
    for name in extra_classes:
        if name in given:
            out[name] = given[name]
        elif name in run_classes:
            out[name] = name
        elif TO_3CLASS.get(name) in run_classes and set(run_classes) <= set(TO_3CLASS.values()):
            out[name] = TO_3CLASS[name]
        else:
            out[name] = None
    return out


def load_extra(entries: list[str | Path], cfg: dict, run_cache: Path, run_classes: list[str],
               apex_source: str = "motion", channels: list[str] | None = None):
    """(clips or None, records): every extra database's usable train clips, mapped to the run's
    classes and prefixed by their database; a record per database for run.json and the report."""
    from .training import load_clips

    parts, records = [], []
    for entry in entries:
        cdir = resolve_extra_cache(entry, cfg, run_cache)
        meta = C.read_meta(cdir)
        clips = load_clips(cdir, "train", apex_source, channels=channels, blink=cfg["model"].get("blink", "none"))
        mapping = class_mapping(list(meta["classes"]), run_classes, cfg["train"].get("extra_class_map") or {})
        names = [meta["classes"][k] if k >= 0 else None for k in clips.labels]
        target = [mapping.get(n) if n else None for n in names]
        keep = np.array([t is not None for t in target], bool)
        prefix = cdir.parent.name
        part = clips.subset(np.nonzero(keep)[0])
        part.samples = [f"{prefix}/{s}" for s in part.samples]
        part.subjects = np.array([f"{prefix}/{s}" for s in part.subjects])
        part.labels = np.array([run_classes.index(t) for t in target if t is not None], int)
        dropped = Counter(n or "unlabelled" for n, t in zip(names, target) if t is None)
        record = {"source": str(entry), "dataset": meta.get("dataset"), "root": meta.get("root"),
                  "cache": str(cdir.resolve()), "clips": int(keep.sum()),
                  "per_class": dict(Counter(t for t in target if t is not None)),
                  "class_map": mapping, "not_used": dict(dropped)}
        log.info("extra training data %s (%s): %d clips (%s)%s", entry, meta.get("dataset"), record["clips"],
                 ", ".join(f"{k} {v}" for k, v in record["per_class"].items()),
                 f"; not used: {', '.join(f'{k} {v}' for k, v in dropped.items())}" if dropped else "")
        if not len(part):
            raise UserError(f"--extra {entry}: none of its clips maps to this run's classes ({', '.join(run_classes)}); "
                            "set train.extra_class_map")
        parts.append(part)
        records.append(record)
    if not parts:
        return None, []
    clips = parts[0]
    for p in parts[1:]:
        clips = clips.concat(p)
    return clips, records


def describe(records: list[dict]) -> list[str]:
    """One line per extra database, for the report and logs."""
    return [f"{r['dataset']} from {r['root']}: {r['clips']} clips ("
            + ", ".join(f"{k} {v}" for k, v in r["per_class"].items()) + ")"
            + (f"; not used: {', '.join(f'{k} {v}' for k, v in r['not_used'].items())}" if r["not_used"] else "")
            + f"; cache {r['cache']}" for r in records]
