"""Camera-pose metrics, the Co3Dv2 protocol as VGGT's evaluation branch computes it.

Shape legend: S frames, P = S(S-1)/2 frame pairs (i < j, ordered (0,1), (0,2), ..., (S-2,S-1) as
``torch.combinations`` and :func:`pose_pairs` give them).

Extrinsics are camera-from-world [R | t] in OpenCV axes, [S,3,4] or [S,4,4], numpy or torch.

Relative poses (``convention="vggt"``, the default, exactly as the evaluation branch's ``test_co3d.py``):
every camera is first re-expressed in camera 0's frame, ``E'_k = E_k @ inv(E_0)``, then for each pair
``rel_ij = inv(E'_i) @ E'_j``. Because both pred and GT are put in camera 0's gauge first, the errors are
invariant to any similarity transform (rotation, translation, scale) of either whole scene. Note the
composition ``inv(E'_i) @ E'_j`` is not a frame-to-frame transform, so a change to camera 0 can move the
error of every pair. ``convention="cam_j_from_cam_i"`` uses the geometric relative pose ``E_j @ inv(E_i)``
(camera j from camera i), needs no alignment, is also similarity-invariant, and a change to camera k only
moves the errors of pairs involving k. Use "vggt" to compare with published numbers.

Errors, per pair, in degrees:
- rotation: geodesic angle of ``R_rel_pred^T @ R_rel_gt`` in [0, 180];
- translation: angle between the relative translation directions, folded ``min(e, 180 - e)`` (so in [0, 90];
  the sign of a direction is not scored, as in VGGT). A relative translation is "zero" when its norm is at most
  1e-9 x the largest relative-translation norm of its own scene (or exactly 0): both zero -> error 0; exactly one
  zero -> 90 (VGGT's eps-normalisation yields 90 for a zero vector; its value for both zero, also 90, is
  replaced by 0 since the directions then agree trivially).
- Non-finite predictions (NaN/inf in pred extrinsics): every pair whose error comes out non-finite gets
  ``inf`` for both errors, i.e. counts as a failure in every threshold metric and the AUC; medians can become
  inf. Under "vggt" a non-finite camera 0 therefore fails every pair. Non-finite GT raises ValueError.

Threshold metrics (RRA, RTA, AUC) are percentages (0-100), as papers report them; VGGT's code prints the
same quantities as fractions (0-1).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy.spatial.transform import Rotation

from qvggt.eval.metrics._common import to_numpy

Convention = Literal["vggt", "cam_j_from_cam_i"]

AUC_THRESHOLDS = (30, 15, 5, 3)
ACC_THRESHOLDS = (5, 15, 30)


def pose_pairs(num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices (i [P], j [P]) of every pair i < j, in the order used by all pose metrics."""
    i, j = np.triu_indices(num_frames, k=1)
    return i, j


def _as_se3(extr: Any, name: str) -> np.ndarray:
    """[S,3,4] or [S,4,4] -> [S,4,4] float64."""
    x = to_numpy(extr)
    if x.ndim != 3 or x.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"{name} extrinsics must be [S,3,4] or [S,4,4], got {x.shape}")
    out = np.zeros((x.shape[0], 4, 4))
    out[:, :3, :] = x[:, :3, :]
    out[:, 3, 3] = 1.0
    return out


