"""Point-map metrics: similarity alignment (Umeyama), accuracy / completeness / chamfer, normal consistency.

Shape legend: N predicted points, M GT points, S frames, H x W pixels; point maps are [S,H,W,3]. Distances are
in GT units (after aligning the prediction to the GT by a similarity, so the prediction's scale is irrelevant).

Failed predictions: selected pixels whose predicted point is non-finite are left out of the alignment and of
the predicted point set (the GT set keeps them, so missing predictions worsen completeness);
``pm_nonfinite_pct`` reports their share. With fewer than 3 finite predicted points left, no alignment
exists: distances are inf and normal consistency 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from qvggt.eval.metrics._common import squeeze_last, to_numpy, top_percent_mask


def umeyama(src: Any, dst: Any, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s * R @ src + t`` (Umeyama 1991), a proper rotation (det R = +1).

    src, dst: [N,3] corresponding points, N >= 3, finite. Returns (s, R [3,3], t [3]); s = 1 when
    ``with_scale`` is False. A reflection, should the best orthogonal fit be one, is replaced by the best
    rotation (the sign of the smallest singular direction flipped), as in the paper.
    Raises ValueError for fewer than 3 points, non-finite input or all source points identical.
    """
    x, y = to_numpy(src), to_numpy(dst)
    if x.ndim != 2 or x.shape[1] != 3 or x.shape != y.shape:
        raise ValueError(f"umeyama needs two [N,3] arrays of equal shape, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"umeyama needs at least 3 point pairs, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("umeyama got non-finite points")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var_x = float(np.mean(np.sum(xc**2, axis=1)))
    if var_x <= 1e-300:
        raise ValueError("umeyama: all source points are identical, the similarity is undefined")
    U, D, Vt = np.linalg.svd(yc.T @ xc / len(x))
    sign = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        sign[2] = -1.0
    R = (U * sign) @ Vt
    s = float(np.sum(D * sign) / var_x) if with_scale else 1.0
    return s, R, my - s * R @ mx


def align_points(
    pred: Any, gt: Any, mask: Any | None = None, with_scale: bool = True
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Align predicted points to GT with the Umeyama similarity fitted on the corresponding masked points.

    pred, gt: [...,3] with the same shape (e.g. [S,H,W,3] or [N,3]); mask: bool [...] or None (all). Points
    non-finite in either array are left out of the fit. Returns (aligned [...,3] = s * R @ p + t for every
    point, s, R [3,3], t [3]). Raises ValueError as :func:`umeyama` does (e.g. fewer than 3 usable points).
    """
    p, g = to_numpy(pred), to_numpy(gt)
    if p.shape != g.shape or p.shape[-1] != 3:
        raise ValueError(f"pred and gt must be [...,3] of equal shape, got {p.shape} and {g.shape}")
    use = np.isfinite(p).all(-1) & np.isfinite(g).all(-1)
    if mask is not None:
        use &= to_numpy(mask, bool).reshape(use.shape)
    s, R, t = umeyama(p[use], g[use], with_scale)
    with np.errstate(invalid="ignore"):
        aligned = s * p @ R.T + t
    return aligned, s, R, t


def _slice(ndim: int, axis: int, s: slice) -> tuple[slice, ...]:
    idx = [slice(None)] * ndim
    idx[axis] = s
    return tuple(idx)


def _image_derivative(P: np.ndarray, v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Finite difference of P [S,H,W,3] along image ``axis`` (1 rows, 2 columns): central where both
    neighbours are valid, one-sided where only one is. Returns (derivative [S,H,W,3], defined [S,H,W])."""
    d = np.diff(P, axis=axis)
    dv = v[_slice(v.ndim, axis, slice(None, -1))] & v[_slice(v.ndim, axis, slice(1, None))]
    fwd, bwd = np.zeros_like(P), np.zeros_like(P)
    fwd_ok, bwd_ok = np.zeros_like(v), np.zeros_like(v)
    fwd[_slice(P.ndim, axis, slice(None, -1))] = d
    fwd_ok[_slice(v.ndim, axis, slice(None, -1))] = dv
    bwd[_slice(P.ndim, axis, slice(1, None))] = d
    bwd_ok[_slice(v.ndim, axis, slice(1, None))] = dv
    both = (fwd_ok & bwd_ok)[..., None]
    out = np.where(both, (fwd + bwd) / 2, np.where(fwd_ok[..., None], fwd, bwd))
    return out, fwd_ok | bwd_ok


def estimate_normals(points_map: Any, valid: Any | None = None) -> np.ndarray:
    """Unit normals [S,H,W,3] of a point map [S,H,W,3] from the cross product of its image-space derivatives.

    valid: bool [S,H,W] or None (all finite points). Derivatives along columns (u) and rows (v) use only valid
    neighbours (central difference, else one-sided); normal = normalise(d/du x d/dv). Pixels without a
    valid neighbour in both directions, or with (near-)parallel derivatives, get the zero vector. The sign
    follows the pixel grid, not the viewer (for an OpenCV camera looking at a fronto-parallel plane it points
    away from the camera, +z); use |cos| when comparing.
    """
    P = to_numpy(points_map)
    if P.ndim == 3:
        P = P[None]
    if P.ndim != 4 or P.shape[-1] != 3:
        raise ValueError(f"points_map must be [S,H,W,3] or [H,W,3], got {P.shape}")
    v = np.isfinite(P).all(-1)
    if valid is not None:
        v &= squeeze_last(to_numpy(valid, bool), 3).reshape(v.shape)
    P = np.where(v[..., None], P, 0.0)  # keeps NaNs of invalid pixels out of the arithmetic
    du, ok_u = _image_derivative(P, v, axis=2)
    dv, ok_v = _image_derivative(P, v, axis=1)
    n = np.cross(du, dv)
    norm = np.linalg.norm(n, axis=-1)
    scale = np.linalg.norm(du, axis=-1) * np.linalg.norm(dv, axis=-1)
    ok = v & ok_u & ok_v & (norm > 1e-9 * scale) & (norm > 0)
    return np.where(ok[..., None], n / np.where(ok, norm, 1.0)[..., None], 0.0)


def _points(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must be [N,3], got {a.shape}")
    if len(a) == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return a


def _unit(n: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    ok = np.isfinite(norm) & (norm > 0)
    return np.where(ok, n / np.where(ok, norm, 1.0), 0.0)


def chamfer_metrics(
    pred_pts: Any, gt_pts: Any, pred_normals: Any | None = None, gt_normals: Any | None = None
) -> dict[str, float]:
    """Accuracy, completeness, chamfer distance and normal consistency of two point sets (nearest neighbours).

    pred_pts [N,3], gt_pts [M,3] (finite, non-empty); pred_normals [N,3], gt_normals [M,3] or both None.
    Returns ``acc_mean``/``acc_median`` (pred -> nearest GT distance), ``comp_mean``/``comp_median`` (GT ->
    nearest pred), ``chamfer`` = (acc_mean + comp_mean) / 2, and ``normal_consistency`` = mean over both
    directions of |cos| between a point's normal and its nearest neighbour's, in [0, 1]; zero-length normals
    are skipped; NaN when normals are not given or none is usable.
    """
    p, g = _points(pred_pts, "pred_pts"), _points(gt_pts, "gt_pts")
    d_acc, i_acc = cKDTree(g).query(p)
    d_comp, i_comp = cKDTree(p).query(g)
    out = {
        "acc_mean": float(np.mean(d_acc)),
        "acc_median": float(np.median(d_acc)),
        "comp_mean": float(np.mean(d_comp)),
        "comp_median": float(np.median(d_comp)),
    }
    out["chamfer"] = (out["acc_mean"] + out["comp_mean"]) / 2
    out["normal_consistency"] = float("nan")
    if (pred_normals is None) != (gt_normals is None):
        raise ValueError("give both pred_normals and gt_normals, or neither")
    if pred_normals is not None:
        n_p, n_g = _unit(to_numpy(pred_normals)), _unit(to_numpy(gt_normals))
        if n_p.shape != p.shape or n_g.shape != g.shape:
            raise ValueError(f"normals {n_p.shape}, {n_g.shape} do not match points {p.shape}, {g.shape}")
        means = []
        for a, b in ((n_p, n_g[i_acc]), (n_g, n_p[i_comp])):
            ok = a.any(-1) & b.any(-1)
            if ok.any():
                means.append(float(np.mean(np.abs(np.sum(a[ok] * b[ok], axis=-1)))))
        if means:
            out["normal_consistency"] = float(np.mean(means))
    return out


def pointmap_metrics(
    pred_map: Any,
    gt_map: Any,
    valid: Any | None,
    conf: Any | None = None,
    top_percent: float | None = None,
    max_points: int = 100_000,
    seed: int = 0,
) -> dict[str, float]:
    """Reconstruction quality of a predicted point map against GT, after similarity alignment.

    pred_map, gt_map: [S,H,W,3]; valid: bool [S,H,W] or None (all GT-finite pixels); conf: [S,H,W] with
    ``top_percent`` in (0, 100] keeps the most confident valid pixels (pooled over frames, see
    :func:`top_percent_mask`). Steps: select pixels; fit :func:`umeyama` (with scale) from the predicted to the
    GT points of all selected pixels; draw at most ``max_points`` selected pixels uniformly without
    replacement (``np.random.default_rng(seed)``, so deterministic); :func:`chamfer_metrics` on them, normals
    from :func:`estimate_normals` of the aligned prediction and the GT over the valid pixels.
    Returns ``pm_acc_mean``, ``pm_acc_median``, ``pm_comp_mean``, ``pm_comp_median``, ``pm_chamfer``,
    ``pm_normal_consistency`` and ``pm_nonfinite_pct`` (module docstring). Raises ValueError on shape
    mismatch or fewer than 3 valid GT points ("no valid points ...").
    """
    P, G = to_numpy(pred_map), to_numpy(gt_map)
    if P.ndim == 3:
        P, G = P[None], G[None]
    if P.shape != G.shape or P.ndim != 4 or P.shape[-1] != 3:
        raise ValueError(f"pred_map and gt_map must both be [S,H,W,3], got {P.shape} and {G.shape}")
    base = np.isfinite(G).all(-1)
    if valid is not None:
        v = squeeze_last(to_numpy(valid, bool), 3)
        if v.size != base.size:
            raise ValueError(f"valid mask of shape {v.shape} does not match point maps {G.shape[:-1]}")
        base &= v.reshape(base.shape)
    if base.sum() < 3:
        raise ValueError(f"no valid points: {int(base.sum())} valid GT points, need at least 3")
    sel = base
    if top_percent is not None:
        if conf is None:
            raise ValueError("top_percent needs a conf array")
        c = squeeze_last(to_numpy(conf), 3)
        sel = top_percent_mask(c.reshape(base.shape) if c.size == base.size else c, base, top_percent)
    pred_ok = np.isfinite(P).all(-1)
    use = sel & pred_ok
    n_sel, n_use = int(sel.sum()), int(use.sum())
    nonfinite_pct = 100.0 * (n_sel - n_use) / n_sel
    failed = {
        **{f"pm_{k}": float("inf") for k in ("acc_mean", "acc_median", "comp_mean", "comp_median", "chamfer")},
        "pm_normal_consistency": 0.0,
        "pm_nonfinite_pct": nonfinite_pct,
    }
    if n_use < 3:
        return failed

    aligned, *_ = align_points(P, G, use)
    idx = np.flatnonzero(sel)
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_points, replace=False))
    idx_p = idx[pred_ok.ravel()[idx]]
    if len(idx_p) == 0:  # the draw hit only failed predictions
        return failed
    n_pred = estimate_normals(aligned, base & pred_ok).reshape(-1, 3)
    n_gt = estimate_normals(G, base).reshape(-1, 3)
    flat_p, flat_g = aligned.reshape(-1, 3), G.reshape(-1, 3)
    m = chamfer_metrics(flat_p[idx_p], flat_g[idx], n_pred[idx_p], n_gt[idx])
    out = {f"pm_{k}": v for k, v in m.items()}
    out["pm_nonfinite_pct"] = nonfinite_pct
    return out
