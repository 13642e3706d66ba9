"""Point-map metrics: Umeyama alignment, chamfer distances, normals, selection and degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from qvggt.eval.metrics import align_points, chamfer_metrics, estimate_normals, pointmap_metrics, umeyama

KEYS = {
    "pm_acc_mean", "pm_acc_median", "pm_comp_mean", "pm_comp_median", "pm_chamfer",
    "pm_normal_consistency", "pm_nonfinite_pct",
}  # fmt: skip


def _similarity() -> tuple[float, np.ndarray, np.ndarray]:
    return 2.5, Rotation.from_euler("xyz", [20, -35, 70], degrees=True).as_matrix(), np.array([1.0, -2.0, 0.5])


def _scene(S: int = 2, H: int = 12, W: int = 16) -> np.ndarray:
    """GT point maps [S,H,W,3]: each frame unprojects a bumpy surface through a pinhole camera."""
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    frames = []
    for s in range(S):
        z = 3.0 + 0.4 * np.sin(u / 3.0 + s) + 0.3 * np.cos(v / 4.0)
        x, y = (u - W / 2) / 10.0 * z, (v - H / 2) / 10.0 * z
        frames.append(np.stack([x + s, y, z], -1))
    return np.stack(frames)


def test_umeyama_recovers_a_similarity() -> None:
    s, R, t = _similarity()
    src = np.random.default_rng(0).normal(size=(50, 3))
    s_hat, R_hat, t_hat = umeyama(src, s * src @ R.T + t)
    assert s_hat == pytest.approx(s, abs=1e-6)
    np.testing.assert_allclose(R_hat, R, atol=1e-6)
    np.testing.assert_allclose(t_hat, t, atol=1e-6)
    s1, R1, t1 = umeyama(torch.from_numpy(src), torch.from_numpy(src @ R.T + t), with_scale=False)
    assert s1 == 1.0
    np.testing.assert_allclose(R1, R, atol=1e-6)
    np.testing.assert_allclose(t1, t, atol=1e-6)


def test_umeyama_never_returns_a_reflection() -> None:
    src = np.random.default_rng(1).normal(size=(30, 3))
    _, R, _ = umeyama(src, src * np.array([1.0, 1.0, -1.0]))  # a mirror image: the best orthogonal map reflects
    assert np.linalg.det(R) == pytest.approx(1.0)
    # coplanar points: still a proper rotation, and exact when one exists
    s, Rt, t = _similarity()
    plane = np.c_[np.random.default_rng(2).normal(size=(20, 2)), np.zeros(20)]
    s_hat, R_hat, _ = umeyama(plane, s * plane @ Rt.T + t)
    assert s_hat == pytest.approx(s) and np.allclose(R_hat, Rt, atol=1e-6)


def test_umeyama_degenerate_inputs() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        umeyama(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="identical"):
        umeyama(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        umeyama(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_similar_scene_aligns_to_zero_chamfer() -> None:
    gt = _scene()
    s, R, t = _similarity()
    pred = (gt - t) @ R / s  # gt = s R pred + t
    aligned, s_hat, _, _ = align_points(pred, gt)
    assert s_hat == pytest.approx(s)
    np.testing.assert_allclose(aligned, gt, atol=1e-9)
    m = pointmap_metrics(pred, gt, np.ones(gt.shape[:-1], bool))
    assert set(m) == KEYS
    for k in ("pm_acc_mean", "pm_acc_median", "pm_comp_mean", "pm_comp_median", "pm_chamfer"):
        assert m[k] < 1e-9
    assert m["pm_normal_consistency"] == pytest.approx(1.0)
    assert m["pm_nonfinite_pct"] == 0.0


def test_known_offset_and_known_subset() -> None:
    g = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    grid = np.c_[g, np.zeros(len(g))]
    m = chamfer_metrics(grid + [0.0, 0.0, 0.1], grid)
    for k in ("acc_mean", "acc_median", "comp_mean", "comp_median", "chamfer"):
        assert m[k] == pytest.approx(0.1)
    assert np.isnan(m["normal_consistency"])  # no normals given
    line = np.c_[np.arange(10.0), np.zeros(10), np.zeros(10)]
    m = chamfer_metrics(line[:5], line)  # prediction covers half of the GT
    assert m["acc_mean"] == 0.0 and m["acc_median"] == 0.0
    assert m["comp_mean"] == pytest.approx(1.5) and m["comp_median"] == pytest.approx(0.5)
    assert m["chamfer"] == pytest.approx(0.75)


def test_normal_consistency_known_value() -> None:
    pts = np.eye(3)
    n_gt = np.tile([0.0, 0.0, 1.0], (3, 1))
    tilt = np.deg2rad(60)
    n_pred = np.tile([np.sin(tilt), 0.0, -np.cos(tilt)], (3, 1))  # sign is ignored: |cos 60| = 0.5
    assert chamfer_metrics(pts, pts, n_pred, n_gt)["normal_consistency"] == pytest.approx(0.5)
    n_pred[0] = 0.0  # zero normals are skipped, not counted as 0
    assert chamfer_metrics(pts, pts, n_pred, n_gt)["normal_consistency"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        chamfer_metrics(pts, pts, n_pred, None)
    with pytest.raises(ValueError, match="empty"):
        chamfer_metrics(np.zeros((0, 3)), pts)


def test_normals_of_a_plane_point_map() -> None:
    n = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    H, W = 6, 7
    v, u = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    # rays of a pinhole camera hitting the plane n . X = 2 (not affine in pixels)
    rays = np.stack([(u - W / 2) / 5.0, (v - H / 2) / 5.0, np.ones_like(u, dtype=float)], -1)
    pts = rays * (2.0 / (rays @ n))[..., None]
    valid = np.ones((1, H, W), bool)
    valid[0, 3, 3] = False
    valid[0, 0, 5:] = False
    valid[0, 1, 6] = False  # holes and a ragged edge: some pixels fall back to one-sided differences
    normals = estimate_normals(pts[None], valid)
    assert normals.shape == (1, H, W, 3)
    ok = np.linalg.norm(normals, axis=-1) > 0
    np.testing.assert_allclose(np.abs(normals[ok] @ n), 1.0, atol=1e-9)
    np.testing.assert_array_equal(ok, valid)  # every valid pixel here has a valid neighbour both ways
    # a fronto-parallel plane seen by an OpenCV camera: normal +z (pixel-grid orientation)
    flat = np.stack([u, v, np.full_like(u, 4)], -1).astype(float)[None]
    np.testing.assert_allclose(estimate_normals(flat)[0, 2, 2], [0.0, 0.0, 1.0])
    isolated = np.zeros((1, H, W), bool)
    isolated[0, 2, 2] = True
    assert not estimate_normals(flat, isolated).any()


def test_all_invalid_and_nan_predictions() -> None:
    gt = _scene()
    valid = np.ones(gt.shape[:-1], bool)
    with pytest.raises(ValueError, match="no valid points"):
        pointmap_metrics(gt, gt, np.zeros_like(valid))
    with pytest.raises(ValueError, match="no valid points"):
        pointmap_metrics(gt, np.full_like(gt, np.nan), valid)
    pred = gt.copy()
    pred[0, :3] = np.nan  # 3 of 24 rows fail
    m = pointmap_metrics(pred, gt, valid)
    assert m["pm_nonfinite_pct"] == pytest.approx(100 * 3 / 24)
    assert m["pm_acc_mean"] < 1e-9  # what was predicted is right ...
    assert m["pm_comp_mean"] > 1e-3  # ... but the missing rows hurt completeness
    m = pointmap_metrics(np.full_like(gt, np.nan), gt, valid)
    assert m["pm_chamfer"] == np.inf and m["pm_normal_consistency"] == 0.0 and m["pm_nonfinite_pct"] == 100.0


def test_confidence_selection_and_deterministic_subsampling() -> None:
    gt = _scene()
    valid = np.ones(gt.shape[:-1], bool)
    conf = np.random.default_rng(0).uniform(size=valid.shape)
    pred = gt.copy()
    low = conf < np.quantile(conf, 0.5)
    pred[low] += 5.0  # garbage where the model is unsure
    assert pointmap_metrics(pred, gt, valid)["pm_chamfer"] > 0.1
    m = pointmap_metrics(pred, gt, valid, conf=conf, top_percent=50)
    assert m["pm_chamfer"] < 1e-9
    noisy = gt + np.random.default_rng(1).normal(scale=0.05, size=gt.shape)
    a = pointmap_metrics(noisy, gt, valid, max_points=100, seed=3)
    b = pointmap_metrics(torch.from_numpy(noisy), torch.from_numpy(gt), torch.from_numpy(valid), max_points=100, seed=3)
    c = pointmap_metrics(noisy, gt, valid, max_points=100, seed=4)
    assert a == b and a != c
