"""Depth + cameras -> world points, checked against the ray caster's exact world points."""

from __future__ import annotations

import numpy as np
import pytest

from qvggt.data.synthetic import make_scene
from qvggt.geometry.unproject import depth_to_world_points


@pytest.mark.parametrize("normalized", [False, True])
def test_unprojecting_exact_depth_recovers_the_rendered_points(normalized: bool) -> None:
    scene = make_scene(3, num_frames=3, height=42, width=56)
    if normalized:
        scene = scene.normalized()
    points = depth_to_world_points(scene.depth[..., None], scene.extrinsics, scene.intrinsics)
    assert points.shape == (3, 42, 56, 3) and points.dtype == np.float32
    valid = scene.valid_mask
    assert valid.sum() > 1000
    err = np.linalg.norm(points[valid] - scene.world_points[valid], axis=-1)
    scale = np.linalg.norm(scene.world_points[valid], axis=-1).mean()
    assert err.max() < 1e-4 * scale


def test_a_wrong_camera_moves_the_points() -> None:
    scene = make_scene(4, num_frames=2, height=28, width=28)
    ext = scene.extrinsics.copy()
    ext[1, 0, 3] += 0.5  # shift frame 1's camera: only its points move, by exactly that shift
    points = depth_to_world_points(scene.depth, ext, scene.intrinsics)
    valid = scene.valid_mask
    assert np.allclose(points[0][valid[0]], scene.world_points[0][valid[0]], atol=1e-4)
    moved = np.linalg.norm(points[1][valid[1]] - scene.world_points[1][valid[1]], axis=-1)
    assert np.allclose(moved, 0.5, atol=1e-4)


@pytest.mark.parametrize(
    ("depth_shape", "ext_shape", "intr_shape", "message"),
    [
        ((2, 8, 8, 2), (2, 3, 4), (2, 3, 3), "depth must have shape"),
        ((2, 8, 8), (3, 3, 4), (2, 3, 3), "extrinsics must have shape"),
        ((2, 8, 8), (2, 3, 4), (2, 4, 4), "intrinsics must have shape"),
    ],
)
def test_shape_mismatch_fails_clearly(depth_shape, ext_shape, intr_shape, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        depth_to_world_points(np.ones(depth_shape), np.zeros(ext_shape), np.ones(intr_shape))
