"""Augmentations that respect the face and the clock, applied to padded batches on their device.

What varies per clip (mirrored or not, neutral steps prepended, steps cut at the end, playback
speed) is a handful of numbers drawn on the host from the epoch's numpy Generator (`draw`); the
features themselves are gathered, mirrored and noised where they live (mer/batches.py), so a
training set kept on a GPU never comes back to the host. A seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Draws:
    """Per-clip augmentation parameters of one batch, (B,) each."""

    mirror: np.ndarray  # bool: the left/right mirrored face
    shift: np.ndarray   # int: neutral (zero-motion) steps prepended (the clip starts earlier)
    cut: np.ndarray     # int: steps dropped at the end (of the shifted clip)
    speed: np.ndarray   # float: timestamps scaled by this (faster or slower playback)

    @classmethod
    def none(cls, n: int) -> "Draws":
        return cls(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n))


def draw(lengths: np.ndarray, steps: np.ndarray, cfg: dict, rng: np.random.Generator) -> Draws:
    """Parameters of the configured augmentations (train.augment) for clips of these lengths and
    time steps (ms):

    * mirror with probability `mirror`;
    * start up to `time_shift_ms` earlier (clips of 4 steps or more). A later start is not
      simulated: motion re-referenced to a later frame would not match the magnitude and strain
      channels of real clips;
    * for half of the clips, drop up to a fraction `crop` of the steps at the end (at least 2 stay);
    * play at a speed drawn from `speed` = [low, high]."""
    n = len(lengths)
    lengths = np.asarray(lengths, np.int64)
    mirror = rng.random(n) < cfg["mirror"]
    max_shift = np.where(lengths >= 4, np.round(cfg["time_shift_ms"] / np.maximum(steps, 1e-6)), -1)
    shift = np.where(max_shift >= 0, np.floor(rng.random(n) * (max_shift + 1)), 0).astype(np.int64)
    shifted = lengths + shift
    cut = np.floor(rng.random(n) * (np.floor(cfg["crop"] * shifted) + 1)).astype(np.int64)
    cut = np.where((rng.random(n) < 0.5) & (shifted - cut >= 2), cut, 0)
    low, high = cfg["speed"]
    return Draws(mirror, shift, cut, rng.uniform(low, high, n))


def mirror(batch: dict[str, torch.Tensor], perm: torch.Tensor, u_channels: list[int],
           au_perm: torch.Tensor | None = None, which: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The batch with the clips `which` (bool (B,); all if None) of the left/right mirrored face:
    ROIs swapped with their twins, u negated, the apex map flipped (its u negated) and sided AU
    targets swapped (L12 <-> R12) when au_perm is given."""
    out = dict(batch)

    def pick(flipped: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        if which is None:
            return flipped
        return torch.where(which.view(-1, *([1] * (plain.dim() - 1))), flipped, plain)

    if "x" in batch:
        x = batch["x"]
        sign = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
        sign[u_channels] = -1
        out["x"] = pick(x[:, :, perm] * sign, x)
    if "apex" in batch:
        a = batch["apex"]
        sign = torch.ones(a.shape[1], 1, 1, device=a.device, dtype=a.dtype)
        sign[0] = -1
        out["apex"] = pick(a.flip(-1) * sign, a)
    if au_perm is not None and "au" in batch:
        out["au"] = pick(batch["au"][:, au_perm], batch["au"])
    return out


def noise(x: torch.Tensor, valid: torch.Tensor, sigma: float, gen: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise on the real steps `valid` (B, T) of x (B, T, R, C), features normalised to unit
    scale per channel; padding stays zero."""
    n = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + sigma * n * valid[:, :, None, None]
