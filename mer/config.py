"""Configuration: YAML defaults in mer/defaults.yaml, a user file, and `--set key.sub=value`.

The config is a plain nested dict. Every key a user gives must exist in the defaults: a typo is
an error naming the key and the closest valid one, never a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


def default_config() -> dict:
    """The defaults shipped with the package (a fresh copy)."""
    with open(DEFAULTS_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def _unknown_key(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _check_type(key: str, default: Any, value: Any) -> Any:
    """Coerce `value` to the type of `default` where that is safe; fail clearly otherwise."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            if isinstance(default, float):
                return float(value)
            return int(value) if isinstance(value, float) and value.is_integer() else value
    elif isinstance(default, type(value)) or isinstance(value, type(default)):
        return value
    elif isinstance(default, str) and isinstance(value, (list, dict)):
        return value  # e.g. data.classes or preprocess.rois given as a list instead of a name
    elif isinstance(default, str) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a choice written as a number, e.g. data.label_base=1
    raise ConfigError(
        f"config key '{key}' expects {type(default).__name__} (default {default!r}), got {value!r}"
    )


def _free_maps(cfg: dict, prefix: str = "") -> set[str]:
    """Keys whose default is an empty mapping: maps the user fills freely (e.g. train.extra_class_map)."""
    keys = set()
    for k, v in cfg.items():
        if isinstance(v, dict):
            keys |= {prefix + k} if not v else _free_maps(v, prefix + k + ".")
    return keys


@functools.lru_cache(maxsize=1)
def _free_keys() -> frozenset[str]:
    return frozenset(_free_maps(default_config()))


def merge(base: dict, update: dict, where: str, prefix: str = "") -> dict:
    """Recursively merge `update` into a copy of `base`, rejecting keys `base` does not have
    (except inside the free maps of the defaults, whose entries are added to)."""
    out = copy.deepcopy(base)
    free = _free_keys()
    for k, v in update.items():
        full = prefix + str(k)
        if full in free:
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"config key '{full}' expects a mapping (e.g. {{name: value}}), got {v!r}")
            out[k] = {**(out.get(k) or {}), **(v or {})}
            continue
        if k not in out:
            raise _unknown_key(full, [prefix + x for x in out], where)
        if isinstance(out[k], dict) and out[k] and not isinstance(v, dict):
            raise ConfigError(f"config key '{full}' is a section; set one of its keys, e.g. '{full}.{next(iter(out[k]))}'")
        if isinstance(out[k], dict) and out[k] and isinstance(v, dict):
            out[k] = merge(out[k], v, where, full + ".")
        else:
            out[k] = _check_type(full, out[k], v)
    return out


def parse_override(text: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key.sub=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: cannot parse value '{raw}': {e}") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML reads '8e-4' as a string
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults, then the YAML file at `path` (if any), then each `key=value` override."""
    cfg = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                user = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(user).__name__}")
        user.pop("_meta", None)  # saved configs carry provenance; not a setting
        cfg = merge(cfg, user, str(path))
    for text in overrides:
        cfg = merge(cfg, parse_override(text), f"--set {text}")
    return cfg


def save_config(cfg: dict, path: str | Path, **meta: Any) -> Path:
    """Write the resolved config (plus optional provenance under `_meta`) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(cfg)
    if meta:
        data["_meta"] = meta
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # parallel jobs may write at once
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    tmp.replace(path)
    return path


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short hash of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
