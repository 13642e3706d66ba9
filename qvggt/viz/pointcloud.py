"""Point clouds: PLY input/output, confidence filtering and a simple matplotlib renderer.

Shapes legend: ``S`` frames, ``H x W`` pixels per frame, ``N`` points. Point coordinates are in the VGGT
world frame, which is the first camera's OpenCV frame: x right, y down, z forward (away from the camera).
Colours are ``uint8`` RGB ``[N, 3]``; functions that take colours also accept floats in [0, 1].
Array arguments may be NumPy arrays or torch tensors (moved to CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qvggt.io import atomic_open

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "VIEWS",
    "colors_to_uint8",
    "confident_points",
    "read_ply",
    "render_points",
    "to_numpy",
    "write_ply",
]

#: Named viewpoints for :func:`render_points`, as ``(elevation_deg, azimuth_deg)`` of the viewer orbiting
#: the cloud centre. ``"camera"``: from behind the first camera, slightly above it.
VIEWS: dict[str, tuple[float, float]] = {
    "camera": (15.0, 0.0),
    "front": (0.0, 0.0),
    "top": (89.0, 0.0),
    "left": (10.0, 90.0),
    "right": (10.0, -90.0),
}


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` (NumPy array, torch tensor, or array-like) as a NumPy array, optionally cast to ``dtype``."""
    if hasattr(x, "detach"):  # torch tensor; avoids importing torch just for isinstance
        x = x.detach().cpu()
        if dtype is not None or str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()  # NumPy has no bfloat16
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def colors_to_uint8(colors: Any) -> np.ndarray:
    """RGB colours ``[..., 3]`` as uint8: integer input must lie in [0, 255]; float input in [0, 1] is scaled
    by 255 and rounded (values outside [0, 1] are clipped, non-finite ones become 0)."""
    c = to_numpy(colors)
    if np.issubdtype(c.dtype, np.integer) or c.dtype == np.bool_:
        if c.size and (c.min() < 0 or c.max() > 255):
            raise ValueError(f"integer colours must lie in [0, 255], got range [{c.min()}, {c.max()}]")
        return c.astype(np.uint8)
    c = np.nan_to_num(c.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.round(np.clip(c, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_ply(path: str | Path, points: Any, colors: Any) -> Path:
    """Write a coloured point cloud as a binary little-endian PLY, atomically.

    Args:
        path: output file; parent folders are created. Readers never see a half-written file: the data goes
            to a temp file in the same folder which then replaces ``path``.
        points: ``[N, 3]`` float xyz (stored as float32). Must be finite: filter with ``np.isfinite`` first.
        colors: ``[N, 3]`` uint8 RGB, or float RGB in [0, 1].

    Returns:
        ``path`` as a ``Path``. Vertex properties: ``x, y, z`` (float32), ``red, green, blue`` (uchar).
    """
    from plyfile import PlyData, PlyElement

    pts = to_numpy(points, np.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {tuple(pts.shape)}")
    cols = colors_to_uint8(colors)
    if cols.shape != pts.shape:
        raise ValueError(f"colors must have shape [N, 3] matching points {tuple(pts.shape)}, got {tuple(cols.shape)}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN/inf, which most PLY viewers reject; keep only np.isfinite(points).all(-1)")

    vertex = np.empty(
        len(pts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    )
    vertex["x"], vertex["y"], vertex["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    vertex["red"], vertex["green"], vertex["blue"] = cols[:, 0], cols[:, 1], cols[:, 2]
    ply = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")

    with atomic_open(path) as f:
        ply.write(f)
    return Path(path)


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY point cloud. Returns ``(points [N, 3] float32, colors [N, 3] uint8 or None if the file has no
    red/green/blue vertex properties)``."""
    from plyfile import PlyData

    data = PlyData.read(str(path))
    v = data["vertex"]
    points = np.stack([v["x"], v["y"], v["z"]], axis=-1).astype(np.float32)
    names = {p.name for p in v.properties}
    if not {"red", "green", "blue"} <= names:
        return points, None
    colors = np.stack([v["red"], v["green"], v["blue"]], axis=-1).astype(np.uint8)
    return points, colors


def confident_points(
    world_points: Any,
    conf: Any,
    images: Any,
    percentile: float = 50.0,
    mask: Any | None = None,
    max_points: int | None = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Select the confident, valid pixels of a per-frame point map, with their image colours.

    A pixel is kept if its point is finite, its confidence is finite, it is inside ``mask`` (when given), and
    its confidence is ``>=`` the ``percentile``-th percentile of the confidences of those candidate pixels
    (so ``percentile=0`` keeps every candidate and ``50`` keeps about half). If more than ``max_points``
    remain, a fixed random subset (``seed``) is kept, in the original pixel order.

    Args:
        world_points: ``[S, H, W, 3]`` xyz per pixel.
        conf: ``[S, H, W]`` confidence (higher = more reliable); a trailing singleton dim is accepted.
        images: ``[S, 3, H, W]`` RGB in [0, 1] (the model input).
        percentile: in [0, 100].
        mask: optional ``[S, H, W]`` bool, True = may be kept.
        max_points: cap on the number of points returned; ``None`` = no cap.
        seed: seed of the subsampling.

    Returns:
        ``points [N, 3] float32`` and ``colors [N, 3] uint8``, in (frame, row, column) order.
    """
    pts = to_numpy(world_points, np.float32)
    c = to_numpy(conf, np.float32)
    img = to_numpy(images)
    if pts.ndim != 4 or pts.shape[-1] != 3:
        raise ValueError(f"world_points must have shape [S, H, W, 3], got {tuple(pts.shape)}")
    s, h, w = pts.shape[:3]
    if c.shape == (s, h, w, 1):
        c = c[..., 0]
    if c.shape != (s, h, w):
        raise ValueError(f"conf must have shape {(s, h, w)} to match world_points, got {tuple(c.shape)}")
    if img.shape != (s, 3, h, w):
        raise ValueError(f"images must have shape {(s, 3, h, w)} to match world_points, got {tuple(img.shape)}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points must be >= 0 or None, got {max_points}")

    valid = np.isfinite(pts).all(-1) & np.isfinite(c)
    if mask is not None:
        m = to_numpy(mask).astype(bool)
        if m.shape != (s, h, w):
            raise ValueError(f"mask must have shape {(s, h, w)}, got {tuple(m.shape)}")
        valid &= m
    if not valid.any():
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)

    # Threshold over the candidates only, so NaNs or masked-out pixels do not shift the percentile.
    threshold = np.percentile(c[valid], percentile)
    keep = valid & (c >= threshold)
    idx = np.flatnonzero(keep)
    if max_points is not None and idx.size > max_points:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))

    points = pts.reshape(-1, 3)[idx]
    colors = colors_to_uint8(np.moveaxis(img, 1, -1).reshape(-1, 3)[idx])
    return points, colors


def _view_rotation(elev_deg: float, azim_deg: float) -> np.ndarray:
    """Rows: right, down, forward axes of a viewer with the given elevation/azimuth, in world (OpenCV) coords.

    World "up" is -y (OpenCV). Elevation > 0 puts the viewer above the scene looking down; azimuth turns the
    viewer around the vertical axis. ``(0, 0)`` looks along +z, like the first camera.
    """
    e = np.deg2rad(np.clip(elev_deg, -89.0, 89.0))  # +-90 would make forward parallel to up
    a = np.deg2rad(azim_deg)
    forward = np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
    up = np.array([0.0, -1.0, 0.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def render_points(
    points: Any,
    colors: Any,
    ax: Axes,
    view: str | tuple[float, float] = "camera",
    perspective: bool = True,
    point_size: float = 1.5,
    max_points: int | None = 100_000,
    title: str | None = None,
    focus: float | None = None,
) -> None:
    """Scatter-render a coloured point cloud onto a 2-D matplotlib axis.

    The viewer orbits the cloud's median point at a distance of ~2.5x its robust radius. Points are drawn
    far-to-near so nearer points cover farther ones; the axis limits ignore the outer 1% of points so a few
    outliers do not shrink the cloud to a dot. With ``focus``, points farther from the median point than
    ``focus`` times the median distance are left out first: a reconstruction's far background (ground seen
    at grazing angles, sparse and streaky) otherwise takes the frame and leaves the objects a few pixels wide.

    Args:
        points: ``[N, 3]`` xyz in the world frame (non-finite points are dropped).
        colors: ``[N, 3]`` uint8 RGB or float in [0, 1].
        ax: a 2-D matplotlib axis; it is cleared of ticks and given an equal aspect.
        view: a name in :data:`VIEWS` or ``(elevation_deg, azimuth_deg)``.
        perspective: perspective projection if True, else orthographic.
        point_size: scatter marker area in points^2.
        max_points: draw at most this many points (deterministic subset) to keep rendering fast.
        title: optional axis title.
        focus: if given (> 0), keep only points within ``focus`` x the median distance of the median point.
    """
    if focus is not None and not focus > 0:
        raise ValueError(f"focus must be > 0 or None, got {focus}")
    if isinstance(view, str):
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; use one of {sorted(VIEWS)} or (elevation_deg, azimuth_deg)")
        elev, azim = VIEWS[view]
    else:
        elev, azim = (float(v) for v in view)

    pts = to_numpy(points, np.float64).reshape(-1, 3)
    cols = colors_to_uint8(colors).reshape(-1, 3)
    if len(cols) != len(pts):
        raise ValueError(f"points ({len(pts)}) and colors ({len(cols)}) differ in length")
    finite = np.isfinite(pts).all(-1)
    pts, cols = pts[finite], cols[finite]
    if focus is not None and len(pts):
        dist = np.linalg.norm(pts - np.median(pts, axis=0), axis=1)
        near = dist <= focus * np.median(dist)
        pts, cols = pts[near], cols[near]
    if max_points is not None and len(pts) > max_points:
        sel = np.sort(np.random.default_rng(0).choice(len(pts), size=max_points, replace=False))
        pts, cols = pts[sel], cols[sel]

    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if len(pts) == 0:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes, color="0.4")
        return

    center = np.median(pts, axis=0)
    radius = float(np.percentile(np.linalg.norm(pts - center, axis=1), 90)) or 1.0
    cam = (pts - center) @ _view_rotation(elev, azim).T  # columns: right, down, forward
    depth = cam[:, 2] + 2.5 * radius
    if perspective:
        in_front = depth > 1e-3 * radius  # points behind the viewer cannot be projected
        cam, depth, cols = cam[in_front], depth[in_front], cols[in_front]
        u, v = cam[:, 0] / depth, -cam[:, 1] / depth  # -down = up on screen
    else:
        u, v = cam[:, 0], -cam[:, 1]
    if len(u) == 0:
        ax.text(0.5, 0.5, "no points in view", ha="center", va="center", transform=ax.transAxes, color="0.4")
        return

    order = np.argsort(-depth, kind="stable")  # far first, near last (painter's algorithm)
    ax.scatter(u[order], v[order], c=cols[order] / 255.0, s=point_size, marker=".", linewidths=0, rasterized=True)
    lo = np.percentile(np.stack([u, v], 1), 1, axis=0)
    hi = np.percentile(np.stack([u, v], 1), 99, axis=0)
    half = 0.55 * max(float((hi - lo).max()), 1e-9)  # square window, 10% margin
    mid = (lo + hi) / 2
    ax.set_xlim(mid[0] - half, mid[0] + half)
    ax.set_ylim(mid[1] - half, mid[1] + half)
    ax.set_aspect("equal")
