"""Self-supervised pretraining: masked ROI-motion modelling on cached sequences.

Some steps of a clip are hidden whole (replaced by a learned token) and some ROIs are hidden at
some steps (left out of the ROI attention, their inputs zeroed); the transformer reconstructs the
hidden motion from the rest of the face and the rest of the clip. No labels are used, so clips
of other databases, or any unlabelled footage, can join. The encoder then initialises every
classifier of its fold (`train_one(init=...)`).

Per fold, pretraining sees the training side of that fold only (never the held-out subjects, so
out-of-fold scores stay honest; with train.select=inner_val it does see the subjects that choose
the checkpoint, unlabelled), plus `pretrain.extra` caches if given. The classifiers of the fold
keep the encoder's input scale. Using a competition's
test clips there is transductive learning: it may be against a competition's rules.

Each fold's pretraining is resumable (last.pt every epoch, bit-identical on the CPU) and writes
runs/<name>/pretrain/fold<k>/encoder.pt, shared by all seeds of the fold.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .config import stable_hash
from .errors import UserError
from .models import MaskedMotionModel

log = logging.getLogger("mer.pretrain")


def pretrain_settings(cfg: dict) -> dict:
    p = dict(cfg.get("pretrain") or {})
    for key in ("mask_steps", "mask_rois"):
        if not 0.0 <= float(p[key]) < 1.0:
            raise UserError(f"pretrain.{key} must be in [0, 1), got {p[key]}")
    return p


def hide(mask: torch.Tensor, n_rois: int, p_steps: float, p_rois: float, gen: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_steps (B, T), hidden_rois (B, T, R)) drawn on real steps only; at least one step
    of every clip stays visible."""
    b, t = mask.shape
    steps = (torch.rand(b, t, generator=gen, device=mask.device) < p_steps) & mask
    steps[:, 0] &= steps.sum(1) < mask.sum(1)  # every real step hidden: show the first one
    rois = torch.rand(b, t, n_rois, generator=gen, device=mask.device) < p_rois
    rois &= mask[..., None] & ~steps[..., None]
    return steps, rois


def masked_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, hidden_steps: torch.Tensor,
                hidden_rois: torch.Tensor) -> torch.Tensor:
    """Mean squared error over what was hidden (whole steps, and hidden ROIs of visible steps)."""
    where = (hidden_steps[..., None] | hidden_rois) & mask[..., None]  # (B, T, R)
    err = ((pred - x) ** 2).mean(-1)
    return (err * where).sum() / where.sum().clamp_min(1)


def pretrain_fold(clips, cfg: dict, meta: dict, out: Path, device: str, fold: int, *, progress: bool = True,
                  threads: int = 0) -> Path:
    """Pretrain an encoder on `clips` (labels unused); returns the path of encoder.pt."""
    from .config import save_config
    from .devices import deterministic_for, set_deterministic
    from .files import write_text_atomic
    from .batches import ClipTensors, device_generator
    from .training import Normaliser, _seed_everything, build, load_checkpoint, mirror_inputs, save_atomic

    p = pretrain_settings(cfg)
    final = out / "encoder.pt"
    want = stable_hash({"model": cfg["model"], "pretrain": p})
    if final.is_file():
        if torch.load(final, map_location="cpu", weights_only=False).get("config_hash") != want:
            raise UserError(f"{final} was pretrained with other model or pretrain settings; delete {out} to "
                            "pretrain again, or use a new --name")
        return final
    if cfg["model"]["name"] != "sequence":
        raise UserError(f"--pretrain pretrains the full-sequence model; model.name is {cfg['model']['name']}")
    if len(clips) == 0:
        raise UserError(f"fold {fold}: no clips to pretrain on")
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    set_deterministic(device, deterministic_for(cfg["train"].get("deterministic", "auto"), device))
    save_config(cfg, out / "config.yaml", fold=fold)
    norm = Normaliser.fit(clips.features)
    r, c = clips.features[0].shape[1:]
    _seed_everything(fold, -2)
    model = MaskedMotionModel(build(cfg, r, c, len(meta["classes"]))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(p["lr"]), weight_decay=float(p["weight_decay"]))
    epochs = int(p["epochs"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    ckpt, start, history = out / "last.pt", 0, []
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, history = state["epoch"] + 1, state["history"]
        log.info("fold %d pretraining: resuming after epoch %d", fold, start)
    aug = cfg["train"]["augment"]
    data = ClipTensors(clips, norm, device, ("x", "times", "mask"), mirror_with=mirror_inputs(meta))
    bar = tqdm(range(start, epochs), desc=f"pretrain fold {fold}", unit="ep", file=sys.stderr, initial=start,
               total=epochs, dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        rng = _seed_everything(fold, -2, epoch)
        gen = device_generator(device, int(rng.integers(0, 2**31 - 1)))
        model.train()
        total, n = torch.zeros((), device=device), 0
        for batch in data.shuffled(int(p["batch_size"]), rng, aug, gen):
            hs, hr = hide(batch["mask"], r, float(p["mask_steps"]), float(p["mask_rois"]), gen)
            pred = model.reconstruct(batch["x"], batch["times"], batch["mask"], hr, hs)
            loss = masked_loss(pred, batch["x"], batch["mask"], hs, hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.detach() * len(batch["x"])
            n += len(batch["x"])
        sched.step()
        history.append({"epoch": epoch + 1, "loss": float(total) / max(n, 1), "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "epoch": epoch, "history": history}, ckpt)
    bar.close()
    save_atomic({"encoder": model.encoder.state_dict(), "norm_scale": norm.scale, "fold": fold, "n_clips": len(clips),
                 "config_hash": want, "history": history}, final)
    write_text_atomic(out / "history.json", json.dumps(history, indent=1))
    ckpt.unlink(missing_ok=True)
    return final


def unlabelled_extra(entries: list[str], cfg: dict, run_cache: Path, channels: list[str]):
    """Clips of other caches or database roots (same preprocessing), all splits, for pretraining
    only: their labels are never used."""
    from .extra import resolve_extra_cache
    from .training import load_clips

    parts = []
    for entry in entries:
        cdir = resolve_extra_cache(entry, cfg, run_cache)
        for split in ("train", "test_A", "test_B"):
            if (cdir / split / "manifest.csv").is_file():
                part = load_clips(cdir, split, channels=channels, blink=cfg["model"].get("blink", "none"))
                part.labels = np.full(len(part), -1)
                parts.append(part)
    out = None
    for part in parts:
        out = part if out is None else out.concat(part)
    return out