def _inv_se3(E: np.ndarray) -> np.ndarray:
    """Closed-form inverse of rigid [...,4,4] transforms ([R^T | -R^T t])."""
    R_t = np.swapaxes(E[..., :3, :3], -1, -2)
    out = np.zeros_like(E)
    out[..., :3, :3] = R_t
    out[..., :3, 3] = -(R_t @ E[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def relative_poses(extrinsics: Any, convention: Convention = "vggt") -> np.ndarray:
    """Relative poses [P,4,4] of every pair i < j from extrinsics [S,3,4]|[S,4,4] (see module docstring)."""
    E = _as_se3(extrinsics, "input")
    i, j = pose_pairs(E.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        if convention == "vggt":
            E = E @ _inv_se3(E[0])  # camera 0's frame becomes the world frame
            return _inv_se3(E[i]) @ E[j]
        if convention == "cam_j_from_cam_i":
            return E[j] @ _inv_se3(E[i])
    raise ValueError(f"convention must be 'vggt' or 'cam_j_from_cam_i', got {convention!r}")


def reference_yaw_deg(extrinsics: Any) -> np.ndarray:
    """Yaw [S-1] of cameras 1..S-1 relative to camera 0, in degrees: the component along camera 0's image-vertical
    axis (y) of the rotation vector of ``R_k @ R_0^T`` (camera k from camera 0).

    For cameras moving around a scene this is the turn around it, which no single image shows (unlike the change of
    elevation, readable from the ground's tilt): a model that predicts it has matched views across frames. Cameras
    whose relative rotation is not finite get NaN.
    """
    E = _as_se3(extrinsics, "input")
    if E.shape[0] < 2:
        raise ValueError(f"reference_yaw_deg needs at least 2 cameras, got {E.shape[0]}")
    R = E[1:, :3, :3] @ E[0, :3, :3].T
    out = np.full(len(R), np.nan)  # a non-finite prediction (a diverged model) has no yaw rather than crashing
    finite = np.isfinite(R).all(axis=(1, 2))
    if finite.any():
        out[finite] = Rotation.from_matrix(R[finite]).as_rotvec(degrees=True)[:, 1]
    return out


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Geodesic angle in degrees [...] of ``R_a^T @ R_b`` for rotations [...,3,3].

    atan2(sin, cos) instead of arccos((tr - 1) / 2) keeps full precision near 0 and 180 degrees.
    """
    M = np.swapaxes(R_a, -1, -2) @ R_b
    cos = (np.trace(M, axis1=-2, axis2=-1) - 1.0) / 2.0
    skew = np.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    sin = np.linalg.norm(skew, axis=-1) / 2.0
    return np.degrees(np.arctan2(sin, cos))


def _zero_translations(t: np.ndarray) -> np.ndarray:
    """Which relative translations [P,3] count as zero (<= 1e-9 x the scene's largest, see module docstring)."""
    n = np.linalg.norm(t, axis=-1)
    finite = n[np.isfinite(n)]
    scale = finite.max() if finite.size else 0.0
    return n <= 1e-9 * scale


def translation_angle_deg(t_pred: np.ndarray, t_gt: np.ndarray) -> np.ndarray:
    """Folded angle min(e, 180 - e) in degrees [P] between translation directions [P,3] (zero rules above)."""
    zp, zg = _zero_translations(t_pred), _zero_translations(t_gt)
    cross = np.linalg.norm(np.cross(t_pred, t_gt), axis=-1)
    dot = np.sum(t_pred * t_gt, axis=-1)
    e = np.degrees(np.arctan2(cross, dot))
    e = np.minimum(e, 180.0 - e)
    e = np.where(zp ^ zg, 90.0, e)
    e = np.where(zp & zg, 0.0, e)
    return np.where(np.isfinite(t_pred).all(-1), e, np.nan)  # the zero rules must not mask a NaN prediction


def pose_errors(
    pred_extrinsics: Any, gt_extrinsics: Any, convention: Convention = "vggt"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair relative rotation and translation-direction errors in degrees.

    pred_extrinsics, gt_extrinsics: [S,3,4] or [S,4,4] camera-from-world (OpenCV), numpy or torch.
    Returns (rot_err [P], trans_err [P]); pairs ordered as :func:`pose_pairs`. Non-finite predictions give
    inf errors on the affected pairs (see the module docstring); S < 2 or non-finite GT raise ValueError.
    """
    pred, gt = _as_se3(pred_extrinsics, "predicted"), _as_se3(gt_extrinsics, "ground-truth")
    if pred.shape != gt.shape:
        raise ValueError(f"predicted and ground-truth extrinsics differ in shape: {pred.shape} vs {gt.shape}")
    if pred.shape[0] < 2:
        raise ValueError("pose metrics need at least 2 frames")
    if not np.isfinite(gt).all():
        raise ValueError("ground-truth extrinsics contain non-finite values")
    rel_pred, rel_gt = relative_poses(pred, convention), relative_poses(gt, convention)
    with np.errstate(invalid="ignore", over="ignore"):
        rot = rotation_angle_deg(rel_pred[:, :3, :3], rel_gt[:, :3, :3])
        trans = translation_angle_deg(rel_pred[:, :3, 3], rel_gt[:, :3, 3])
    failed = ~(np.isfinite(rot) & np.isfinite(trans))
    rot[failed] = np.inf
    trans[failed] = np.inf
    return rot, trans


def _errors(err: Any) -> np.ndarray:
    e = to_numpy(err).ravel()
    if e.size == 0:
        raise ValueError("no pose errors given (empty array)")
    return np.where(np.isnan(e), np.inf, e)  # NaN is a failure, never a silent skip


def rra(rot_err: Any, threshold: float) -> float:
    """Relative rotation accuracy: percentage (0-100) of pairs with rotation error strictly below ``threshold``°.

    rot_err: [P] degrees; NaN counts as a failure.
    """
    return 100.0 * float(np.mean(_errors(rot_err) < threshold))


def rta(trans_err: Any, threshold: float) -> float:
    """Relative translation accuracy: percentage (0-100) of pairs with translation error below ``threshold``°.

    trans_err: [P] degrees; NaN counts as a failure.
    """
    return 100.0 * float(np.mean(_errors(trans_err) < threshold))


def pose_auc(rot_err: Any, trans_err: Any, max_threshold: int = 30) -> float:
    """Pose AUC@max_threshold as a percentage (0-100): 100 x VGGT's ``calculate_auc_np``.

    rot_err, trans_err: [P] degrees (pool all pairs that should share one AUC, e.g. all sequences of a category).
    Per pair e = max(rot, trans); histogram with 1-degree bins ``np.arange(max_threshold + 1)`` (the last bin
    closed, as numpy does), divided by P, cumulative sum, mean over the ``max_threshold`` bins. Pairs with error
    above ``max_threshold`` (inf or NaN included) fall in no bin and so count as failures.
    """
    if int(max_threshold) != max_threshold or max_threshold < 1:
        raise ValueError(f"max_threshold must be a positive integer number of degrees, got {max_threshold}")
    r, t = _errors(rot_err), _errors(trans_err)
    if r.shape != t.shape:
        raise ValueError(f"rotation and translation errors differ in length: {r.shape} vs {t.shape}")
    max_err = np.maximum(r, t)
    hist, _ = np.histogram(max_err[np.isfinite(max_err)], bins=np.arange(int(max_threshold) + 1))
    return 100.0 * float(np.mean(np.cumsum(hist / float(max_err.size))))


def pose_metrics(pred_extrinsics: Any, gt_extrinsics: Any, convention: Convention = "vggt") -> dict[str, float]:
    """All pose metrics of one scene.

    pred_extrinsics, gt_extrinsics: [S,3,4] or [S,4,4] camera-from-world (OpenCV), S >= 2.
    Returns ``pose_auc@{30,15,5,3}``, ``rra@{5,15,30}``, ``rta@{5,15,30}`` (percentages 0-100) and
    ``rot_err_median``, ``trans_err_median`` (degrees; inf if over half the pairs failed).
    """
    rot, trans = pose_errors(pred_extrinsics, gt_extrinsics, convention)
    out = {f"pose_auc@{t}": pose_auc(rot, trans, t) for t in AUC_THRESHOLDS}
    out.update({f"rra@{t}": rra(rot, t) for t in ACC_THRESHOLDS})
    out.update({f"rta@{t}": rta(trans, t) for t in ACC_THRESHOLDS})
    out["rot_err_median"] = float(np.median(rot))
    out["trans_err_median"] = float(np.median(trans))
    return out
