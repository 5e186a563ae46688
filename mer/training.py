"""Training: subject-independent folds x seeds from the cache, with honest out-of-fold scores.

Each (fold, seed) is an independent run in runs/<name>/fold<k>/seed<s>/ (checkpoint, resolved
config, per-epoch metrics, out-of-fold logits), so runs can go to a job array or several GPUs.
A finished run is skipped; an interrupted one resumes from its last epoch checkpoint and, on the
CPU (or on CUDA with train.deterministic: true, same GPU and software), ends bit-identical to an
uninterrupted run (every epoch reseeds from (seed, fold, epoch)); see mer/devices.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from . import cache as C
from .batches import ClipTensors, device_generator
from .blinks import suppress_blinks
from .cli import cpu_count
from .devices import jobs_that_fit
from .errors import UserError
from .config import ConfigError, default_config, merge, save_config, stable_hash
from .features import APEX_FRAMES, mirror_permutation, roi_specs
from .files import atomic, write_text_atomic
from .metrics import scores
from .models import build_model

log = logging.getLogger("mer.train")


# ----------------------------------------------------------------------------- clips in memory

@dataclass
class ClipData:
    """The cached clips of one split, held in memory (small: a few MB for DFME)."""

    samples: list[str]
    subjects: np.ndarray
    labels: np.ndarray          # -1 where unknown (test splits)
    features: list[np.ndarray]  # (T, R, C) each
    times: list[np.ndarray]
    apex: list[np.ndarray]      # (3, S, S) each: first -> max-motion frame (what every clip has, test clips too)
    manifest: pd.DataFrame
    aus: list[str] = field(default_factory=list)  # the table's AU string of each clip ('' = none)
    apex_annotated: list[np.ndarray] = field(default_factory=list)  # first -> table apex (train only; else = apex)

    def __post_init__(self) -> None:
        if not self.aus:
            self.aus = [""] * len(self.samples)
        if not self.apex_annotated:
            self.apex_annotated = list(self.apex)

    def with_annotated_apex(self) -> "ClipData":
        """The same clips with the table's apex map as `apex` (model.apex_source: annotated, for the
        training side only: held-out and test clips keep the max-motion map, as test clips must)."""
        return replace(self, apex=list(self.apex_annotated))

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, idx: np.ndarray) -> "ClipData":
        idx = list(idx)
        return ClipData([self.samples[i] for i in idx], self.subjects[idx], self.labels[idx],
                        [self.features[i] for i in idx], [self.times[i] for i in idx],
                        [self.apex[i] for i in idx], self.manifest.iloc[idx].reset_index(drop=True),
                        [self.aus[i] for i in idx], [self.apex_annotated[i] for i in idx])

    def concat(self, other: "ClipData") -> "ClipData":
        """These clips followed by `other`'s (e.g. declared extra training data)."""
        return ClipData(self.samples + other.samples, np.concatenate([self.subjects, other.subjects]),
                        np.concatenate([self.labels, other.labels]), self.features + other.features,
                        self.times + other.times, self.apex + other.apex,
                        pd.concat([self.manifest, other.manifest], ignore_index=True), self.aus + other.aus,
                        self.apex_annotated + other.apex_annotated)

    @property
    def datasets(self) -> np.ndarray:
        """The database of every clip ('' when the cache does not say)."""
        if "dataset" not in self.manifest:
            return np.full(len(self), "", object)
        return self.manifest["dataset"].fillna("").astype(str).to_numpy()


def channel_index(cached: list[str], wanted: list[str] | None) -> list[int]:
    """Positions of the `wanted` channels (by name) among the `cached` ones; all if None."""
    if not wanted:
        return list(range(len(cached)))
    missing = [c for c in wanted if c not in cached]
    if missing:
        raise UserError(f"model.channels asks for {', '.join(missing)}, but the cache holds only "
                        f"{', '.join(cached)}: preprocess with preprocess.channels including them")
    return [cached.index(c) for c in wanted]


APEX_SOURCES = ("motion", *APEX_FRAMES, "annotated")  # model.apex_source


def apex_map_of(z, apex_source: str, path: Path) -> np.ndarray:
    """A cached clip's onset-apex map for model.apex_source: `motion` (and `annotated`, whose table
    apex is read apart) the map of preprocess.apex_frame; a frame choice's name, that choice's."""
    if apex_source in ("motion", "annotated"):
        return z["apex_map"]
    if f"apex_map_{apex_source}" in z:
        return z[f"apex_map_{apex_source}"]
    if f"apex_frame_{apex_source}" in z:  # the same frame as apex_map's
        return z["apex_map"]
    raise UserError(f"{path} holds no '{apex_source}' apex map (a cache made before they were kept): "
                    "run preprocess.py again")


