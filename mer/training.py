"""Training: subject-independent folds x seeds from the cache, with honest out-of-fold scores.

Each (fold, seed) is an independent run in runs/<name>/fold<k>/seed<s>/ (checkpoint, resolved
config, per-epoch metrics, out-of-fold logits), so runs can go to a job array or several GPUs.
A finished run is skipped; an interrupted one resumes from its last epoch checkpoint and ends
bit-identical to an uninterrupted run (every epoch reseeds from (seed, fold, epoch)).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from . import cache as C
from .augment import augment
from .cli import cpu_count
from .errors import UserError
from .config import save_config, stable_hash
from .features import mirror_permutation, roi_specs
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
    apex: list[np.ndarray]      # (3, S, S) each
    manifest: pd.DataFrame

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, idx: np.ndarray) -> "ClipData":
        idx = list(idx)
        return ClipData([self.samples[i] for i in idx], self.subjects[idx], self.labels[idx],
                        [self.features[i] for i in idx], [self.times[i] for i in idx],
                        [self.apex[i] for i in idx], self.manifest.iloc[idx].reset_index(drop=True))

    def concat(self, other: "ClipData") -> "ClipData":
        """These clips followed by `other`'s (e.g. declared extra training data)."""
        return ClipData(self.samples + other.samples, np.concatenate([self.subjects, other.subjects]),
                        np.concatenate([self.labels, other.labels]), self.features + other.features,
                        self.times + other.times, self.apex + other.apex,
                        pd.concat([self.manifest, other.manifest], ignore_index=True))

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


def load_clips(cdir: Path, split: str, apex_source: str = "motion", require_all: bool = False,
               channels: list[str] | None = None) -> ClipData:
    """Clips of a split with a usable cache entry (status ok or fallback), with the named feature
    channels (default: all cached ones).

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
    keep = channel_index(list(C.read_meta(cdir)["channels"]), channels)
    feats, times, apex = [], [], []
    for f in m["file"]:
        z = C.load_clip(cdir / f)
        feats.append(z["features"][..., keep].astype(np.float32))
        times.append(z["times_ms"].astype(np.float32))
        key = "apex_map_annotated" if apex_source == "annotated" and "apex_map_annotated" in z else "apex_map"
        apex.append(z[key].astype(np.float32))
    labels = pd.to_numeric(m["label"], errors="coerce").fillna(-1).astype(int).to_numpy()
    return ClipData(list(m["sample"].astype(str)), m["subject"].fillna("").astype(str).to_numpy(), labels,
                    feats, times, apex, m)


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


# ----------------------------------------------------------------------------- batches

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


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of clips to the longest: x (B,T,R,C), times (B,T), mask (B,T), apex, label."""
    t_max = max(len(it["times_ms"]) for it in items)
    b = len(items)
    r, c = items[0]["features"].shape[1:]
    x = np.zeros((b, t_max, r, c), np.float32)
    times = np.zeros((b, t_max), np.float32)
    mask = np.zeros((b, t_max), bool)
    for i, it in enumerate(items):
        n = len(it["times_ms"])
        x[i, :n], times[i, :n], mask[i, :n] = it["features"], it["times_ms"], True
    return {"x": torch.from_numpy(x), "times": torch.from_numpy(times), "mask": torch.from_numpy(mask),
            "apex": torch.from_numpy(np.stack([it["apex"] for it in items])),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long)}


def batches(clips: ClipData, norm: Normaliser, batch_size: int, rng: np.random.Generator | None = None,
            aug: dict | None = None, perm: np.ndarray | None = None, u_channels: list[int] | None = None):
    """Batches of a ClipData; shuffled and augmented when an RNG is given (training).

    Training batches group clips of similar length (sorted within shuffled pools of 16 batches)
    so little time goes into padding."""
    if rng is None:
        groups = [np.arange(s, min(s + batch_size, len(clips))) for s in range(0, len(clips), batch_size)]
    else:
        order, pool = rng.permutation(len(clips)), batch_size * 16
        groups = []
        for s in range(0, len(order), pool):
            chunk = order[s:s + pool]
            chunk = chunk[np.argsort([len(clips.times[i]) for i in chunk], kind="stable")]
            groups += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for group in groups:
        items = []
        for i in group:
            clip = {"features": norm(clips.features[i]), "times_ms": clips.times[i],
                    "apex": clips.apex[i], "label": int(clips.labels[i])}
            if rng is not None and aug is not None:
                clip = augment(clip, aug, rng, perm, u_channels)
            items.append(clip)
        yield collate(items)


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


