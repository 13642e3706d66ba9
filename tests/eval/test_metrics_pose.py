"""Camera-pose metrics (Co3Dv2 protocol) against known answers and a transcription of VGGT's evaluation code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from qvggt.eval.metrics import pose_auc, pose_errors, pose_metrics, pose_pairs, reference_yaw_deg, rra, rta
from qvggt.geometry.rotation import mat_to_quat

CONVENTIONS = ("vggt", "cam_j_from_cam_i")


def _cameras(n: int = 5, seed: int = 0) -> np.ndarray:
    """Random camera-from-world extrinsics [n,3,4] with distinct centres."""
    rng = np.random.default_rng(seed)
    R = Rotation.random(n, random_state=seed).as_matrix()
    t = rng.normal(size=(n, 3)) * 2.0
    return np.concatenate([R, t[..., None]], axis=-1)


def _rot_y(deg: float) -> np.ndarray:
    return Rotation.from_euler("y", deg, degrees=True).as_matrix()


def _perturb(E: np.ndarray, k: int, D: np.ndarray) -> np.ndarray:
    """Rotate camera k in place about its own centre: E_k -> D @ E_k."""
    out = E.copy()
    out[k] = D @ E[k]
    return out


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_identical_poses_are_perfect(convention: str) -> None:
    E = _cameras()
    rot, trans = pose_errors(E, E, convention)
    assert rot.shape == trans.shape == (10,)
    assert np.abs(rot).max() < 1e-6 and np.abs(trans).max() < 1e-6
    m = pose_metrics(E, E, convention)
    assert set(m) == {
        "pose_auc@30", "pose_auc@15", "pose_auc@5", "pose_auc@3",
        "rra@5", "rra@15", "rra@30", "rta@5", "rta@15", "rta@30",
        "rot_err_median", "trans_err_median",
    }  # fmt: skip
    for key in ("pose_auc@30", "pose_auc@15", "pose_auc@5", "pose_auc@3", "rra@5", "rta@30"):
        assert m[key] == pytest.approx(100.0)
    assert m["rot_err_median"] < 1e-6 and m["trans_err_median"] < 1e-6


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_rotating_one_camera_moves_only_its_pairs(convention: str) -> None:
    E, k = _cameras(), 2
    rot, trans = pose_errors(_perturb(E, k, _rot_y(10.0)), E, convention)
    i, j = pose_pairs(len(E))
    involved = (i == k) | (j == k)
    np.testing.assert_allclose(rot[involved], 10.0, atol=1e-9)
    np.testing.assert_allclose(rot[~involved], 0.0, atol=1e-9)
    np.testing.assert_allclose(trans[~involved], 0.0, atol=1e-6)


def test_camera_zero_under_both_conventions() -> None:
    E = _cameras()
    pred = _perturb(E, 0, _rot_y(10.0))
    i, _ = pose_pairs(len(E))
    rot, _ = pose_errors(pred, E, "cam_j_from_cam_i")
    np.testing.assert_allclose(rot[i == 0], 10.0, atol=1e-9)
    np.testing.assert_allclose(rot[i != 0], 0.0, atol=1e-9)
    # VGGT aligns everything to camera 0 and composes inv(E'_i) @ E'_j, so camera 0 leaks into other pairs.
    rot, _ = pose_errors(pred, E, "vggt")
    np.testing.assert_allclose(rot[i == 0], 10.0, atol=1e-9)
    assert rot[i != 0].max() > 0.1


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_similarity_of_the_scene_changes_nothing(convention: str) -> None:
    E = _cameras(6, seed=1)
    Q = Rotation.from_euler("xyz", [30, -50, 110], degrees=True).as_matrix()
    d, s = np.array([3.0, -1.0, 7.0]), 4.5
    # World points X' = s Q X + d; the same images need R' = R Q^T, t' = s t - R Q^T d.
    R = E[:, :, :3] @ Q.T
    t = s * E[:, :, 3] - (R @ d)
    pred = np.concatenate([R, t[..., None]], axis=-1)
    rot, trans = pose_errors(pred, E, convention)
    assert np.abs(rot).max() < 1e-6 and np.abs(trans).max() < 1e-6


def _vggt_reference(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transcription of the evaluation branch's align_to_first_camera + se3_to_relative_pose_error."""

    def se3(E: np.ndarray) -> torch.Tensor:
        out = torch.eye(4, dtype=torch.float64).repeat(len(E), 1, 1)
        out[:, :3, :] = torch.from_numpy(E)
        return out

    def inv(T: torch.Tensor) -> torch.Tensor:
        out = torch.eye(4, dtype=T.dtype).repeat(len(T), 1, 1)
        out[:, :3, :3] = T[:, :3, :3].transpose(1, 2)
        out[:, :3, 3:] = -out[:, :3, :3] @ T[:, :3, 3:]
        return out

    p, g = se3(pred), se3(gt)
    p, g = p @ inv(p[:1]), g @ inv(g[:1])
    i1, i2 = torch.combinations(torch.arange(len(p)), 2).unbind(-1)
    rp, rg = inv(p[i1]) @ p[i2], inv(g[i1]) @ g[i2]
    q_p, q_g = mat_to_quat(rp[:, :3, :3]), mat_to_quat(rg[:, :3, :3])
    loss_q = (1 - (q_p * q_g).sum(1) ** 2).clamp(min=1e-15)
    r_err = torch.rad2deg(torch.arccos(1 - 2 * loss_q))
    t, t_gt = rp[:, :3, 3], rg[:, :3, 3]
    t = t / (t.norm(dim=1, keepdim=True) + 1e-15)
    t_gt = t_gt / (t_gt.norm(dim=1, keepdim=True) + 1e-15)
    loss_t = torch.clamp_min(1.0 - (t * t_gt).sum(1) ** 2, 1e-15)
    t_err = torch.rad2deg(torch.acos(torch.sqrt(1 - loss_t)))
    t_err = torch.minimum(t_err, (180 - t_err).abs())
    return r_err.numpy(), t_err.numpy()


