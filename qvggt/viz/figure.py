"""Summary figure of one prediction: input frames, predicted depth, and rendered point cloud(s).

Uses ``matplotlib.figure.Figure`` with an explicit Agg canvas, so importing or calling this never changes
matplotlib's global backend and never opens a window.

Shapes legend: ``S`` frames, ``H x W`` pixels, ``N``/``M`` points. Colours: uint8 RGB or float in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qvggt.io import atomic_open
from qvggt.viz.pointcloud import render_points, to_numpy

__all__ = ["save_prediction_figure"]


def _frames_to_show(num_frames: int, max_frames: int) -> np.ndarray:
    """Indices of at most ``max_frames`` frames, evenly spread and always including the first (reference)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(int))


def save_prediction_figure(
    path: str | Path,
    images: Any,
    depth: Any,
    points: Any,
    colors: Any,
    gt_points: Any | None = None,
    gt_colors: Any | None = None,
    title: str = "",
    max_frames: int = 8,
    view: str | tuple[float, float] = (30.0, 0.0),
    dpi: int = 100,
    focus: float | None = 1.5,
    point_size: float = 3.0,
) -> Path:
    """Save a PNG summarising one prediction, atomically (temp file in the same folder, then os.replace).

    Layout: row 1 the input frames; row 2 the predicted depth of the same frames on one shared colour scale
    (2nd-98th percentile of the shown finite depths; non-finite pixels grey) with a colorbar; row 3 the
    predicted point cloud rendered with :func:`render_points`, and the ground-truth cloud beside it if given.
    At most ``max_frames`` frames are shown, evenly spread over the sequence and including frame 0.

    Args:
        path: output PNG path; parent folders are created.
        images: ``[S, 3, H, W]`` RGB in [0, 1].
        depth: ``[S, H, W]`` (or ``[S, H, W, 1]``) predicted depth.
        points, colors: predicted cloud ``[N, 3]`` and its colours ``[N, 3]`` (e.g. from ``confident_points``).
        gt_points, gt_colors: optional ground-truth cloud ``[M, 3]`` and colours ``[M, 3]``; if ``gt_colors``
            is None the points are drawn grey.
        title: figure title.
        max_frames: cap on frames shown in rows 1-2.
        view: viewpoint for the point clouds (see :func:`render_points`); the default looks down 30 degrees
            from behind the first camera, the frame VGGT predicts in.
        dpi: output resolution; the figure is about ``2.2 * frames`` inches wide.
        focus, point_size: passed to :func:`render_points` for both clouds.

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs = to_numpy(images, np.float32)
    dep = to_numpy(depth, np.float32)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must have shape [S, 3, H, W], got {tuple(imgs.shape)}")
    s, _, h, w = imgs.shape
    if dep.shape == (s, h, w, 1):
        dep = dep[..., 0]
    if dep.shape != (s, h, w):
        raise ValueError(f"depth must have shape {(s, h, w)} to match images, got {tuple(dep.shape)}")
    if s == 0:
        raise ValueError("images is empty: need at least one frame to draw")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")

    shown = _frames_to_show(s, max_frames)
    n = len(shown)
    finite = dep[shown][np.isfinite(dep[shown])]
    if finite.size:
        vmin, vmax = (float(x) for x in np.percentile(finite, [2, 98]))
        if vmax <= vmin:
            vmax = vmin + 1e-6
    else:
        vmin, vmax = 0.0, 1.0

    col_w = 2.2
    row_h = col_w * h / w
    fig_w = max(col_w * n + 0.5, 6.0)  # the point-cloud row needs room even for one frame
    cloud_h = 4.0
    fig = Figure(figsize=(fig_w, 2 * row_h + cloud_h + (0.5 if title else 0.2)), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, n + 1, width_ratios=[1.0] * n + [0.06], height_ratios=[row_h, row_h, cloud_h])

    cmap = matplotlib.colormaps["turbo"].with_extremes(bad="0.6")
    im = None
    for col, i in enumerate(shown):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(np.clip(np.moveaxis(imgs[i], 0, -1), 0.0, 1.0))
        ax.set_title(f"frame {i}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(grid[1, col])
        im = ax.imshow(np.ma.masked_invalid(dep[i]), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.axis("off")
    cbar = fig.colorbar(im, cax=fig.add_subplot(grid[1, n]))
    cbar.set_label("depth", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    fig.add_subplot(grid[0, n]).axis("off")

    has_gt = gt_points is not None
    clouds = grid[2, :].subgridspec(1, 2 if has_gt else 1, wspace=0.05)
    pred_pts = to_numpy(points, np.float32).reshape(-1, 3)
    style = {"view": view, "focus": focus, "point_size": point_size}
    render_points(pred_pts, colors, fig.add_subplot(clouds[0, 0]), title=f"predicted ({len(pred_pts)} pts)", **style)
    if has_gt:
        gt_pts = to_numpy(gt_points, np.float32).reshape(-1, 3)
        gt_cols = gt_colors if gt_colors is not None else np.full((len(gt_pts), 3), 128, np.uint8)
        render_points(
            gt_pts, gt_cols, fig.add_subplot(clouds[0, 1]), title=f"ground truth ({len(gt_pts)} pts)", **style
        )

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    return Path(path)