def build(cfg: dict, n_rois: int, n_channels: int, n_classes: int) -> nn.Module:
    name = cfg["model"]["name"]
    if name not in cfg["model"] or not isinstance(cfg["model"][name], dict):
        raise UserError(f"model.name={name}: no settings section model.{name} in the config")
    try:
        return build_model(name, n_rois, n_channels, n_classes, **cfg["model"][name])
    except ValueError as e:
        raise UserError(str(e)) from None


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def predict_logits(model: nn.Module, clips: ClipData, norm: Normaliser, device: str,
                   batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for batch in batches(clips, norm, batch_size):
            out.append(model.forward_batch({k: v.to(device) for k, v in batch.items()}).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def epochs_for(n_clips: int, tcfg: dict) -> int:
    """train.epochs, raised on small sets so that a model gets at least train.min_steps updates."""
    per_epoch = max(1, -(-n_clips // int(tcfg["batch_size"])))
    return max(int(tcfg["epochs"]), -(-int(tcfg["min_steps"]) // per_epoch))


def train_one(clips: ClipData, folds: np.ndarray, fold: int, seed: int, cfg: dict, meta: dict,
              out: Path, device: str, progress: bool = True, threads: int = 0,
              extra: ClipData | None = None) -> dict:
    """Train one model on every fold but `fold` (plus the `extra` clips, declared extra training
    data: training side only); write its checkpoint, metrics and OOF logits."""
    tcfg = cfg["train"]
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    save_config(cfg, out / "config.yaml", fold=fold, seed=seed, cache=meta["cache"])
    n_classes = len(meta["classes"])
    train_idx, test_idx = np.nonzero(folds != fold)[0], np.nonzero(folds == fold)[0]
    train_set, oof_set = clips.subset(train_idx), clips.subset(test_idx)
    select_set = None
    if tcfg["select"] == "inner_val":
        train_set, select_set = _inner_split(train_set, tcfg["inner_val_frac"], seed)
    elif tcfg["select"] != "last":
        raise UserError(f"train.select must be last or inner_val, got '{tcfg['select']}'")
    n_extra = len(extra) if extra is not None else 0
    if n_extra:  # after the inner split: extra clips never choose a checkpoint
        train_set = train_set.concat(extra)
    norm = Normaliser.fit(train_set.features)
    perm = mirror_permutation(roi_specs(meta["rois"]))
    u_channels = [i for i, c in enumerate(meta["channels"]) if c == "u"]
    r, c = clips.features[0].shape[1:]

    _seed_everything(seed, fold, -1)
    model = build(cfg, r, c, n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    warm = max(0, int(tcfg["warmup_epochs"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (e + 1) / (warm + 1) if e < warm else tcfg["lr_gamma"] ** (e - warm))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_set.labels, n_classes, tcfg["class_weight"]).to(device),
                                  label_smoothing=tcfg["label_smoothing"])
    ckpt, history, start, best = out / "last.pt", [], 0, (-1.0, None)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history, start, best = state["history"], state["epoch"] + 1, state["best"]
        log.info("fold %d seed %d: resuming after epoch %d", fold, seed, start)

    epochs = epochs_for(len(train_set), tcfg)
    bar = tqdm(range(start, epochs), desc=f"fold {fold} seed {seed}", unit="ep", file=sys.stderr,
               initial=start, total=epochs, dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        rng = _seed_everything(seed, fold, epoch)
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for batch in batches(train_set, norm, tcfg["batch_size"], rng, tcfg["augment"], perm, u_channels):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = loss_fn(model.forward_batch(batch), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(batch["label"])
            n += len(batch["label"])
        sched.step()
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": total / max(n, 1),
               "clips_per_s": n / max(time.time() - t0, 1e-9)}
        if len(oof_set):  # diagnostics only: never used to choose a checkpoint
            s = scores(oof_set.labels, predict_logits(model, oof_set, norm, device).argmax(1), n_classes)
            row.update(heldout_uf1=s["uf1"], heldout_uar=s["uar"], heldout_acc=s["acc"])
        if select_set is not None:
            s = scores(select_set.labels, predict_logits(model, select_set, norm, device).argmax(1), n_classes)
            row["select_uf1"] = s["uf1"]
            if s["uf1"] > best[0]:
                best = (s["uf1"], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", uf1=f"{row.get('heldout_uf1', float('nan')):.3f}")
        _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "history": history, "epoch": epoch, "best": best}, ckpt)
    bar.close()

    if select_set is not None and best[1] is not None:
        model.load_state_dict(best[1])
    pd.DataFrame(history).to_csv(out / "metrics.csv", index=False)
    _save_atomic({"model": model.state_dict(), "model_name": cfg["model"]["name"],
                  "model_settings": cfg["model"][cfg["model"]["name"]], "n_rois": r, "n_channels": c, "channels": list(meta["channels"]),
                  "classes": meta["classes"], "norm_scale": norm.scale, "fold": fold, "seed": seed,
                  "apex_source": cfg["model"]["apex_source"], "config_hash": stable_hash(cfg)}, out / "model.pt")
    logits = predict_logits(model, oof_set, norm, device)
    oof = pd.DataFrame({"sample": oof_set.samples, "subject": oof_set.subjects, "dataset": oof_set.datasets,
                        "label": oof_set.labels, "fold": fold, "seed": seed})
    for k in range(n_classes):
        oof[f"logit_{k}"] = logits[:, k] if len(logits) else []
    oof.to_csv(out / "oof.csv.tmp", index=False)
    os.replace(out / "oof.csv.tmp", out / "oof.csv")  # other jobs' reports may be reading
    result = {"fold": fold, "seed": seed, "n_train": len(train_set), "n_extra": n_extra, "n_oof": len(oof_set),
              "epochs": epochs}
    if len(oof_set):
        s = scores(oof_set.labels, logits.argmax(1), n_classes)
        result.update(uf1=s["uf1"], uar=s["uar"], acc=s["acc"])
    ckpt.unlink(missing_ok=True)
    done.write_text(json.dumps(result, indent=1))
    return result


def _inner_split(clips: ClipData, frac: float, seed: int) -> tuple[ClipData, ClipData]:
    """Hold out ~frac of the training subjects to choose the checkpoint (never the test fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, round(1 / max(frac, 1e-3)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr, va = next(splitter.split(np.zeros(len(clips)), clips.labels, clips.subjects))
    return clips.subset(tr), clips.subset(va)


# ----------------------------------------------------------------------------- the whole run

def _settings_that_shape_models(cfg: dict) -> dict:
    skip = {"run_dir", "seeds", "num_threads"}
    train = {k: v for k, v in cfg["train"].items() if k not in skip}
    train["extra"] = list(train.get("extra") or [])  # runs from before extra data existed had none
    if not train["extra"]:
        train.pop("extra_class_map", None)  # means nothing without extra data
    return {"model": cfg["model"], "train": train, "preprocess": cfg["preprocess"]}


def _check_same_settings(run_dir: Path, cfg: dict) -> None:
    """A run's folds x seeds must come from one configuration: refuse to mix."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8"))
    a, b = _settings_that_shape_models(old), _settings_that_shape_models(cfg)
    if stable_hash(a) != stable_hash(b):
        diff = [f"{s}.{k}" for s in a for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k)]
        raise UserError(f"run {run_dir} was trained with other settings ({', '.join(sorted(diff)[:6])}); "
                        "use a new --name, or the same settings to finish it")


def resolve_jobs(jobs: int | str, device: str, n_runs: int) -> int:
    """'auto': one process per CPU core (each on one thread) on CPU, one on a GPU."""
    if jobs == "auto":
        jobs = 1 if device.startswith("cuda") else cpu_count()
    try:
        jobs = int(jobs)
    except ValueError:
        raise UserError(f"--jobs must be a number or auto, got '{jobs}'") from None
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
    clips = load_clips(cdir, "train", cfg["model"]["apex_source"], channels=channels)
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
    _check_same_settings(run_dir, cfg)
    extra_clips, extra_records = load_extra(extra, cfg, Path(cdir), list(meta["classes"]), cfg["model"]["apex_source"])
    save_config(cfg, run_dir / "config.yaml", cache=str(cdir))
    info = {"cache": str(Path(cdir).resolve()), "classes": meta["classes"], "rois": meta["rois"], "channels": channels}
    (run_dir / "run.json").write_text(json.dumps({**info, "dataset": meta.get("dataset"), "root": meta.get("root"),
                                                  "label_base": meta.get("label_base", 0),
                                                  "model": cfg["model"]["name"], "extra": extra_records}, indent=1))
    for line in describe(extra_records):
        log.info("extra training data (training side of every fold only): %s", line)
    pairs = [(f, s) for f in todo_folds for s in seeds]
    jobs = resolve_jobs(jobs, device, len(pairs))
    threads = int(cfg["train"]["num_threads"]) or (max(1, cpu_count() // jobs) if jobs > 1 else 0)
    log.info("run %s: %d clips, %d folds (%s), seeds %s, model %s, device %s, %d parallel job(s)", run_dir,
             len(clips), n_folds, cfg["train"]["protocol"], seeds, cfg["model"]["name"], device, jobs)
    args = [(clips, folds, f, s, cfg, info, run_dir / f"fold{f}" / f"seed{s}", device) for f, s in pairs]
    if jobs == 1:
        results = [train_one(*a, progress=True, threads=threads, extra=extra_clips) for a in args]
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        results = []
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(train_one, *a, progress=False, threads=threads, extra=extra_clips) for a in args]
            for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="models", unit="model",
                            file=sys.stderr, dynamic_ncols=True):
                results.append(fut.result())
    for res in sorted(results, key=lambda r: (r["fold"], r["seed"])):
        if "uf1" in res:
            log.info("fold %d seed %d: held-out UF1 %.4f UAR %.4f ACC %.2f%% (n=%d)", res["fold"], res["seed"],
                     res["uf1"], res["uar"], 100 * res["acc"], res["n_oof"])
    from .report import write_report

    write_report(run_dir)
    return run_dir
