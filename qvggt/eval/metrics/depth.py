"""Depth-map metrics: AbsRel, RMSE and delta < 1.25 after median scale alignment.

Shape legend: S frames, H x W pixels. Depth maps are [S,H,W] or [S,H,W,1] ([H,W] is read as one frame),
numpy or torch.

Pixel selection: a pixel is *valid* when its GT depth is finite and > 0 and ``valid`` (if given) is true; with
``conf`` and ``top_percent`` only the ``top_percent`` % most confident valid pixels, ranked over the whole scene,
are *selected* (ties broken by pixel order, see :func:`top_percent_mask`). All three metrics pool the selected
pixels of all frames (every pixel weighs the same; no per-frame averaging).

Alignment (``align``): "frame" multiplies each frame's prediction by median(gt) / median(pred) over that
frame's selected pixels with a finite prediction; "scene" uses one such ratio over all frames; "none" keeps
the prediction as is.

Failed predictions: a selected pixel whose (aligned) prediction is non-finite -- NaN/inf from the model, or
a frame whose alignment scale is undefined (no finite prediction, or median prediction <= 0) -- counts as a
failure for delta1 (in the denominator, never below the threshold) and is left out of AbsRel and RMSE, which
are averaged over the selected pixels that have a finite prediction. ``depth_nonfinite_pct`` reports how many
that was, so the exclusion never hides a broken model. If no selected pixel has a finite prediction, AbsRel and
RMSE are inf and delta1 is 0. A prediction <= 0 is never within the delta threshold.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from qvggt.eval.metrics._common import squeeze_last, to_numpy, top_percent_mask

Align = Literal["frame", "scene", "none"]

DELTA_THRESHOLD = 1.25


def _depth(x: Any, name: str) -> np.ndarray:
    d = squeeze_last(to_numpy(x), 3)
    if d.ndim == 2:
        d = d[None]
    if d.ndim != 3:
        raise ValueError(f"{name} depth must be [S,H,W], [S,H,W,1] or [H,W], got {d.shape}")
    return d


def select_depth_pixels(
    gt: Any, valid: Any | None = None, conf: Any | None = None, top_percent: float | None = None
) -> np.ndarray:
    """Boolean [S,H,W] mask of the pixels the depth metrics use (see the module docstring).

    gt: [S,H,W]|[S,H,W,1]; valid, conf: same pixel grid or None. Raises ValueError when nothing is valid.
    """
    g = _depth(gt, "ground-truth")
    with np.errstate(invalid="ignore"):
        sel = np.isfinite(g) & (g > 0)
    if valid is not None:
        v = squeeze_last(to_numpy(valid, bool), 3)
        v = v[None] if v.ndim == 2 else v
        if v.shape != g.shape:
            raise ValueError(f"valid mask of shape {v.shape} does not match depth {g.shape}")
        sel &= v
    if not sel.any():
        raise ValueError("no valid depth pixels (need ground truth finite and > 0 inside the valid mask)")
    if top_percent is not None:
        if conf is None:
            raise ValueError("top_percent needs a conf array")
        c = squeeze_last(to_numpy(conf), 3)
        sel = top_percent_mask(c[None] if c.ndim == 2 else c, sel, top_percent)
    return sel


def _scale(pred: np.ndarray, gt: np.ndarray, use: np.ndarray) -> float:
    """median(gt) / median(pred) over ``use``; NaN when undefined (no pixel, or median prediction <= 0)."""
    if not use.any():
        return float("nan")
    mp = float(np.median(pred[use]))
    return float(np.median(gt[use])) / mp if mp > 0 else float("nan")


def depth_metrics(
    pred: Any,
    gt: Any,
    valid: Any | None = None,
    conf: Any | None = None,
    top_percent: float | None = None,
    align: Align = "frame",
) -> dict[str, float]:
    """AbsRel, RMSE and delta1 of predicted against GT depth, pooled over all selected pixels of a scene.

    pred, gt: [S,H,W] or [S,H,W,1]; valid: bool [S,H,W] or None; conf: [S,H,W] (or [S,H,W,1]) or None, used
    only with ``top_percent`` in (0, 100]. ``align``: "frame" | "scene" | "none" (module docstring).
    Returns ``depth_abs_rel`` = mean |p - g| / g, ``depth_rmse`` = sqrt(mean (p - g)^2) (GT units),
    ``depth_delta1`` = percentage (0-100) of selected pixels with max(p/g, g/p) < 1.25, and
    ``depth_nonfinite_pct`` = percentage of selected pixels whose prediction failed (non-finite).
    Raises ValueError on shape mismatch or when no pixel is valid ("no valid depth pixels ...").
    """
    p, g = _depth(pred, "predicted"), _depth(gt, "ground-truth")
    if p.shape != g.shape:
        raise ValueError(f"predicted and ground-truth depth differ in shape: {p.shape} vs {g.shape}")
    sel = select_depth_pixels(g, valid, conf, top_percent)
    finite = np.isfinite(p)

    if align == "none":
        scale = np.ones(len(p))
    elif align == "frame":
        scale = np.array([_scale(p[f], g[f], sel[f] & finite[f]) for f in range(len(p))])
    elif align == "scene":
        scale = np.full(len(p), _scale(p, g, sel & finite))
    else:
        raise ValueError(f"align must be 'frame', 'scene' or 'none', got {align!r}")

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = p * scale[:, None, None]
        ok = sel & np.isfinite(p)
        n_sel, n_ok = int(sel.sum()), int(ok.sum())
        pv, gv = p[ok], g[ok]
        if n_ok:
            abs_rel = float(np.mean(np.abs(pv - gv) / gv))
            rmse = float(np.sqrt(np.mean((pv - gv) ** 2)))
        else:
            abs_rel = rmse = float("inf")
        hit = (pv > 0) & (np.maximum(pv / gv, gv / pv) < DELTA_THRESHOLD)
    return {
        "depth_abs_rel": abs_rel,
        "depth_rmse": rmse,
        "depth_delta1": 100.0 * float(hit.sum()) / n_sel,
        "depth_nonfinite_pct": 100.0 * (n_sel - n_ok) / n_sel,
    }