def test_matches_vggt_evaluation_code_on_noisy_poses() -> None:
    gt = _cameras(8, seed=3)
    rng = np.random.default_rng(4)
    noise = Rotation.from_rotvec(rng.normal(size=(8, 3)) * 0.15).as_matrix()
    pred = np.concatenate([noise @ gt[:, :, :3], (gt[:, :, 3] + rng.normal(size=(8, 3)) * 0.3)[..., None]], -1)
    rot, trans = pose_errors(pred, gt)
    r_ref, t_ref = _vggt_reference(pred, gt)
    np.testing.assert_allclose(rot, r_ref, atol=1e-5)
    np.testing.assert_allclose(trans, t_ref, atol=1e-5)
    assert rot.max() > 5 and trans.max() > 5  # the check covers non-trivial errors


def test_auc_matches_hand_computation() -> None:
    rot = np.array([0.5, 2.5, 4.0, 10.0, 40.0])
    trans = np.array([1.5, 0.2, 4.5, 3.0, 0.0])
    # max errors 1.5, 2.5, 4.5, 10, 40; fraction per pair 0.2
    assert pose_auc(rot, trans, 3) == pytest.approx(100 * (0 + 0.2 + 0.4) / 3)
    assert pose_auc(rot, trans, 5) == pytest.approx(100 * (0 + 0.2 + 0.4 + 0.4 + 0.6) / 5)
    assert pose_auc(rot, trans, 30) == pytest.approx(100 * (0.2 + 0.4 + 0.4 + 6 * 0.6 + 20 * 0.8) / 30)
    # numpy's last histogram bin is closed: an error of exactly 30 counts in AUC@30's last bin
    assert pose_auc([30.0], [0.0], 30) == pytest.approx(100 / 30)
    assert rra(rot, 5) == pytest.approx(60.0) and rta(trans, 5) == pytest.approx(100.0)
    assert rra([5.0], 5) == 0.0  # strictly below, as VGGT's `< 5`
    with pytest.raises(ValueError, match="positive integer"):
        pose_auc(rot, trans, 0)


