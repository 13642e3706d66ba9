"""Array helpers shared by the metric modules (private)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def to_numpy(x: Any, dtype: type = np.float64) -> np.ndarray:
    """numpy array or torch tensor (any device/dtype, bf16 included) -> numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch tensor, checked by duck typing so torch is never imported here
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype.itemsize < 4:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def squeeze_last(x: np.ndarray, ndim: int) -> np.ndarray:
    """Drop a trailing singleton channel ([S,H,W,1] -> [S,H,W]) when ``x`` has one dim more than ``ndim``."""
    if x.ndim == ndim + 1 and x.shape[-1] == 1:
        return x[..., 0]
    return x


def top_percent_mask(conf: Any, valid: np.ndarray, top_percent: float) -> np.ndarray:
    """Keep the ``top_percent`` % most confident pixels among ``valid`` ones, pooled over all frames.

    conf, valid: same shape (any, typically [S,H,W]; conf may carry a trailing singleton channel).
    Keeps ``ceil(n_valid * top_percent / 100)`` pixels (at least one when any is valid). Ties are broken by
    flat (frame-major, row-major) pixel order, earliest first, so the selection is deterministic;
    non-finite confidences rank lowest.
    """
    if not 0.0 < float(top_percent) <= 100.0:
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    c = squeeze_last(to_numpy(conf), valid.ndim)
    if c.shape != valid.shape:
        raise ValueError(f"conf shape {c.shape} does not match the pixel grid {valid.shape}")
    c = np.where(np.isfinite(c), c, -np.inf)
    idx = np.flatnonzero(valid)
    # The small epsilon keeps e.g. 30% of 10 at 3 pixels despite 10 * 30 / 100 = 3.0000000000000004.
    k = max(1, math.ceil(len(idx) * float(top_percent) / 100.0 - 1e-9)) if len(idx) else 0
    order = np.argsort(-c.ravel()[idx], kind="stable")
    out = np.zeros(valid.size, dtype=bool)
    out[idx[order[:k]]] = True
    return out.reshape(valid.shape)