def load_clips(cdir: Path, split: str, apex_source: str = "motion", require_all: bool = False,
               channels: list[str] | None = None, blink: str = "none") -> ClipData:
    """Clips of a split with a usable cache entry (status ok or fallback), with the named feature
    channels (default: all cached ones) and blinks handled as model.blink says (mer.blinks).

    require_all: every table row must have one (prediction): otherwise an error naming the rows."""
    m = C.read_manifest(cdir, split)
    usable = m["status"].isin(["ok", "fallback"])
    if require_all and not usable.all():
        bad = m[~usable]
        rows = "; ".join(f"row {int(r.row) + 1} {r.sample} ({r.status}: {r.reason})" for r in bad.itertuples())
        raise UserError(f"{len(bad)} {split} row(s) have no usable cache entry: {rows}. "
                        f"Fix the frames and rerun preprocess.py --splits {split} (failed clips are retried)")
    if not usable.all():
        log.warning("%s: %d clip(s) not usable (failed or pending) are left out of training", split, (~usable).sum())
    m = m[usable].reset_index(drop=True)
    meta = C.read_meta(cdir)
    cached = list(meta["channels"])
    keep = channel_index(cached, channels)
    try:
        suppress_blinks(np.zeros((1, len(meta["rois"]), len(cached)), np.float32), meta["rois"], cached, blink)
    except ValueError as e:
        raise UserError(str(e)) from None
    if apex_source not in APEX_SOURCES:
        raise UserError(f"model.apex_source must be one of {', '.join(APEX_SOURCES)}, got '{apex_source}'")
    feats, times, apex, annotated = [], [], [], []
    for f in m["file"]:
        z = C.load_clip(cdir / f)
        x = suppress_blinks(z["features"], meta["rois"], cached, blink)
        feats.append(x[..., keep].astype(np.float32))
        times.append(z["times_ms"].astype(np.float32))
        apex.append(apex_map_of(z, apex_source, cdir / f).astype(np.float32))
        if apex_source == "annotated":
            annotated.append(z["apex_map_annotated"].astype(np.float32) if "apex_map_annotated" in z else apex[-1])
    labels = pd.to_numeric(m["label"], errors="coerce").fillna(-1).astype(int).to_numpy()
    aus = list(m["aus"].fillna("").astype(str)) if "aus" in m else [""] * len(m)
    return ClipData(list(m["sample"].astype(str)), m["subject"].fillna("").astype(str).to_numpy(), labels,
                    feats, times, apex, m, aus, annotated)


# ----------------------------------------------------------------------------- folds

def make_folds(clips: ClipData, k: int, protocol: str, seed: int = 0) -> np.ndarray:
    """Fold id of every clip: subject-independent, stratified k folds (or one fold per subject)."""
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    groups = clips.subjects
    if (groups == "").any():
        raise UserError("training needs the subject of every clip (subject-independent folds); "
                        "the train table has rows without a Subject")
    n_subjects = len(np.unique(groups))
    if protocol == "loso":
        splitter = LeaveOneGroupOut()
    elif protocol == "kfold":
        if k < 2:
            raise UserError(f"train.folds must be 2 or more, got {k} (train.protocol=loso for one fold per subject)")
        if n_subjects < k:
            raise UserError(f"train.folds={k} but only {n_subjects} subjects: lower train.folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        raise UserError(f"train.protocol must be kfold or loso, got '{protocol}'")
    folds = np.full(len(clips), -1)
    try:
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(clips)), clips.labels, groups)):
            folds[test] = f
    except ValueError as e:
        raise UserError(f"cannot make {k} stratified subject folds from {len(clips)} clips: {e}; "
                        "lower train.folds") from None
    return folds


def load_or_make_folds(run_dir: Path, clips: ClipData, cfg: dict) -> np.ndarray:
    """Fold membership is made once per run and saved; every model and ensemble reuses it."""
    path = run_dir / "folds.csv"
    if path.is_file():
        saved = pd.read_csv(path, dtype={"sample": str, "subject": str})
        lookup = dict(zip(saved["sample"], saved["fold"]))
        missing = [s for s in clips.samples if s not in lookup]
        if missing:
            raise UserError(f"{path} does not cover {len(missing)} clip(s) of the cache (e.g. {missing[0]}): "
                            "the cache changed since this run started; use a new --name")
        return np.array([lookup[s] for s in clips.samples])
    folds = make_folds(clips, cfg["train"]["folds"], cfg["train"]["protocol"])
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # jobs of an array may start together: same content
    pd.DataFrame({"sample": clips.samples, "subject": clips.subjects, "label": clips.labels,
                  "fold": folds}).to_csv(tmp, index=False)
    os.replace(tmp, path)
    return folds


# ----------------------------------------------------------------------------- feature scale

class Normaliser:
    """Per-channel scale of the features (std over the training steps); no centring, so zero
    stays 'no motion'."""

    def __init__(self, scale: np.ndarray):
        self.scale = np.asarray(scale, np.float32)

    @classmethod
    def fit(cls, features: list[np.ndarray]) -> "Normaliser":
        allf = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features])
        return cls(np.maximum(allf.std(0), 1e-6))

    def __call__(self, f: np.ndarray) -> np.ndarray:
        return f / self.scale


# ----------------------------------------------------------------------------- AU targets

