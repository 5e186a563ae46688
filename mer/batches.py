"""Clips as padded tensors kept on the training device, and the batches drawn from them.

A fold's clips are normalised, padded and moved to the device once (`ClipTensors`: the whole
CCAC training set is ~100 MB); each batch is then gathered, time-shifted, cut, re-timed, mirrored
and noised there (mer/augment.py). Per batch only a few numbers per clip cross from the host, and
only the keys the model reads are built.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .augment import Draws, draw, mirror, noise

BATCH_KEYS = ("x", "times", "mask", "apex", "label", "au", "au_known")


def device_generator(device: str, seed: int) -> torch.Generator | None:
    """A seeded generator on the device (None on 'meta', which draws nothing)."""
    if torch.device(device).type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


class ClipTensors:
    """The clips of a ClipData (mer.training), normalised and padded to the longest, on `device`:
    x (N, T, R, C), times (N, T) and, as `keys` ask, apex, label, au and au_known.

    mirror_with = (ROI permutation, u channel positions) and au_perm (sided AU targets) define the
    mirrored face, for the mirror augmentation and test-time mirroring."""

    def __init__(self, clips, norm, device: str, keys: tuple[str, ...] = BATCH_KEYS,
                 au: tuple[np.ndarray, np.ndarray] | None = None,
                 mirror_with: tuple[np.ndarray, list[int]] | None = None, au_perm: np.ndarray | None = None):
        self.device, self.keys = device, tuple(keys)
        self.lengths = np.array([len(t) for t in clips.times], np.int64)
        self.steps = np.array([float(np.median(np.diff(t))) if len(t) > 1 else 0.0 for t in clips.times])
        n, t_max = len(clips), int(self.lengths.max(initial=1))
        r, c = clips.features[0].shape[1:] if n else (0, 0)
        x = np.zeros((n, t_max, r, c), np.float32)
        times = np.zeros((n, t_max), np.float32)
        for i, (f, t) in enumerate(zip(clips.features, clips.times)):
            x[i, :len(t)], times[i, :len(t)] = norm(f), t
        put = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
        self.x, self.times = put(x), put(times)
        self.data: dict[str, torch.Tensor] = {}
        if "apex" in keys and n:
            self.data["apex"] = put(np.stack(clips.apex).astype(np.float32))
        if "label" in keys:
            self.data["label"] = put(np.asarray(clips.labels, np.int64))
        if "au" in keys and au is not None:
            self.data["au"], self.data["au_known"] = put(au[0].astype(np.float32)), put(au[1].astype(bool))
        self.perm = self.u = self.au_perm = None
        if mirror_with is not None:
            self.perm, self.u = put(np.asarray(mirror_with[0], np.int64)), list(mirror_with[1])
        if au_perm is not None:
            self.au_perm = put(np.asarray(au_perm, np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray, draws: Draws | None = None, noise_sigma: float = 0.0,
              gen: torch.Generator | None = None, flip: bool = False) -> dict[str, torch.Tensor]:
        """Clips `idx` as a batch padded to its longest (mask: real steps), augmented by `draws`
        (steps prepended and cut, timestamps scaled, mirrored) plus noise of `noise_sigma` from
        `gen`; flip: every clip mirrored (test-time mirroring)."""
        idx = np.asarray(idx, np.int64)
        d = draws or Draws.none(len(idx))
        n_out = self.lengths[idx] + d.shift - d.cut
        t_out = int(n_out.max(initial=1))
        ints = torch.as_tensor(np.stack([idx, d.shift, n_out])).to(self.device, non_blocking=True)
        floats = torch.as_tensor(np.stack([d.speed, self.steps[idx]]).astype(np.float32)).to(self.device,
                                                                                           non_blocking=True)
        rows, shift, n_real = ints[0], ints[1, :, None], ints[2, :, None]
        speed, step = floats[0, :, None], floats[1, :, None]
        j = torch.arange(t_out, device=self.device)[None]
        src = j - shift                   # the stored step each output step shows (< 0: a prepended one)
        valid = j < n_real
        prepended = src < 0
        real = ~prepended & valid
        src = src.clamp(0, self.x.shape[1] - 1)
        out: dict[str, torch.Tensor] = {}
        if {"x", "times", "mask"} & set(self.keys):
            x = self.x[rows[:, None], src] * real[:, :, None, None]
            if noise_sigma > 0:
                x = noise(x, valid, noise_sigma, gen)
            times = torch.where(prepended, j * step, self.times[rows[:, None], src] + shift * step) * speed
            out.update(x=x, times=times * valid, mask=valid)
        out.update({k: v[rows] for k, v in self.data.items()})
        if flip or d.mirror.any():
            which = None if flip else torch.as_tensor(d.mirror).to(self.device, non_blocking=True)
            out = mirror(out, self.perm, self.u, self.au_perm, which)
        return {k: v for k, v in out.items() if k in self.keys}

    def in_order(self, batch_size: int, flip: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Every clip once, in order, unaugmented (evaluation, prediction)."""
        for s in range(0, len(self), batch_size):
            yield self.batch(np.arange(s, min(s + batch_size, len(self))), flip=flip)

    def shuffled(self, batch_size: int, rng: np.random.Generator, aug: dict | None = None,
                 gen: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of training batches: shuffled, each grouping clips of similar length (sorted
        within shuffled pools of 16 batches, so little time goes into padding), augmented as `aug`
        (train.augment) says when given."""
        order, pool = rng.permutation(len(self)), batch_size * 16
        groups = []
        for s in range(0, len(order), pool):
            chunk = order[s:s + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            groups += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        for g in rng.permutation(len(groups)):
            idx = groups[g]
            if aug is None:
                yield self.batch(idx)
            else:
                yield self.batch(idx, draw(self.lengths[idx], self.steps[idx], aug, rng), aug["noise"], gen)