def test_fewer_than_two_frames_raises() -> None:
    E = _cameras(1)
    with pytest.raises(ValueError, match="pose metrics need at least 2 frames"):
        pose_metrics(E, E)
    with pytest.raises(ValueError, match="differ in shape"):
        pose_errors(_cameras(3), _cameras(4))
    with pytest.raises(ValueError, match="3,4"):
        pose_errors(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_nan_prediction_fails_its_pairs(convention: str) -> None:
    E = _cameras()
    pred = E.copy()
    pred[3, 1, 2] = np.nan
    rot, trans = pose_errors(pred, E, convention)
    i, j = pose_pairs(len(E))
    involved = (i == 3) | (j == 3)
    assert np.isinf(rot[involved]).all() and np.isinf(trans[involved]).all()
    assert np.abs(rot[~involved]).max() < 1e-6
    m = pose_metrics(pred, E, convention)
    assert m["pose_auc@30"] == pytest.approx(60.0) and m["rra@5"] == pytest.approx(60.0)


def test_nan_camera_zero_fails_everything_under_vggt() -> None:
    E = _cameras()
    pred = E.copy()
    pred[0] = np.nan
    m = pose_metrics(pred, E)
    assert m["pose_auc@30"] == 0.0 and m["rra@30"] == 0.0 and m["rot_err_median"] == np.inf
    gt = E.copy()
    gt[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="ground-truth extrinsics contain non-finite"):
        pose_metrics(E, gt)


def test_zero_length_relative_translation() -> None:
    gt = _cameras(3)
    centre = -gt[0, :, :3].T @ gt[0, :, 3]
    gt[1, :, 3] = -gt[1, :, :3] @ centre  # cameras 0 and 1 share a centre
    _, trans = pose_errors(gt, gt)
    assert trans[0] == 0.0  # both zero: directions agree trivially
    pred = gt.copy()
    pred[1, :, 3] += np.array([0.0, 0.0, 1.0])
    _, trans = pose_errors(pred, gt)
    assert trans[0] == pytest.approx(90.0)  # exactly one zero: maximal (folded) error, as VGGT
    pred[1, 0, 3] = np.nan
    assert np.isinf(pose_errors(pred, gt)[1][0])  # a NaN translation stays a failure despite the zero GT


def test_accepts_torch_and_4x4() -> None:
    E = _cameras()
    E4 = np.tile(np.eye(4), (len(E), 1, 1))
    E4[:, :3] = E
    rot, trans = pose_errors(torch.from_numpy(E4).float(), torch.from_numpy(E))
    assert rot.max() < 1e-3 and trans.max() < 1e-3


def test_reference_yaw_is_the_turn_about_camera_zeros_vertical_axis() -> None:
    E = _cameras(4, seed=3)
    E[1] = _perturb(E, 0, _rot_y(25.0))[0]  # camera 0 turned 25 deg about its own y axis
    E[2] = _perturb(E, 0, Rotation.from_euler("x", 15.0, degrees=True).as_matrix())[0]  # tilted: no yaw
    E[3] = _perturb(E, 0, _rot_y(-40.0))[0]
    np.testing.assert_allclose(reference_yaw_deg(E), [25.0, 0.0, -40.0], atol=1e-9)
    # A rotation of the whole world (extrinsics act on world points: E_k -> E_k @ W) changes no relative yaw.
    W = np.eye(4)
    W[:3, :3] = Rotation.random(random_state=5).as_matrix()
    np.testing.assert_allclose(reference_yaw_deg(E @ W), [25.0, 0.0, -40.0], atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 cameras"):
        reference_yaw_deg(E[:1])
    E[2, 0, 0] = np.nan  # a diverged prediction: no yaw for that camera, the others unchanged
    np.testing.assert_allclose(reference_yaw_deg(E), [25.0, np.nan, -40.0], atol=1e-9)
