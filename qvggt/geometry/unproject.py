"""Depth maps + cameras -> world points (VGGT's "depth and camera branch" point cloud).

VGGT predicts a point map directly, but the paper (and its demo's default) finds that unprojecting the
predicted depth with the predicted cameras gives more accurate points than the point head. Pixel
``(u, v)`` (column, row, from 0) has the ray ``K^-1 [u, v, 1]``: the convention of VGGT's
``unproject_depth_map_to_point_map`` and of :mod:`qvggt.data.synthetic`.
"""

from __future__ import annotations

import numpy as np


def depth_to_world_points(depth: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Unproject per-frame depth into the world frame.

    Args:
        depth: ``[S, H, W]`` or ``[S, H, W, 1]`` z-depth along each camera's optical axis.
        extrinsics: ``[S, 3, 4]`` camera-from-world ``[R | t]`` (OpenCV: ``x_cam = R x_world + t``).
        intrinsics: ``[S, 3, 3]`` pinhole matrices.

    Returns:
        ``[S, H, W, 3]`` float32 world points (``x_world = R^T (x_cam - t)``); non-finite depth stays non-finite.
    """
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim == 4 and d.shape[-1] == 1:
        d = d[..., 0]
    if d.ndim != 3:
        raise ValueError(f"depth must have shape [S, H, W] or [S, H, W, 1], got {tuple(np.shape(depth))}")
    s, h, w = d.shape
    ext = np.asarray(extrinsics, dtype=np.float64)
    intr = np.asarray(intrinsics, dtype=np.float64)
    if ext.shape != (s, 3, 4):
        raise ValueError(f"extrinsics must have shape {(s, 3, 4)} to match depth, got {tuple(ext.shape)}")
    if intr.shape != (s, 3, 3):
        raise ValueError(f"intrinsics must have shape {(s, 3, 3)} to match depth, got {tuple(intr.shape)}")

    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)  # [H, W, 3]
    rays = np.einsum("sij,hwj->shwi", np.linalg.inv(intr), pixels)  # camera-frame rays with z = 1
    cam_points = rays * d[..., None]
    rot, trans = ext[:, :, :3], ext[:, :, 3]
    world = np.einsum("sji,shwj->shwi", rot, cam_points - trans[:, None, None, :])  # R^T (x - t)
    return world.astype(np.float32)
