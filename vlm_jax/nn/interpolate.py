"""Bicubic resizing of position-embedding grids, matching torch.nn.functional.interpolate.

DINOv2 interpolates its learned position table whenever the input image has another size
than the config's. The resize is separable, so it is two small matrices built in numpy at
trace time (shapes are static) and applied with one einsum: exact to float32 rounding of
torch's `mode="bicubic", align_corners=False` with and without `antialias=True`.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """Weights W [out_size, in_size] with resized = W @ signal along one axis.

    Without antialias this is torch's upsample_bicubic2d (Keys cubic, a = -0.75, source
    index (i + 0.5) * in / out - 0.5, border taps clamped). With antialias it is torch's
    separable antialiased kernel (PIL-style, a = -0.5, support widened by the scale when
    downsampling, weights normalised per output).
    """
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), dtype=np.float64)
    if not antialias:
        for i in range(out_size):
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            t = src - base
            taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for offset, weight in zip(range(-1, 3), taps):
                w[i, min(max(base + offset, 0), in_size - 1)] += weight
        return w.astype(np.float32)
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv_scale, -0.5)
        total = taps.sum()
        w[i, lo:hi] = taps / total if total != 0 else taps
    return w.astype(np.float32)
