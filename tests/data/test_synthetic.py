"""Ground-truth geometry, normalisation, determinism and argument checks of qvggt.data.synthetic.

Pixel convention under test: pixel (u, v) (column, row) is the image point (u, v); K has its principal
point at (W/2, H/2).
"""

from __future__ import annotations

import numpy as np
import pytest

from qvggt.data.synthetic import CATEGORIES, SyntheticDataset, SyntheticScene, make_batch, make_scene

H, W = 42, 70  # small, non-square (catches swapped axes)


@pytest.fixture(scope="module")
def scenes() -> list[SyntheticScene]:
    return [make_scene(seed, num_frames=5, height=H, width=W) for seed in range(len(CATEGORIES))]


def _project(scene: SyntheticScene) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates [S, H, W, 2] and camera z [S, H, W] of every world point, in float64."""
    e = scene.extrinsics.astype(np.float64)
    k = scene.intrinsics.astype(np.float64)
    x = scene.world_points.astype(np.float64)
    cam = np.einsum("sij,shwj->shwi", e[:, :, :3], x) + e[:, None, None, :, 3]
    pix = np.einsum("sij,shwj->shwi", k, cam)
    z = np.where(scene.valid_mask, pix[..., 2], 1.0)
    return pix[..., :2] / z[..., None], cam[..., 2]


def _pixel_grid(h: int, w: int) -> np.ndarray:
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([u, v], -1).astype(np.float64)


@pytest.mark.parametrize("normalized", [False, True])
def test_world_points_reproject_to_their_pixel(scenes: list[SyntheticScene], normalized: bool) -> None:
    grid = _pixel_grid(H, W)
    for scene in scenes:
        sc = scene.normalized() if normalized else scene
        pix, _ = _project(sc)
        err = np.abs(pix - grid[None])[sc.valid_mask]
        assert sc.valid_mask.any(axis=(1, 2)).all(), sc.scene_id
        assert err.max() < 1e-3, (sc.scene_id, float(err.max()))


@pytest.mark.parametrize("normalized", [False, True])
def test_depth_is_camera_z_and_invalid_pixels_are_zero(scenes: list[SyntheticScene], normalized: bool) -> None:
    for scene in scenes:
        sc = scene.normalized() if normalized else scene
        _, z = _project(sc)
        m = sc.valid_mask
        assert (sc.depth[m] > 0).all()
        np.testing.assert_allclose(sc.depth[m], z[m], rtol=2e-6, atol=1e-6)
        assert (sc.depth[~m] == 0).all() and (sc.world_points[~m] == 0).all()


def test_intrinsics_pinhole_centered(scenes: list[SyntheticScene]) -> None:
    for sc in scenes:
        k = sc.intrinsics
        assert k.shape == (5, 3, 3) and k.dtype == np.float32
        np.testing.assert_array_equal(k[:, 0, 2], W / 2)
        np.testing.assert_array_equal(k[:, 1, 2], H / 2)
        np.testing.assert_array_equal(k[:, 0, 0], k[:, 1, 1])
        np.testing.assert_array_equal(k[:, 2], np.broadcast_to([0, 0, 1], (5, 3)))
        rot = sc.extrinsics[:, :, :3].astype(np.float64)
        np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)


def test_normalization(scenes: list[SyntheticScene]) -> None:
    for sc in scenes:
        n = sc.normalized()
        assert n.is_normalized and not sc.is_normalized
        np.testing.assert_array_equal(n.extrinsics[0], np.eye(3, 4))
        pts = n.world_points[n.valid_mask].astype(np.float64)
        assert abs(np.linalg.norm(pts, axis=-1).mean() - 1.0) < 1e-5
        # Relative poses are preserved: R_i' = R_i R_0^T, camera centres map by the same similarity.
        e = sc.extrinsics.astype(np.float64)
        np.testing.assert_allclose(n.extrinsics[:, :, :3], e[:, :, :3] @ e[0, :, :3].T, atol=1e-6)
        c_world = sc.camera_centers()
        c_norm = (c_world @ e[0, :, :3].T + e[0, :, 3]) * n.scale
        np.testing.assert_allclose(n.camera_centers(), c_norm, atol=1e-5)
        np.testing.assert_allclose(n.depth, sc.depth * n.scale, rtol=1e-6)
        np.testing.assert_array_equal(n.images, sc.images)
        # Idempotent up to rounding.
        nn = n.normalized()
        np.testing.assert_allclose(nn.world_points, n.world_points, atol=1e-5)
        np.testing.assert_allclose(nn.scale, n.scale, rtol=1e-5)


def _free_space_violations(sc: SyntheticScene, extrinsics: np.ndarray) -> list[float]:
    """For frame 0's surface points seen from frame j: the fraction that frame j sees *through*, i.e. whose
    3x3 pixel neighbourhood in frame j is everywhere farther than the point. Exact geometry: ~0 (only
    discretisation at silhouettes); occlusions are allowed (those pixels are nearer, not farther)."""
    k = sc.intrinsics.astype(np.float64)
    d = np.where(sc.valid_mask, sc.depth, np.inf)
    x = sc.world_points[0][sc.valid_mask[0]].astype(np.float64)
    out = []
    for j in range(1, sc.num_frames):
        cam = x @ extrinsics[j, :, :3].T + extrinsics[j, :, 3]
        uvz = cam @ k[j].T
        u, v = np.rint(uvz[:, 0] / uvz[:, 2]).astype(int), np.rint(uvz[:, 1] / uvz[:, 2]).astype(int)
        inside = (cam[:, 2] > 0) & (u >= 1) & (u < W - 1) & (v >= 1) & (v < H - 1)
        u, v, z = u[inside], v[inside], cam[inside, 2]
        nearest = np.min([d[j, v + a, u + b] for a in (-1, 0, 1) for b in (-1, 0, 1)], axis=0)
        assert inside.sum() > 50, sc.scene_id  # the views overlap
        out.append(float(np.mean(nearest > z * 1.01)))
    return out


def test_views_agree_with_each_other(scenes: list[SyntheticScene]) -> None:
    """No view sees through a surface that another view says is there (multi-view consistency)."""
    perturbed = []
    for sc in scenes:
        e = sc.extrinsics.astype(np.float64)
        assert max(_free_space_violations(sc, e)) < 0.005, sc.scene_id
        shifted = e.copy()
        shifted[1:, 0, 3] += 0.05 * np.linalg.norm(e[1:, :, 3], axis=1)  # 5 % sideways: must be caught
        perturbed += _free_space_violations(sc, shifted)
    assert np.mean(perturbed) > 0.03


def test_scene_content_is_reasonable(scenes: list[SyntheticScene]) -> None:
    for sc in scenes:
        assert sc.images.shape == (5, 3, H, W) and sc.images.dtype == np.float32
        assert sc.depth.shape == (5, H, W) and sc.world_points.shape == (5, H, W, 3)
        assert sc.valid_mask.dtype == bool and sc.extrinsics.shape == (5, 3, 4)
        assert sc.images.min() >= 0.0 and sc.images.max() <= 1.0
        assert (sc.object_mask <= sc.valid_mask).all()
        # Objects in every frame, mostly surfaces rather than sky, and textured images.
        assert (sc.object_mask.mean(axis=(1, 2)) > 0.04).all(), sc.scene_id
        assert (sc.valid_mask.mean(axis=(1, 2)) > 0.4).all(), sc.scene_id
        assert (sc.images.std(axis=(1, 2, 3)) > 0.04).all(), sc.scene_id
        # Cameras: distinct, not collinear, above the ground, looking at the objects.
        c = sc.camera_centers()
        spread = np.linalg.norm(c - c.mean(0), axis=1).mean()
        dists = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(len(c)) * 1e9
        assert dists.min() > 0.05 * spread, sc.scene_id
        sv = np.linalg.svd(c - c.mean(0), compute_uv=False)
        assert sv[1] > 0.05 * sv[0], sc.scene_id
        assert (c[:, 2] > 0).all()
        d = sc.depth[sc.valid_mask]
        assert 1.5 < d.max() / d.min() < 100


def test_determinism_and_rng_independence() -> None:
    a = make_scene(11, num_frames=3, height=28, width=42)
    np.random.seed(123)
    np.random.rand(7)  # global RNG state must not matter
    b = make_scene(11, num_frames=3, height=28, width=42)
    for name in ("images", "depth", "world_points", "valid_mask", "object_mask", "intrinsics", "extrinsics"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    c = make_scene(12, num_frames=3, height=28, width=42, category=a.category)
    assert not np.array_equal(a.images, c.images) and not np.allclose(a.extrinsics, c.extrinsics)


def test_resolution_only_changes_sampling() -> None:
    small = make_scene(5, num_frames=2, height=28, width=42)
    big = make_scene(5, num_frames=2, height=56, width=84)
    np.testing.assert_array_equal(small.extrinsics, big.extrinsics)
    np.testing.assert_allclose(big.intrinsics[:, :2] / 2, small.intrinsics[:, :2], rtol=1e-6)


def test_categories_and_ids() -> None:
    assert len(CATEGORIES) == 8 and len(set(CATEGORIES)) == 8
    for seed in (0, 3, 8, 13):
        sc = make_scene(seed, num_frames=1, height=14, width=14)
        assert sc.category == CATEGORIES[seed % len(CATEGORIES)]
        assert sc.scene_id == f"synthetic/{sc.category}/{seed}"
    sc = make_scene(3, num_frames=2, height=14, width=28, category="towers")
    assert sc.category == "towers" and sc.scene_id == "synthetic/towers/3" and sc.images.shape == (2, 3, 14, 28)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_frames"):
        make_scene(0, num_frames=0)
    with pytest.raises(ValueError, match="126 or 140"):
        make_scene(0, height=130)
    with pytest.raises(ValueError, match=r"width=10.*14"):
        make_scene(0, width=10)
    with pytest.raises(ValueError, match=r"spheres.*flythrough"):
        make_scene(0, category="chairs")
    with pytest.raises(ValueError, match="seed"):
        make_scene(-1)
    with pytest.raises(TypeError):
        make_scene(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make_scene(0, height=True)  # type: ignore[arg-type]


def test_batch_dataset_and_torch() -> None:
    batch = make_batch([1, 2], num_frames=2, height=14, width=28)
    assert batch["images"].shape == (2, 2, 3, 14, 28) and batch["extrinsics"].shape == (2, 2, 3, 4)
    assert batch["scene_id"] == ["synthetic/boxes/1", "synthetic/pillars/2"]
    np.testing.assert_array_equal(batch["extrinsics"][:, 0], np.broadcast_to(np.eye(3, 4), (2, 3, 4)))

    ds = SyntheticDataset(3, num_frames=2, height=14, width=14)
    assert len(ds) == 3 and [s.seed for s in ds] == [0, 1, 2] and ds[1].is_normalized

    torch = pytest.importorskip("torch")
    t = ds[0].to_torch(batch_dim=True)
    assert t["images"].shape == (1, 2, 3, 14, 14) and t["images"].dtype == torch.float32
    assert t["valid_mask"].dtype == torch.bool and t["extrinsics"].shape == (1, 2, 3, 4)
