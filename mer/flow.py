"""Dense optical flow between the reference (first) crop and a later crop, and optical strain."""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
METHODS = ("dis", "farneback")


def make_flow(method: str = "dis", preset: str = "medium", levels: int = 3, iterations: int = 3) -> FlowFn:
    """A function (ref, cur) -> (H, W, 2) float32 flow in pixels, ref(x) ~ cur(x + flow(x)).

    Farneback (2003; the reference method's flow) is the default: on sub-pixel facial motion its
    field is smoother and less noisy away from the moving skin than DIS's (Kroeger et al. 2016),
    which costs ~0.6x as much per call but trains worse models (README, Results). `levels` and
    `iterations`: Farneback's pyramid levels and iterations per level (the cost is about linear in
    the iterations; micro-motion is a pixel or two, which one level reads)."""
    for name, value in (("farneback_levels", levels), ("farneback_iters", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
            raise ValueError(f"preprocess.{name} must be an integer from 1 to 10, got {value!r}")
    if method == "dis":
        if preset not in DIS_PRESETS:
            raise ValueError(f"preprocess.dis_preset must be one of {', '.join(DIS_PRESETS)}, got '{preset}'")
        dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])

        def dis_flow(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
            return dis.calc(ref, cur, None)

        return dis_flow
    if method == "farneback":
        def farneback_flow(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
            # pyramid scale 0.5, 15 px window, polynomial n 5 / sigma 1.2
            return cv2.calcOpticalFlowFarneback(ref, cur, None, 0.5, levels, 15, iterations, 5, 1.2, 0)

        return farneback_flow
    raise ValueError(f"preprocess.flow must be one of {', '.join(METHODS)}, got '{method}'")


def flow_from_config(p: dict) -> FlowFn:
    """The flow function of a config's preprocess section."""
    return make_flow(p["flow"], p["dis_preset"], p.get("farneback_levels", 3), p.get("farneback_iters", 3))


def optical_strain(flow: np.ndarray, lin: np.ndarray | None = None) -> np.ndarray:
    """Magnitude of the infinitesimal strain tensor of a flow field, (H, W) float32, minus the
    derivatives `lin` (2 x 2, d(u, v)/d(x, y)) of an affine motion removed from the flow.

    Strain highlights local deformation of the skin and is blind to rigid translation."""
    d_dy, d_dx = np.gradient(as_complex(flow).reshape(flow.shape[:-1]))
    return strain_magnitude(d_dx, d_dy, lin).astype(np.float32)


def as_complex(flow: np.ndarray) -> np.ndarray:
    """A (H, W, 2) float32 flow as a flat complex64 view u + iv (a copy only if not contiguous)."""
    if flow.shape[-1] != 2:
        raise ValueError(f"a flow field is (H, W, 2), got shape {flow.shape}")
    return np.ascontiguousarray(flow, np.float32).reshape(-1).view(np.complex64)


def strain_magnitude(d_dx: np.ndarray, d_dy: np.ndarray, lin: np.ndarray | None = None) -> np.ndarray:
    """Magnitude of the infinitesimal strain tensor E = (J + J^T) / 2 from the flow's derivatives
    in complex form, d_dx = du/dx + i dv/dx and d_dy = du/dy + i dv/dy, less `lin`: the Jacobian
    of a motion to remove, (2, 2) or one per point (N, 2, 2).

    |E|^2 = (tr^2 + |s|^2) / 2 with the trace tr = du/dx + dv/dy and the shear
    s = (du/dx - dv/dy) + i (dv/dx + du/dy): fewer passes over the points than the four
    derivatives one by one."""
    trace = d_dx.real + d_dy.imag
    shear = d_dx + 1j * d_dy
    if lin is not None:
        lin = np.asarray(lin, trace.dtype)  # float32 derivatives stay float32
        trace = trace - (lin[..., 0, 0] + lin[..., 1, 1])
        shear = shear - ((lin[..., 0, 0] - lin[..., 1, 1]) + 1j * (lin[..., 1, 0] + lin[..., 0, 1]))
    return np.sqrt((trace * trace + shear.real ** 2 + shear.imag ** 2) * 0.5)


def flow_to_rgb(flow: np.ndarray, max_mag: float | None = None) -> np.ndarray:
    """Colour picture of a flow field (hue = direction, brightness = magnitude) for inspection."""
    mag, ang = cv2.cartToPolar(flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32))
    max_mag = max_mag or float(np.percentile(mag, 99.5)) or 1.0
    hsv = np.zeros(flow.shape[:2] + (3,), np.uint8)
    hsv[..., 0] = (ang * 90 / np.pi).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(mag / max_mag * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
