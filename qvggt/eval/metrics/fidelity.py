"""Fidelity of a quantized model to the full-precision (FP) model run on the same inputs.

Shape legend: S frames, H x W pixels; a leading batch dim of 1 ([1,S,...], as the model returns) is accepted.
The FP outputs are the reference: non-finite values there raise ValueError, while non-finite quantized outputs
are a failure (relative error inf).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qvggt.eval.metrics._common import to_numpy
from qvggt.eval.metrics.pose import pose_auc, pose_errors


def rel_l2(a: Any, b: Any) -> float:
    """Relative L2 error ||a - b|| / ||b|| over all elements of two equally shaped arrays (b the reference).

    Returns inf if ``a`` has a non-finite value; with ||b|| = 0 returns 0 when a == b, else inf.
    Raises ValueError on shape mismatch or a non-finite reference.
    """
    x, y = to_numpy(a), to_numpy(b)
    if x.shape != y.shape:
        raise ValueError(f"rel_l2 needs equal shapes, got {x.shape} and {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("rel_l2 reference (b) contains non-finite values")
    if not np.isfinite(x).all():
        return float("inf")
    diff, ref = float(np.linalg.norm((x - y).ravel())), float(np.linalg.norm(y.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def _strip_batch(x: np.ndarray, ndim: int) -> np.ndarray:
    while x.ndim > ndim and x.shape[0] == 1:
        x = x[0]
    return x


def _depth(x: Any) -> np.ndarray:
    d = to_numpy(x)
    return d[..., 0] if d.ndim >= 4 and d.shape[-1] == 1 else d  # [..,H,W,1] -> [..,H,W]


def _extrinsics(preds: Mapping[str, Any]) -> np.ndarray | None:
    """[S,3,4] from ``extrinsic``, else from ``pose_enc`` [S,9] (VGGT decoding), else None."""
    if "extrinsic" in preds:
        return _strip_batch(to_numpy(preds["extrinsic"]), 3)
    if "pose_enc" in preds:
        import torch  # local import: the metrics need torch only for this decoding

        from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri

        enc = torch.from_numpy(_strip_batch(to_numpy(preds["pose_enc"]), 2))
        extr, _ = pose_encoding_to_extri_intri(enc, build_intrinsics=False)
        return extr.numpy()
    return None


def fidelity_metrics(quant_preds: Mapping[str, Any], fp_preds: Mapping[str, Any]) -> dict[str, float]:
    """Agreement of quantized and FP model outputs for one scene.

    Both dicts hold model outputs by name: ``depth`` [S,H,W,1]|[S,H,W], ``world_points`` [S,H,W,3],
    ``pose_enc`` [S,9], optionally ``extrinsic`` [S,3,4] (otherwise decoded from ``pose_enc`` with
    :func:`qvggt.geometry.pose_encoding.pose_encoding_to_extri_intri`).
    Returns ``fid_rel_l2_depth``, ``fid_rel_l2_world_points``, ``fid_rel_l2_pose_enc`` (:func:`rel_l2`, FP as
    reference) and ``fid_pose_auc@30`` (percentage 0-100: pose AUC@30 of the quantized extrinsics with the FP
    extrinsics as ground truth, VGGT convention). A metric whose inputs are missing from either dict is NaN,
    and so is the pose AUC for a single frame (no pairs).
    """
    out: dict[str, float] = {}
    for name, load in (("depth", _depth), ("world_points", to_numpy), ("pose_enc", to_numpy)):
        has = name in quant_preds and name in fp_preds
        out[f"fid_rel_l2_{name}"] = rel_l2(load(quant_preds[name]), load(fp_preds[name])) if has else float("nan")
    q_extr, fp_extr = _extrinsics(quant_preds), _extrinsics(fp_preds)
    auc = float("nan")
    if q_extr is not None and fp_extr is not None and len(fp_extr) >= 2:
        auc = pose_auc(*pose_errors(q_extr, fp_extr), max_threshold=30)
    out["fid_pose_auc@30"] = auc
    return out