def au_settings(tcfg: dict) -> dict:
    """The AU multi-task settings (train.au_*)."""
    return {"weight": float(tcfg.get("au_weight", 0.0)), "keep_sides": bool(tcfg.get("au_keep_sides", False)),
            "min_count": int(tcfg.get("au_min_count", 5))}


def au_targets(clips: ClipData, vocab: list[str], keep_sides: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(multi-hot (N, V), known (N,)) of the clips' AU strings; a clip with no AU coded is
    'unknown' (left out of the AU loss), not 'no AU'."""
    from .aus import multi_hot, parse_aus

    parsed = [parse_aus(a, keep_sides) for a in clips.aus]
    return multi_hot(parsed, vocab), np.array([len(p) > 0 for p in parsed])


def au_mirror_permutation(vocab: list[str]) -> np.ndarray:
    """perm[j] = the AU target that AU j becomes on the mirrored face: L12 <-> R12 (when both are
    targets), every other code itself."""
    index = {c: j for j, c in enumerate(vocab)}
    swap = {"L": "R", "R": "L"}
    return np.array([index.get(swap[c[0]] + c[1:], j) if c[:1] in swap else j for j, c in enumerate(vocab)], int)


def au_vocabulary_of(clips: ClipData, keep_sides: bool, min_count: int) -> list[str]:
    """The AUs coded on at least `min_count` of these (training) clips."""
    from .aus import au_vocabulary, parse_aus

    return au_vocabulary([parse_aus(a, keep_sides) for a in clips.aus], min_count)


# ----------------------------------------------------------------------------- one run

def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    """'balanced': n / (K_present x count) for each class present, as in scikit-learn."""
    if mode == "none":
        return torch.ones(n_classes)
    if mode != "balanced":
        raise UserError(f"train.class_weight must be balanced or none, got '{mode}'")
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _seed_everything(*key: int) -> np.random.Generator:
    s = int(stable_hash(list(key), 8), 16)
    torch.manual_seed(s)
    return np.random.default_rng(s)


def build(cfg: dict, n_rois: int, n_channels: int, n_classes: int, n_aus: int = 0) -> nn.Module:
    name = cfg["model"]["name"]
    if name not in cfg["model"] or not isinstance(cfg["model"][name], dict):
        raise UserError(f"model.name={name}: no settings section model.{name} in the config")
    try:
        return build_model(name, n_rois, n_channels, n_classes, n_aus=n_aus, **cfg["model"][name])
    except ValueError as e:
        raise UserError(str(e)) from None


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temp file, then rename: a crash never leaves half a checkpoint."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def mirror_inputs(meta: dict) -> tuple[np.ndarray, list[int]]:
    """(ROI permutation, u channel positions) of the left/right mirror, for augmentation and TTA."""
    return mirror_permutation(roi_specs(meta["rois"])), [i for i, c in enumerate(meta["channels"]) if c == "u"]


def predict_heads(model: nn.Module, clips: "ClipData | ClipTensors", norm: Normaliser, device: str,
                  batch_size: int = 64, tta: str = "none", mirror_with: tuple[np.ndarray, list[int]] | None = None,
                  au_perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every head's logits on the clips, in their order: {'emotion': (N, K)[, 'au': (N, V)]}.
    `clips` may already sit on the device (ClipTensors made with the model's inputs as keys).

    tta 'mirror': the mean of the logits of each clip and of its mirrored face (ROIs swapped with
    their twins, u negated; the apex map flipped), which mirror_with = (permutation, u channels)
    defines; the mirrored pass's sided AU logits are swapped back (au_perm) before the mean."""
    if tta not in ("none", "mirror"):
        raise UserError(f"predict.tta must be mirror or none, got '{tta}'")
    if isinstance(clips, ClipTensors):
        data = clips
    else:
        data = ClipTensors(clips, norm, device, tuple(getattr(model, "inputs", ("x", "times", "mask"))),
                           mirror_with=mirror_with)
    if tta == "mirror" and data.perm is None:
        raise ValueError("tta='mirror' needs mirror_with=(ROI permutation, u channels)")
    model.eval()
    passes = []
    with torch.no_grad():
        for flip in ([False, True] if tta == "mirror" else [False]):
            outs: dict[str, list[torch.Tensor]] = {}
            for batch in data.in_order(batch_size, flip=flip):
                for k, v in model.forward_heads(batch).items():
                    outs.setdefault(k, []).append(v.float())
            got = {k: torch.cat(v).cpu().numpy() for k, v in outs.items()}  # one read-back per head
            if flip and au_perm is not None and "au" in got:
                got["au"] = got["au"][:, au_perm]
            passes.append(got)
    if not passes[0]:
        return {"emotion": np.zeros((0, 0), np.float32)}
    return {k: np.mean([p[k] for p in passes], 0) for k in passes[0]}


def predict_logits(model: nn.Module, clips: "ClipData | ClipTensors", norm: Normaliser, device: str,
                   batch_size: int = 64, tta: str = "none", mirror_with: tuple[np.ndarray, list[int]] | None = None) -> np.ndarray:
    """Emotion logits (N, K) of the clips (see predict_heads)."""
    return predict_heads(model, clips, norm, device, batch_size, tta, mirror_with)["emotion"]


def epochs_for(n_clips: int, tcfg: dict) -> int:
    """train.epochs, raised on small sets so that a model gets at least train.min_steps updates."""
    per_epoch = max(1, -(-n_clips // int(tcfg["batch_size"])))
    return max(int(tcfg["epochs"]), -(-int(tcfg["min_steps"]) // per_epoch))


@dataclass
class Setup:
    """Everything one (fold, seed) model trains with."""

    train_set: ClipData
    oof_set: ClipData
    select_set: ClipData | None
    norm: Normaliser
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    au_vocab: list[str]
    au_loss: nn.Module | None
    au_train: tuple[np.ndarray, np.ndarray] | None
    au_perm: np.ndarray | None
    mirror_with: tuple[np.ndarray, list[int]]
    keys: tuple[str, ...]
    epochs: int
    n_extra: int
    train_data: ClipTensors  # the training clips on the device, with the AU targets (augmented per batch)
    oof_data: ClipTensors    # the held-out fold on the device (scored every epoch, then written)
    select_data: ClipTensors | None


def _setup(clips: ClipData, folds: np.ndarray, fold: int, seed: int, cfg: dict, meta: dict, device: str,
           extra: ClipData | None, init: Path | None) -> Setup:
    """The fold's training / out-of-fold / checkpoint-selection clips, the normaliser, the model
    (from a pretrained encoder if `init`), optimiser, schedule and losses."""
    tcfg = cfg["train"]
    n_classes = len(meta["classes"])
    train_set, oof_set = clips.subset(np.nonzero(folds != fold)[0]), clips.subset(np.nonzero(folds == fold)[0])
    select_set = None
    if tcfg["select"] == "inner_val":
        train_set, select_set = _inner_split(train_set, tcfg["inner_val_frac"], seed)
    elif tcfg["select"] != "last":
        raise UserError(f"train.select must be last or inner_val, got '{tcfg['select']}'")
    n_extra = len(extra) if extra is not None else 0
    if n_extra:  # after the inner split: extra clips never choose a checkpoint
        train_set = train_set.concat(extra)
    if cfg["model"]["apex_source"] == "annotated":  # the training side only: the others are scored as test clips
        train_set = train_set.with_annotated_apex()
    encoder = torch.load(init, map_location="cpu", weights_only=False) if init is not None else None
    # a pretrained encoder learned on inputs of its own scale: keep it
    norm = Normaliser(encoder["norm_scale"]) if encoder is not None else Normaliser.fit(train_set.features)
    r, c = clips.features[0].shape[1:]
    aus = au_settings(tcfg)
    vocab = au_vocabulary_of(train_set, aus["keep_sides"], aus["min_count"]) if aus["weight"] > 0 else []
    if aus["weight"] > 0 and not vocab:
        log.warning("fold %d: no AU is coded on %d or more training clips (the table's AU column): training without "
                    "the AU head (train.au_weight=0 says so and silences this)", fold, aus["min_count"])
    _seed_everything(seed, fold, -1)
    model = build(cfg, r, c, n_classes, len(vocab)).to(device)
    if encoder is not None:
        load_encoder(model, encoder, init)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    warm = max(0, int(tcfg["warmup_epochs"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (e + 1) / (warm + 1) if e < warm else tcfg["lr_gamma"] ** (e - warm))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_set.labels, n_classes, tcfg["class_weight"]).to(device),
                                  label_smoothing=tcfg["label_smoothing"])
    au_loss, au_train = None, None
    keys = tuple(model.inputs) + ("label",)
    if vocab:
        au_train = au_targets(train_set, vocab, aus["keep_sides"])
        y, known = au_train
        pos = y[known].sum(0)
        pos_weight = np.clip((known.sum() - pos) / np.maximum(pos, 1), 1.0, 20.0)  # rare AUs count more
        au_loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32).to(device),
                                       reduction="none")
        keys += ("au", "au_known")
    au_perm = au_mirror_permutation(vocab) if vocab else None
    mirror_with = mirror_inputs(meta)
    inputs = tuple(model.inputs)  # only what the model reads goes to the device
    return Setup(train_set, oof_set, select_set, norm, model, opt, sched, loss_fn, vocab, au_loss, au_train,
                 au_perm, mirror_with, keys, epochs_for(len(train_set), tcfg), n_extra,
                 ClipTensors(train_set, norm, device, keys, au_train, mirror_with, au_perm),
                 ClipTensors(oof_set, norm, device, inputs, mirror_with=mirror_with),
                 ClipTensors(select_set, norm, device, inputs) if select_set is not None else None)


def load_encoder(model: nn.Module, encoder: dict, path: Path) -> None:
    """Initialise a classifier from a pretrained encoder (mer.pretraining's encoder.pt, read from
    `path`): every weight but the heads; a checkpoint of another shape is an error saying so."""
    state = encoder["encoder"]
    own = model.state_dict()
    wanted = {k: v for k, v in state.items() if not k.startswith(("head.", "au_head."))}
    bad = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise UserError(f"pretrained encoder {path} does not fit this model ({bad[0]}): pretrain with the same "
                        "model settings (delete that pretrain folder to redo it)")
    model.load_state_dict(wanted, strict=False)


def _autocast(device: str, amp: bool):
    """bfloat16 autocast on the device's type when amp is on; nothing otherwise (any device)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _epoch(st: Setup, cfg: dict, device: str, rng: np.random.Generator, amp: bool) -> dict:
    """One pass over the training clips, kept on the device: each batch is gathered and augmented
    there; the loss is read back once, at the end."""
    tcfg = cfg["train"]
    aus = au_settings(tcfg)
    st.model.train()
    t0 = time.time()
    gen = device_generator(device, int(rng.integers(0, 2**63 - 1)))
    total = torch.zeros((), device=device)
    au_total = torch.zeros((), device=device)
    n = 0
    for batch in st.train_data.shuffled(tcfg["batch_size"], rng, tcfg["augment"], gen):
        with _autocast(device, amp):
            heads = st.model.forward_heads(batch)
            loss = st.loss_fn(heads["emotion"].float(), batch["label"])
            au_part = None
            if st.au_loss is not None:
                known = batch["au_known"].float()
                per_clip = st.au_loss(heads["au"].float(), batch["au"]).mean(1)
                au_part = (per_clip * known).sum() / known.sum().clamp_min(1.0)
                loss = loss + aus["weight"] * au_part
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(st.model.parameters(), 1.0)
        st.opt.step()
        b = len(batch["label"])
        total += loss.detach() * b
        if au_part is not None:
            au_total += au_part.detach() * b
        n += b
    st.sched.step()
    row = {"lr": st.opt.param_groups[0]["lr"], "train_loss": float(total) / max(n, 1),
           "clips_per_s": n / max(time.time() - t0, 1e-9)}
    if st.au_loss is not None:
        row["train_au_loss"] = float(au_total) / max(n, 1)
    return row


def train_one(clips: ClipData, folds: np.ndarray, fold: int, seed: int, cfg: dict, meta: dict,
              out: Path, device: str, *, progress: bool = True, threads: int = 0,
              extra: ClipData | None = None, init: Path | None = None) -> dict:
    """Train one model on every fold but `fold` (plus the `extra` clips, declared extra training
    data: training side only; from the pretrained encoder `init` if given); write its checkpoint,
    metrics and out-of-fold logits."""
    from .devices import deterministic_for, set_deterministic

    tcfg = cfg["train"]
    done = out / "result.json"
    if done.is_file():
        (out / "last.pt").unlink(missing_ok=True)  # a kill between the result and this deletion left it
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    set_deterministic(device, deterministic_for(tcfg.get("deterministic", "auto"), device))
    amp = bool(tcfg.get("amp", False))
    save_config(cfg, out / "config.yaml", fold=fold, seed=seed, cache=meta["cache"])
    st = _setup(clips, folds, fold, seed, cfg, meta, device, extra, init)
    ckpt = out / "last.pt"
    history, start, best = _resume(st, ckpt, fold, seed)
    n_classes = len(meta["classes"])
    bar = tqdm(range(start, st.epochs), desc=f"fold {fold} seed {seed}", unit="ep", file=sys.stderr,
               initial=start, total=st.epochs, dynamic_ncols=True, disable=not progress)
    every_s, saved_at = checkpoint_interval(tcfg), time.monotonic()
    for epoch in bar:
        row = {"epoch": epoch + 1, **_epoch(st, cfg, device, _seed_everything(seed, fold, epoch), amp)}
        row.update(_diagnostics(st, device, n_classes))
        if "select_uf1" in row and row["select_uf1"] > best[0]:
            best = (row["select_uf1"], {k: v.detach().cpu().clone() for k, v in st.model.state_dict().items()})
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", uf1=f"{row.get('heldout_uf1', float('nan')):.3f}")
        if epoch + 1 < st.epochs and time.monotonic() - saved_at >= every_s:  # the last one is the model itself
            save_atomic({"model": st.model.state_dict(), "opt": st.opt.state_dict(), "sched": st.sched.state_dict(),
                         "history": history, "epoch": epoch, "best": best}, ckpt)
            saved_at = time.monotonic()
    bar.close()

    if st.select_set is not None and best[1] is not None:
        st.model.load_state_dict(best[1])
    pd.DataFrame(history).to_csv(out / "metrics.csv", index=False)
    _save_model(st, clips, fold, seed, cfg, meta, out / "model.pt")
    result = _score_held_out(st, fold, seed, cfg, device, n_classes, out / "oof.csv")
    write_text_atomic(done, json.dumps(result, indent=1))
    ckpt.unlink(missing_ok=True)  # last: a crash before this point resumes, never loses the run
    return result


def checkpoint_interval(tcfg: dict) -> float:
    """train.checkpoint_s, checked: seconds between resume points (0: after every epoch)."""
    every_s = float(tcfg.get("checkpoint_s", 0))
    if not every_s >= 0:
        raise UserError(f"train.checkpoint_s must be 0 (every epoch) or more seconds, got {every_s:g}")
    return every_s


def _resume(st: Setup, ckpt: Path, fold: int, seed: int) -> tuple[list[dict], int, tuple]:
    """(history, first epoch to run, best selection so far) from an interrupted run's checkpoint,
    its model, optimiser and schedule restored; a fresh start without one."""
    if not ckpt.is_file():
        return [], 0, (-1.0, None)
    state = load_checkpoint(ckpt)  # on the CPU: optimiser step counters must stay there
    st.model.load_state_dict(state["model"])
    st.opt.load_state_dict(state["opt"])
    st.sched.load_state_dict(state["sched"])
    log.info("fold %d seed %d: resuming after epoch %d", fold, seed, state["epoch"] + 1)
    return state["history"], state["epoch"] + 1, state["best"]


def _diagnostics(st: Setup, device: str, n_classes: int) -> dict:
    """This epoch's scores on the held-out fold (diagnostics only: never used to choose a
    checkpoint) and on the inner selection split (train.select: inner_val)."""
    row = {}
    if len(st.oof_set):
        s = scores(st.oof_set.labels, predict_logits(st.model, st.oof_data, st.norm, device).argmax(1), n_classes)
        row.update(heldout_uf1=s["uf1"], heldout_uar=s["uar"], heldout_acc=s["acc"])
    if st.select_set is not None:
        pred = predict_logits(st.model, st.select_data, st.norm, device).argmax(1)
        row["select_uf1"] = scores(st.select_set.labels, pred, n_classes)["uf1"]
    return row


def _save_model(st: Setup, clips: ClipData, fold: int, seed: int, cfg: dict, meta: dict, path: Path) -> None:
    """The trained model with everything prediction needs to rebuild and feed it."""
    save_atomic({"model": st.model.state_dict(), "model_name": cfg["model"]["name"],
                 "model_settings": cfg["model"][cfg["model"]["name"]], "n_rois": clips.features[0].shape[1],
                 "n_channels": clips.features[0].shape[2], "channels": list(meta["channels"]),
                 "rois": meta["rois"], "classes": meta["classes"], "norm_scale": st.norm.scale, "fold": fold,
                 "seed": seed, "apex_source": cfg["model"]["apex_source"], "au_vocab": st.au_vocab,
                 "blink": cfg["model"].get("blink", "none"), "config_hash": stable_hash(cfg)}, path)


def _score_held_out(st: Setup, fold: int, seed: int, cfg: dict, device: str, n_classes: int, path: Path) -> dict:
    """Out-of-fold logits written to `path` (test-time mirroring as predict.tta says); the result
    record with the fold's scores."""
    tta = cfg.get("predict", {}).get("tta", "none")
    heads = predict_heads(st.model, st.oof_data, st.norm, device, tta=tta, mirror_with=st.mirror_with,
                          au_perm=st.au_perm)
    write_oof(path, st.oof_set, fold, seed, heads, n_classes, st.au_vocab)
    result = {"fold": fold, "seed": seed, "n_train": len(st.train_set), "n_extra": st.n_extra,
              "n_oof": len(st.oof_set), "epochs": st.epochs, "tta": tta}
    if len(st.oof_set):
        s = scores(st.oof_set.labels, heads["emotion"].argmax(1), n_classes)
        result.update(uf1=s["uf1"], uar=s["uar"], acc=s["acc"])
    return result


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, always onto the CPU (the caller moves what it needs)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def write_oof(path: Path, clips: ClipData, fold: int, seed: int, heads: dict[str, np.ndarray], n_classes: int,
              au_vocab: list[str]) -> None:
    """Out-of-fold logits (and AU-head logits, columns au_<code>) of one model, written atomically
    (other jobs' reports may be reading)."""
    oof = pd.DataFrame({"sample": clips.samples, "subject": clips.subjects, "dataset": clips.datasets,
                        "label": clips.labels, "fold": fold, "seed": seed})
    logits = heads["emotion"]
    for k in range(n_classes):
        oof[f"logit_{k}"] = logits[:, k] if len(logits) else []
    if au_vocab and "au" in heads:
        oof["aus"] = clips.aus
        for j, code in enumerate(au_vocab):
            oof[f"au_{code}"] = heads["au"][:, j] if len(heads["au"]) else []
    with atomic(path) as tmp:
        oof.to_csv(tmp, index=False)


def _inner_split(clips: ClipData, frac: float, seed: int) -> tuple[ClipData, ClipData]:
    """Hold out ~frac of the training subjects to choose the checkpoint (never the test fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, round(1 / max(frac, 1e-3)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr, va = next(splitter.split(np.zeros(len(clips)), clips.labels, clips.subjects))
    return clips.subset(tr), clips.subset(va)


# ----------------------------------------------------------------------------- the whole run

def _settings_that_shape_models(cfg: dict) -> dict:
    skip = {"run_dir", "seeds", "num_threads", "gpu_job_mb", "checkpoint_s"}
    train = {k: v for k, v in cfg["train"].items() if k not in skip}
    train["extra"] = list(train.get("extra") or [])  # runs from before extra data existed had none
    if not train["extra"]:
        train.pop("extra_class_map", None)  # means nothing without extra data
    out = {"model": cfg["model"], "train": train,
           "preprocess": {k: v for k, v in cfg["preprocess"].items() if k not in C.NOT_IN_KEY},
           "predict": {"tta": (cfg.get("predict") or {}).get("tta", "none")}}  # how out-of-fold logits are made
    if (cfg.get("pretrain") or {}).get("enabled"):
        out["pretrain"] = cfg["pretrain"]
    return out


def _check_same_settings(run_dir: Path, cfg: dict) -> None:
    """A run's folds x seeds must come from one configuration: refuse to mix."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8"))
    old.pop("_meta", None)

    def with_defaults(c: dict) -> dict:  # settings added since a run or a cache was made take their default
        try:
            return merge(default_config(), c, str(path))
        except ConfigError:
            return c

    a, b = _settings_that_shape_models(with_defaults(old)), _settings_that_shape_models(with_defaults(cfg))
    if stable_hash(a) != stable_hash(b):
        diff = [f"{s}.{k}" for s in sorted(set(a) | set(b)) for k in set(a.get(s, {})) | set(b.get(s, {}))
                if a.get(s, {}).get(k) != b.get(s, {}).get(k)]
        raise UserError(f"run {run_dir} was trained with other settings ({', '.join(sorted(diff)[:6])}); "
                        "use a new --name, or the same settings to finish it")


def _check_same_data(run_dir: Path, cdir: Path) -> None:
    """A run's models must come from one dataset and cache (its folder and settings key; where it
    is stored may change): refuse to mix, e.g. a benchmark's work folder reused for another set."""
    path = run_dir / "run.json"
    if not path.is_file():
        return
    old = Path(json.loads(path.read_text(encoding="utf-8"))["cache"])
    if (old.parent.name, old.name) != (cdir.resolve().parent.name, cdir.resolve().name):
        raise UserError(f"run {run_dir} was trained on the cache {old.parent.name}/{old.name}, not "
                        f"{cdir.resolve().parent.name}/{cdir.resolve().name}; use a new --name")


def _call(job: tuple):
    fn, args, kwargs = job
    return fn(*args, **kwargs)


def _job_folder(job: tuple) -> str:
    """A training or pretraining job named by its output folder."""
    return next((str(a) for a in job[1] if isinstance(a, Path)), "a job")


def in_parallel(fn, args: list[tuple], jobs: int, what: str, kwargs: list[dict]) -> list:
    """fn(*a, **kw) for every (a, kw): here with a progress bar per call, or in `jobs` spawned
    processes with one bar over all of them. A process that dies (out of memory, a crash) stops the
    run with its reason: what finished is kept and a rerun resumes the rest."""
    if jobs == 1:
        return [fn(*a, progress=True, **kw) for a, kw in zip(args, kwargs)]
    from .workers import Lost, run_jobs

    work = [(fn, a, dict(kw, progress=False)) for a, kw in zip(args, kwargs)]
    results = []
    with tqdm(total=len(work), desc=what, unit="model", file=sys.stderr, dynamic_ncols=True) as bar:
        for job, res in run_jobs(_call, work, jobs, start_method="spawn", describe=_job_folder):
            if isinstance(res, Lost):
                raise UserError(f"a {what} process died ({res.reason}); rerun the same command: finished models "
                                "are kept and interrupted ones resume (fewer --jobs if memory ran out)")
            results.append(res)
            bar.update()
    return results


def _pretrain(clips: ClipData, folds: np.ndarray, todo_folds: list[int], extra_clips: ClipData | None, cfg: dict,
              info: dict, run_dir: Path, cdir: Path, device: str, jobs: int, threads: int) -> dict[int, Path]:
    """With pretrain.enabled: one pretrained encoder per fold, on the training side of that fold
    (plus declared extra training data and pretrain.extra, labels unused); {fold: encoder.pt}."""
    if not (cfg.get("pretrain") or {}).get("enabled"):
        return {}
    from .pretraining import pretrain_fold, unlabelled_extra

    unlabelled = unlabelled_extra(list(cfg["pretrain"].get("extra") or []), cfg, Path(cdir), info["channels"])
    args = []
    for f in todo_folds:
        side = clips.subset(np.nonzero(folds != f)[0])
        for more in (extra_clips, unlabelled):
            if more is not None:
                side = side.concat(more)
        args.append((side, cfg, info, run_dir / "pretrain" / f"fold{f}", device, f))
    log.info("pretraining %d encoder(s) (masked ROI-motion modelling, %d epochs)", len(args),
             int(cfg["pretrain"]["epochs"]))
    paths = in_parallel(pretrain_fold, args, min(jobs, len(args)), "pretrain", [dict(threads=threads)] * len(args))
    return dict(zip(todo_folds, paths))


def resolve_jobs(jobs: int | str, device: str, n_runs: int, gpu_job_mb: float = 1500.0) -> int:
    """'auto': one process per CPU core (each on one thread) on CPU; on a GPU as many as its free
    memory holds at `gpu_job_mb` each (a CUDA context plus one small model and its batches), at
    most one per CPU core."""
    if jobs == "auto":
        jobs = jobs_that_fit(device, gpu_job_mb) if device.startswith("cuda") else cpu_count()
    else:
        try:
            jobs = int(jobs)
        except ValueError:
            raise UserError(f"--jobs must be a number or auto, got '{jobs}'") from None
        if device.startswith("cuda") and min(jobs, n_runs) > 1:
            fit = jobs_that_fit(device, gpu_job_mb)
            if fit < min(jobs, n_runs):
                log.warning("--jobs %d on %s: its free memory holds about %d at train.gpu_job_mb=%g MB each; "
                            "processes may run out of memory (--jobs auto chooses)", jobs, device, fit, gpu_job_mb)
    return max(1, min(jobs, n_runs))


def run_training(cdir: Path, cfg: dict, name: str, fold: str = "all", seeds: list[int] | None = None,
                 device: str = "cpu", jobs: int | str = 1, extra: list[str | Path] | None = None) -> Path:
    """Train the requested folds x seeds of run `name` from the cache at `cdir`, then report.

    extra: declared extra training data, dataset roots or cache folders (default: train.extra),
    added to the training side of every fold (see mer/extra.py)."""
    from .extra import describe, load_extra

    meta = C.read_meta(cdir)
    extra = [str(e) for e in (cfg["train"].get("extra") or [] if extra is None else extra)]
    cfg = dict(cfg, preprocess=C.read_cache_config(cdir)["preprocess"],  # what made the tensors
               train={**cfg["train"], "extra": extra})
    run_dir = Path(cfg["train"]["run_dir"]) / name
    channels = list(cfg["model"]["channels"] or meta["channels"])
    clips = load_clips(cdir, "train", cfg["model"]["apex_source"], channels=channels,
                       blink=cfg["model"].get("blink", "none"))
    if len(clips) == 0 or (clips.labels < 0).all():
        raise UserError(f"no labelled train clips in {cdir}")
    folds = load_or_make_folds(run_dir, clips, cfg)
    n_folds = int(folds.max()) + 1
    if fold == "all":
        todo_folds = list(range(n_folds))
    else:
        try:
            todo_folds = [int(fold)]
        except ValueError:
            raise UserError(f"--fold must be 'all' or a fold number, got '{fold}'") from None
        if not 0 <= todo_folds[0] < n_folds:
            raise UserError(f"--fold {fold}: this run has folds 0..{n_folds - 1}")
    seeds = list(seeds if seeds is not None else cfg["train"]["seeds"])
    checkpoint_interval(cfg["train"])
    _check_same_settings(run_dir, cfg)
    _check_same_data(run_dir, Path(cdir))
    extra_clips, extra_records = load_extra(extra, cfg, Path(cdir), list(meta["classes"]), cfg["model"]["apex_source"],
                                            channels)
    save_config(cfg, run_dir / "config.yaml", cache=str(cdir))
    info = {"cache": str(Path(cdir).resolve()), "classes": meta["classes"], "rois": meta["rois"], "channels": channels}
    write_text_atomic(run_dir / "run.json", json.dumps(
        {**info, "cache_relative": os.path.relpath(Path(cdir).resolve(), run_dir.resolve()),
         "dataset": meta.get("dataset"), "root": meta.get("root"), "label_base": meta.get("label_base", 0),
         "model": cfg["model"]["name"], "extra": extra_records}, indent=1))
    for line in describe(extra_records):
        log.info("extra training data (training side of every fold only): %s", line)
    pairs = [(f, s) for f in todo_folds for s in seeds]
    jobs = resolve_jobs(jobs, device, len(pairs), float(cfg["train"].get("gpu_job_mb", 1500)))
    threads = int(cfg["train"]["num_threads"]) or (max(1, cpu_count() // jobs) if jobs > 1 else 0)
    log.info("run %s: %d clips, %d folds (%s), seeds %s, model %s, device %s, %d parallel job(s)", run_dir,
             len(clips), n_folds, cfg["train"]["protocol"], seeds, cfg["model"]["name"], device, jobs)
    inits = _pretrain(clips, folds, todo_folds, extra_clips, cfg, info, run_dir, cdir, device, jobs, threads)
    args = [(clips, folds, f, s, cfg, info, run_dir / f"fold{f}" / f"seed{s}", device) for f, s in pairs]
    results = in_parallel(train_one, args, jobs, "models",
                          [dict(threads=threads, extra=extra_clips, init=inits.get(f)) for f, _ in pairs])
    for res in sorted(results, key=lambda r: (r["fold"], r["seed"])):
        if "uf1" in res:
            log.info("fold %d seed %d: held-out UF1 %.4f UAR %.4f ACC %.2f%% (n=%d)", res["fold"], res["seed"],
                     res["uf1"], res["uar"], 100 * res["acc"], res["n_oof"])
    from .report import write_report_locked

    write_report_locked(run_dir)  # several processes of one run: the last to finish writes it whole
    return run_dir
