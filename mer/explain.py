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

from .errors import UserError
from .predicting import load_models
from .training import Normaliser, collate, load_clips

log = logging.getLogger("mer.explain")


def explain(cfg: dict, name: str, sample: str, out: str | None, device: str = "cpu") -> Path:
    run_dir = Path(cfg["train"]["run_dir"]) / name
    if not (run_dir / "run.json").is_file():
        raise UserError(f"no run named '{name}' in {cfg['train']['run_dir']}/ (train it first)")
    info = json.loads((run_dir / "run.json").read_text())
    cdir = Path(info["cache"])
    split, clips = None, None
    for s in ("train", "test_A", "test_B"):
        if (cdir / s / "manifest.csv").is_file():
            c = load_clips(cdir, s, channels=info.get("channels"))
            if sample in c.samples:
                split, clips = s, c
                break
    if clips is None:
        raise UserError(f"sample '{sample}' is not in the cache {cdir}")
    i = clips.samples.index(sample)
    models = load_models(run_dir, device)
    if models[0].model_name != "sequence":
        raise UserError(f"--explain needs the full-sequence model; run '{name}' holds {models[0].model_name}")
    if split == "train":
        folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample": str})
        fold = int(folds.loc[folds["sample"] == sample, "fold"].iloc[0])
        models = [m for m in models if m.fold == fold] or models
    roi_maps, time_maps, probs = [], [], []
    for m in models:
        clip = {"features": Normaliser(m.norm_scale)(clips.features[i]), "times_ms": clips.times[i],
                "apex": clips.apex[i], "label": 0}
        batch = {k: v.to(device) for k, v in collate([clip]).items()}
        with torch.no_grad():
            logits, att = m.model(batch["x"], batch["times"], batch["mask"], return_attention=True)
        probs.append(torch.softmax(logits, -1)[0].cpu().numpy())
        roi_maps.append(att["roi"][0].cpu().numpy())
        time_maps.append(att["time"][0].cpu().numpy())
    roi, tim, prob = np.mean(roi_maps, 0), np.mean(time_maps, 0), np.mean(probs, 0)
    heat = (roi * tim[:, None]).T  # (R, T)
    classes = info["classes"]
    roi_names = [r["name"] for r in info["rois"]]
    label = int(clips.labels[i])
    out_path = Path(out or f"explain_{sample}.png")
    _plot(heat, clips.times[i], roi_names, clips.features[i], sample, classes, prob, label, out_path)
    log.info("%s: predicted %s (p=%.2f)%s; wrote %s", sample, classes[int(prob.argmax())], prob.max(),
             f", true {classes[label]}" if label >= 0 else "", out_path)
    return out_path


def _plot(heat, times, roi_names, features, sample, classes, prob, label, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1.3, 1]})
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
    mag = np.hypot(features[..., 0], features[..., 1])
    im = ax.imshow(mag.T, aspect="auto", cmap="viridis", extent=ext, interpolation="nearest")
    ax.set_yticks(range(len(roi_names)), roi_names, fontsize=7)
    ax.set_title("ROI motion |(u, v)| (% of inner-eye distance)", fontsize=9)
    ax.set_xlabel("time from the first frame (ms)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
