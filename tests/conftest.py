"""Shared fixtures: small hand-made dataset trees for the readers' tests."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_frames(folder: Path, n: int, start: int = 1, ext: str = ".png", digits: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = np.full((24, 32, 3), 128, np.uint8)
    for k in range(start, start + n):
        cv2.imwrite(str(folder / f"{k:0{digits}d}{ext}"), img)


@pytest.fixture
def tiny_dfme(tmp_path: Path) -> Path:
    """A 6-clip DFME-layout tree: train (xlsx, names + ids), test_A (csv), nested test_B (xlsx)."""
    root = tmp_path / "DFME"
    train = pd.DataFrame({
        "Filename": ["a_1", "a_2", "b_1", "b_2"],
        "Subject": ["a", "a", "b", "b"],
        "Emotion": ["happy", "Surprise", "厌恶", "anger"],
        "EmotionId": [4, 6, 2, 0],
        "Onset Frame": [1, 1, 2, 1],
        "ApexFrame": [3, 4, 3, 2],
        "OffsetFrame": [5, 6, 5, 6],
        "FPS": [200, 300, 500, 200],
    })
    root.mkdir()
    train.to_excel(root / "train.xlsx", index=False)
    pd.DataFrame({"filename": ["c_1", "c_2"], "fps": [300, 500]}).to_csv(root / "test_A.csv", index=False)
    pd.DataFrame({"Filename": ["d_1"], "Frame rate": [200]}).to_excel(root / "test_B.xlsx", index=False)
    for s in train["Filename"]:
        write_frames(root / "train_data" / s, 6)
    for s in ("c_1", "c_2"):
        write_frames(root / "test_data_A" / s, 8, ext=".jpg")
    write_frames(root / "test_data_B" / "test_data_B" / "d_1", 12, digits=1)
    return root


# ----------------------------------------------------------------------------- generated data
# One small generated DFME-layout set per test session (shared by preprocessing, training and
# submission tests): 10 subjects (7 train / 1 test_A / 2 test_B), 400x300 frames, mixed fps.

SMALL = dict(subjects=10, clips_per_subject=4, split_subjects=(7, 1, 2), width=400, height=300, seed=11,
             imbalance=1.0)


def small_config(**overrides):
    from mer.synth import SynthConfig

    return SynthConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The raw generated dataset (frames + tables); its truth is at <root>.truth."""
    from mer.synth import generate

    root = tmp_path_factory.mktemp("gen") / "DFME_small"
    generate(root, small_config(), workers=2)
    return root


def work_config(tmp: Path, **sets) -> dict:
    """The default config with caches and runs under `tmp`, plus fast training settings."""
    from mer.config import load_config

    base = [f"preprocess.cache_dir={tmp / 'cache'}", f"train.run_dir={tmp / 'runs'}",
            f"submission.out_dir={tmp / 'submissions'}", "train.epochs=25", "train.min_steps=100", "train.folds=3", "train.seeds=[0]",
            "model.sequence.depth=2", "model.sequence.dim=32", "model.sequence.heads=4"]
    return load_config(overrides=base + [f"{k}={v}" for k, v in sets.items()])



@pytest.fixture(scope="session")
def synth_cache(synth_root, tmp_path_factory):
    """(config, cache folder) of the generated set, preprocessed once for the session."""
    from mer.preprocessing import run

    tmp = tmp_path_factory.mktemp("work")
    cfg = work_config(tmp)
    cdir = run(synth_root, cfg, workers=2)
    return cfg, cdir


@pytest.fixture(scope="session")
def trained_runs(synth_cache):
    """(config, {'sequence': run dir, 'apex': run dir}) trained on the session's cache."""
    from mer.training import run_training

    cfg, cdir = synth_cache
    runs = {"sequence": run_training(cdir, cfg, "seq", jobs=2)}
    apex_cfg = {**cfg, "model": {**cfg["model"], "name": "apex_cnn"}}
    runs["apex"] = run_training(cdir, apex_cfg, "apex", jobs=2)
    return cfg, runs


def kill_after_epoch(proc, ckpt: Path, epoch: int, timeout: float = 180.0) -> None:
    """SIGKILL the process group of `proc` once checkpoint `ckpt` records `epoch` (or the timeout)."""
    import os
    import signal
    import time

    import torch

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ckpt.is_file():
            try:
                if torch.load(ckpt, weights_only=False)["epoch"] >= epoch:
                    break
            except Exception:  # noqa: BLE001 - being replaced right now
                pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

