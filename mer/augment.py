"""Augmentations of one cached clip that respect the face and the clock.

A clip here is a dict with `features` (T, R, C), `times_ms` (T,) and `apex` (3, S, S) numpy
arrays. Every function returns a new dict and draws from the Generator it is given, so a seeded
run is reproducible.
"""

from __future__ import annotations

import numpy as np


def mirror(clip: dict, perm: np.ndarray, u_channels: list[int], au_perm: np.ndarray | None = None) -> dict:
    """The clip of the left/right mirrored face: ROIs swapped with their twins, u negated (and
    sided AU targets swapped, L12 <-> R12, when au_perm is given)."""
    f = clip["features"][:, perm].copy()
    f[..., u_channels] *= -1
    out = dict(clip, features=f)
    if au_perm is not None and "au" in clip:
        out["au"] = clip["au"][au_perm]
    if "apex" in clip:
        a = clip["apex"][:, :, ::-1].copy()
        a[0] *= -1
        out["apex"] = a
    return out


def time_shift(clip: dict, max_ms: float, rng: np.random.Generator) -> dict:
    """Start the clip up to `max_ms` earlier: neutral (zero-motion) steps prepended. A later start
    is not simulated: motion re-referenced to a later frame would not match the magnitude and
    strain channels of real clips."""
    t, f = clip["times_ms"], clip["features"]
    if len(t) < 4 or max_ms <= 0:
        return clip
    step = float(np.median(np.diff(t)))
    k = int(rng.integers(0, round(max_ms / step) + 1))
    if k > 0:
        f = np.concatenate([np.zeros((k,) + f.shape[1:], f.dtype), f])
        t = np.concatenate([np.arange(k) * step, t + k * step]).astype(t.dtype)
    return dict(clip, features=f, times_ms=t)


def crop(clip: dict, max_frac: float, rng: np.random.Generator) -> dict:
    """Drop up to `max_frac` of the steps at the end."""
    n = len(clip["times_ms"])
    cut = int(rng.integers(0, int(max_frac * n) + 1))
    if cut == 0 or n - cut < 2:
        return clip
    return dict(clip, features=clip["features"][: n - cut], times_ms=clip["times_ms"][: n - cut])


def speed(clip: dict, low: float, high: float, rng: np.random.Generator) -> dict:
    """Play the clip faster or slower: timestamps scaled, motion unchanged."""
    s = rng.uniform(low, high)
    return dict(clip, times_ms=(clip["times_ms"] * s).astype(clip["times_ms"].dtype))


def noise(clip: dict, sigma: float, rng: np.random.Generator) -> dict:
    """Gaussian noise on the features (already normalised to unit scale per channel)."""
    f = clip["features"]
    return dict(clip, features=(f + rng.normal(0, sigma, f.shape)).astype(f.dtype))


def augment(clip: dict, cfg: dict, rng: np.random.Generator, perm: np.ndarray, u_channels: list[int],
            au_perm: np.ndarray | None = None) -> dict:
    """Apply the configured augmentations (train.augment) in a fixed order."""
    if rng.random() < cfg["mirror"]:
        clip = mirror(clip, perm, u_channels, au_perm)
    clip = time_shift(clip, cfg["time_shift_ms"], rng)
    if rng.random() < 0.5:
        clip = crop(clip, cfg["crop"], rng)
    low, high = cfg["speed"]
    clip = speed(clip, low, high, rng)
    if cfg["noise"] > 0:
        clip = noise(clip, cfg["noise"], rng)
    return clip
