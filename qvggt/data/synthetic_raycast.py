"""Vectorised ray casting against analytic primitives (helper of :mod:`qvggt.data.synthetic`).

Every primitive is a *unit* shape (unit sphere, cube ``[-1, 1]^3``, cylinder ``x^2 + y^2 <= 1, |z| <= 1``,
disk ``x^2 + y^2 <= 1, z = 0``) mapped to the world by ``x = center + rotation @ (scale * p)``. A ray
``o + t d`` is intersected in the unit frame: the map is affine, so the ray parameter ``t`` is the same in
both frames and the world hit point is exactly ``o + t d``. Ellipsoids and oriented boxes/cylinders come
for free from ``rotation`` and non-uniform ``scale``.

Arrays are *planar*: a set of 3-vectors is a tuple ``(x, y, z)`` of broadcastable float64 arrays. That
keeps every operation a contiguous element-wise NumPy op (no ``[..., 3]`` strided access).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BOX", "CYLINDER", "DISK", "SPHERE", "Primitive", "cast_any", "intersect", "normals", "to_local"]

SPHERE, BOX, CYLINDER, DISK = 0, 1, 2, 3
#: Smallest accepted ray parameter; rays start at the camera (or just above a surface for shadows).
T_EPS = 1e-7
_TINY = 1e-12

Planar = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class Primitive:
    """One analytic object: ``x_world = center + rotation @ (scale * p_unit)``.

    ``center`` (3,), ``rotation`` (3, 3) world-from-object (orthonormal), ``scale`` (3,) half extents /
    radii; ``texture`` is evaluated in object-frame world units, ``rotation.T @ (x - center)``.
    """

    kind: int
    center: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    texture: Any

    @property
    def to_local_matrix(self) -> np.ndarray:
        """(3, 3) ``M`` with ``p_unit = (x - center) @ M`` for row vectors (``M = R diag(1/s)``)."""
        return self.rotation / self.scale[None, :]

    @property
    def bound_radius(self) -> float:
        """Radius of a sphere around ``center`` that contains the primitive."""
        s = self.scale
        if self.kind == SPHERE:
            return float(s.max())
        if self.kind == BOX:
            return float(np.linalg.norm(s))
        if self.kind == CYLINDER:
            return float(np.hypot(max(s[0], s[1]), s[2]))
        return float(max(s[0], s[1]))  # DISK

    def contains(self, point: np.ndarray) -> bool:
        """Whether world ``point`` (3,) lies inside (or on) the solid primitive."""
        p = (np.asarray(point, dtype=np.float64) - self.center) @ self.to_local_matrix
        if self.kind == SPHERE:
            return bool(p @ p <= 1.0)
        if self.kind == BOX:
            return bool(np.abs(p).max() <= 1.0)
        if self.kind == CYLINDER:
            return bool(p[0] ** 2 + p[1] ** 2 <= 1.0 and abs(p[2]) <= 1.0)
        return False  # a disk has no volume


def to_local(prim: Primitive, o: Planar, d: Planar) -> tuple[Planar, Planar]:
    """Map world ray origins ``o`` and directions ``d`` (planar, broadcastable) to the unit frame."""
    m = prim.to_local_matrix
    oc = (o[0] - prim.center[0], o[1] - prim.center[1], o[2] - prim.center[2])
    ol = tuple(oc[0] * m[0, j] + oc[1] * m[1, j] + oc[2] * m[2, j] for j in range(3))
    dl = tuple(d[0] * m[0, j] + d[1] * m[1, j] + d[2] * m[2, j] for j in range(3))
    return ol, dl  # type: ignore[return-value]


def _nonzero(x: np.ndarray) -> np.ndarray:
    # Keep the sign so that 1/x is a huge number of the right sign instead of inf/nan.
    return np.where(np.abs(x) < _TINY, np.where(x < 0, -_TINY, _TINY), x)


def _hit_sphere(o: Planar, d: Planar) -> np.ndarray:
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = o[0] * d[0] + o[1] * d[1] + o[2] * d[2]
    c = o[0] * o[0] + o[1] * o[1] + o[2] * o[2] - 1.0
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0 = (-b - sq) / a
    t = np.where(t0 > T_EPS, t0, (-b + sq) / a)  # far root only for origins inside (shadow rays)
    return np.where((disc >= 0.0) & (t > T_EPS), t, np.inf)


def _hit_box(o: Planar, d: Planar) -> np.ndarray:
    tmin = tmax = None
    for i in range(3):  # slab method
        inv = 1.0 / _nonzero(d[i])
        ta = (-1.0 - o[i]) * inv
        tb = (1.0 - o[i]) * inv
        lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
        tmin = lo if tmin is None else np.maximum(tmin, lo)
        tmax = hi if tmax is None else np.minimum(tmax, hi)
    t = np.where(tmin > T_EPS, tmin, tmax)
    return np.where((tmax >= tmin) & (t > T_EPS), t, np.inf)


def _hit_cylinder(o: Planar, d: Planar) -> np.ndarray:
    a = d[0] * d[0] + d[1] * d[1]
    b = o[0] * d[0] + o[1] * d[1]
    c = o[0] * o[0] + o[1] * o[1] - 1.0
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    a_safe = _nonzero(a)
    best = np.full(np.broadcast_shapes(np.shape(a), np.shape(c), np.shape(o[2]), np.shape(d[2])), np.inf)
    side_ok = (disc >= 0.0) & (a > _TINY)
    for t in ((-b - sq) / a_safe, (-b + sq) / a_safe):
        z = o[2] + t * d[2]
        best = np.where(side_ok & (t > T_EPS) & (np.abs(z) <= 1.0) & (t < best), t, best)
    inv_dz = 1.0 / _nonzero(d[2])
    for zc in (-1.0, 1.0):  # caps
        t = (zc - o[2]) * inv_dz
        x = o[0] + t * d[0]
        y = o[1] + t * d[1]
        best = np.where((t > T_EPS) & (x * x + y * y <= 1.0) & (t < best), t, best)
    return best


def _hit_disk(o: Planar, d: Planar) -> np.ndarray:
    t = -o[2] / _nonzero(d[2])
    x = o[0] + t * d[0]
    y = o[1] + t * d[1]
    return np.where((t > T_EPS) & (x * x + y * y <= 1.0), t, np.inf)


_HIT = {SPHERE: _hit_sphere, BOX: _hit_box, CYLINDER: _hit_cylinder, DISK: _hit_disk}


def intersect(prim: Primitive, o: Planar, d: Planar) -> np.ndarray:
    """Ray parameter ``t`` of the first hit with ``t > T_EPS`` (``inf`` on a miss), broadcast shape of o, d.

    ``d`` need not be unit length; the hit point is ``o + t d`` in world coordinates.
    """
    ol, dl = to_local(prim, o, d)
    return _HIT[prim.kind](ol, dl)


def normals(prim: Primitive, points: np.ndarray) -> np.ndarray:
    """Outward unit world normals (N, 3) at world surface ``points`` (N, 3) of ``prim``."""
    p = (points - prim.center) @ prim.to_local_matrix
    if prim.kind == SPHERE:
        n = p
    elif prim.kind == BOX:
        axis = np.abs(p).argmax(axis=1)  # the face is the coordinate that reached +-1
        n = np.zeros_like(p)
        rows = np.arange(len(p))
        n[rows, axis] = np.sign(p[rows, axis])
    elif prim.kind == CYLINDER:
        r = np.hypot(p[:, 0], p[:, 1])
        cap = np.abs(p[:, 2]) >= r  # on the surface max(|z|, r) == 1; the larger one says which part
        n = np.where(cap[:, None], np.stack([0 * r, 0 * r, np.sign(p[:, 2])], 1), p * [1.0, 1.0, 0.0])
    else:
        n = np.broadcast_to(np.array([0.0, 0.0, 1.0]), p.shape)
    # Normals transform with the inverse transpose of R diag(s): R diag(1/s) n.
    nw = (n / prim.scale[None, :]) @ prim.rotation.T
    return nw / np.linalg.norm(nw, axis=1, keepdims=True)


def cast_any(prims: list[Primitive], o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Whether each ray ``o[i] + t d`` (``o`` (N, 3), ``d`` (3,) a shared unit direction) hits any of
    ``prims`` at ``t > 0``. Used for shadow rays.

    Rays are culled in "light space" (two axes across ``d``, one along it): sorted by the first axis, a
    primitive's bounding ball selects a slab with two binary searches, then a box test in the other axes;
    only the few survivors get the exact test.
    """
    hit = np.zeros(len(o), dtype=bool)
    if len(o) == 0 or not prims:
        return hit
    e1 = np.cross(d, [1.0, 0.0, 0.0] if abs(d[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    a, b, h = o @ e1, o @ e2, o @ d
    order = np.argsort(a, kind="stable")
    a_sorted = a[order]
    for prim in prims:
        r = prim.bound_radius
        c = prim.center
        lo, hi = np.searchsorted(a_sorted, [c @ e1 - r, c @ e1 + r])
        cand = order[lo:hi]
        cand = cand[(np.abs(b[cand] - c @ e2) <= r) & (h[cand] <= c @ d + r) & ~hit[cand]]
        if cand.size == 0:
            continue
        oo = o[cand]
        t = intersect(prim, (oo[:, 0], oo[:, 1], oo[:, 2]), (d[0], d[1], d[2]))
        hit[cand[np.isfinite(t)]] = True
    return hit
