"""Blinks: found in the eyelid ROIs, and kept away from the regions they contaminate.

A blink drags the upper lid down by about the eye's opening in ~100-250 ms, in every class of
emotion. Both lower-eyelid ROIs then move down together, by several times what any AU moves them
(AU6 and AU7 raise the lower lid; a blink pulls it down with the upper lid), and the flow spreads
the lid's motion into the brow boxes above. The score of a step is how far both eyelids moved
down together, in % of the inner-eye distance (the cached feature unit): 0 below `low`, 1 above
`high`, linear in between.

`model.blink` then treats the brow and eyelid ROIs of blink steps as:
  mask    zeroed (no information),
  gate    scaled by 1 - score,
  interp  replaced by a linear interpolation between the nearest blink-free steps (what the
          region did just before and after, as if the lid had stayed open).
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "mask", "gate", "interp")
BROW_LANDMARKS = set(range(17, 27))
EYE_LANDMARKS = set(range(36, 48))
LOW, HIGH = 1.0, 3.0  # % of the inner-eye distance: AUs stay below ~0.7, blinks reach 4-8


LOWER_LIDS = ({40, 41}, {46, 47})  # iBUG-68, 0-based: the lower lid of each eye


def eyelid_rois(rois: list[dict]) -> list[int]:
    """The lower-eyelid ROIs (boxes on landmarks 40-41 or 46-47 only): where a blink is measured."""
    return [i for i, r in enumerate(rois) if any(set(r["landmarks"]) <= lid for lid in LOWER_LIDS)]


def affected_rois(rois: list[dict]) -> list[int]:
    """The ROIs a blink contaminates: those on the brows or around the eyes."""
    return [i for i, r in enumerate(rois) if set(r["landmarks"]) <= BROW_LANDMARKS | EYE_LANDMARKS]


def blink_score(features: np.ndarray, rois: list[dict], channels: list[str], low: float = LOW,
                high: float = HIGH) -> np.ndarray:
    """(T,) in [0, 1]: how much each step is a blink, from the downward motion v shared by both
    eyelid ROIs (the smaller of the two: a blink closes both eyes). Zero if the ROIs or the v
    channel are missing."""
    eyes = eyelid_rois(rois)
    if "v" not in channels or len(eyes) < 2:
        return np.zeros(len(features), np.float32)
    v = features[:, eyes, channels.index("v")].min(axis=1)
    return np.clip((v - low) / (high - low), 0.0, 1.0).astype(np.float32)


def suppress_blinks(features: np.ndarray, rois: list[dict], channels: list[str], mode: str) -> np.ndarray:
    """Features with the brow and eyelid ROIs of blink steps masked, gated or interpolated
    (see the module docstring); mode 'none' returns them unchanged."""
    if mode not in MODES:
        raise ValueError(f"model.blink must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "none":
        return features
    score = blink_score(features, rois, channels)
    if not score.any():
        return features
    out = features.copy()
    idx = affected_rois(rois)
    if mode == "gate":
        out[:, idx] *= (1.0 - score)[:, None, None]
        return out
    blink = score > 0  # any sign of the lid coming down
    if mode == "mask":
        out[np.ix_(blink, idx)] = 0.0
        return out
    steps = np.arange(len(features))
    clear = ~blink
    if not clear.any():
        out[:, idx] = 0.0
        return out
    for r in idx:
        for c in range(features.shape[2]):
            out[blink, r, c] = np.interp(steps[blink], steps[clear], features[clear, r, c])
    return out
