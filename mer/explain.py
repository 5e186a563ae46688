"""Explain one clip: which facial region at which moment drove the full-sequence model.

The heatmap is the model's ROI attention at each step weighted by the CLS token's attention to
that step, averaged over the run's models that did not train on the clip (its out-of-fold models).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .batches import ClipTensors
from .errors import UserError
from .features import motion_magnitude
from .predicting import load_models, run_cache
from .training import Normaliser, load_clips

log = logging.getLogger("mer.explain")


def explain(cfg: dict, name: str, sample: str, out: str | None, device: str = "cpu") -> Path:
    run_dir = Path(cfg["train"]["run_dir"]) / name
    if not (run_dir / "run.json").is_file():
        raise UserError(f"no run named '{name}' in {cfg['train']['run_dir']}/ (train it first)")
    info = json.loads((run_dir / "run.json").read_text())
    cdir = run_cache(run_dir, info)
    models = load_models(run_dir, device)
    split, clips = None, None
    for s in ("train", "test_A", "test_B"):
        if (cdir / s / "manifest.csv").is_file():
            c = load_clips(cdir, s, channels=info.get("channels"), blink=models[0].blink)
            if sample in c.samples:
                split, clips = s, c
                break
    if clips is None:
        raise UserError(f"sample '{sample}' is not in the cache {cdir}")
    i = clips.samples.index(sample)
    if models[0].model_name != "sequence":
        raise UserError(f"--explain needs the full-sequence model; run '{name}' holds {models[0].model_name}")
    if split == "train":
        folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample": str})
        fold = int(folds.loc[folds["sample"] == sample, "fold"].iloc[0])
        models = [m for m in models if m.fold == fold] or models
    roi_maps, time_maps, probs, au_maps = [], [], [], []
    for m in models:
        batch = ClipTensors(clips.subset([i]), Normaliser(m.norm_scale), device, ("x", "times", "mask")).batch([0])
        with torch.no_grad():
            logits, att = m.model(batch["x"], batch["times"], batch["mask"], return_attention=True)
        probs.append(torch.softmax(logits, -1)[0].cpu().numpy())
        roi_maps.append(att["roi"][0].cpu().numpy())
        time_maps.append(att["time"][0].cpu().numpy())
        if m.au_vocab:
            au_maps.append(au_roi_attribution(m.model, batch))
    roi, tim, prob = np.mean(roi_maps, 0), np.mean(time_maps, 0), np.mean(probs, 0)
    heat = (roi * tim[:, None]).T  # (R, T)
    classes = info["classes"]
    roi_names = [r["name"] for r in info["rois"]]
    label = int(clips.labels[i])
    out_path = Path(out or f"explain_{sample}.png")
    au = (np.mean(au_maps, 0), models[0].au_vocab, clips.aus[i]) if au_maps else None
    motion = motion_magnitude(clips.features[i], list(info.get("channels") or []))
    _plot(heat, clips.times[i], roi_names, motion, sample, classes, prob, label, out_path, au)
    log.info("%s: predicted %s (p=%.2f)%s; wrote %s", sample, classes[int(prob.argmax())], prob.max(),
             f", true {classes[label]}" if label >= 0 else "", out_path)
    return out_path


def au_roi_share(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(V, R) on the model's device: for each AU of the auxiliary head, the share of |gradient x
    input| of its logit that falls on each ROI (summed over steps and channels)."""
    x = batch["x"].clone().requires_grad_(True)
    model.eval()
    rows = []
    for j in range(model.au_head.out_features):
        x.grad = None
        model.heads(x, batch["times"], batch["mask"])["au"][0, j].backward()
        a = (x.grad * x).abs()[0].sum(dim=(0, 2)).detach()
        rows.append(a / a.sum().clamp_min(1e-12))
    return torch.stack(rows)


def au_roi_attribution(model: torch.nn.Module, batch: dict) -> np.ndarray:
    """au_roi_share as a numpy array: which regions each AU of the head reads."""
    return au_roi_share(model, batch).cpu().numpy()


def _plot(heat, times, roi_names, motion, sample, classes, prob, label, out: Path, au=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 3 if au is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 8 + 3.2 * (rows - 2)),
                             gridspec_kw={"height_ratios": [1.3, 1, 1][:rows]})
    axes[1].sharex(axes[0])
    ax = axes[0]
    ext = [times[0], times[-1], len(roi_names) - 0.5, -0.5]
    im = ax.imshow(heat, aspect="auto", cmap="magma", extent=ext, interpolation="nearest")
    ax.set_yticks(range(len(roi_names)), roi_names, fontsize=7)
    truth = f", true {classes[label]}" if label >= 0 else ""
    top = np.argsort(prob)[::-1][:3]
    ax.set_title(f"{sample}: ROI x time attention (ROI weight x CLS attention to the step)\n"
                 f"predicted " + ", ".join(f"{classes[k]} {prob[k]:.2f}" for k in top) + truth, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax = axes[1]
    mag, what = motion
    im = ax.imshow(mag.T, aspect="auto", cmap="viridis", extent=ext, interpolation="nearest")
    ax.set_yticks(range(len(roi_names)), roi_names, fontsize=7)
    ax.set_title(what, fontsize=9)
    ax.set_xlabel("time from the first frame (ms)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    if au is not None:
        share, vocab, coded = au
        ax = axes[2]
        im = ax.imshow(share.T, aspect="auto", cmap="Greens", interpolation="nearest")
        ax.set_yticks(range(len(roi_names)), roi_names, fontsize=7)
        ax.set_xticks(range(len(vocab)), [f"AU{a}" for a in vocab], fontsize=7, rotation=90)
        ax.set_title(f"which ROIs each AU of the auxiliary head reads (share of |gradient x input| per AU); "
                     f"coded AUs: {coded or 'none'}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
