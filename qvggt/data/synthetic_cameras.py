"""Camera trajectories and projection helpers (helper of :mod:`qvggt.data.synthetic`).

Conventions (OpenCV): camera axes x right, y down, z forward; an extrinsic is camera-from-world
``x_cam = R @ x_world + t``; the world is z-up with the ground plane at ``z = 0``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TRAJECTORIES", "look_at", "sample_trajectory", "screen_bbox"]

#: Camera path families; see :func:`sample_trajectory`.
TRAJECTORIES: tuple[str, ...] = ("orbit", "circle", "hemisphere", "forward", "spiral")


def look_at(center: np.ndarray, target: np.ndarray, roll: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Camera-from-world rotation R (3, 3) and translation t (3,) of a camera at ``center`` looking at
    ``target`` with world +z as up (image y points down), then rolled by ``roll`` radians about its axis."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])  # elevations stay below 70 deg, so this never degenerates
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c, s = math.cos(roll), math.sin(roll)
    rot = np.stack([c * x + s * y, -s * x + c * y, z])
    return rot, -rot @ center


def _spherical(target: np.ndarray, az: np.ndarray, el: np.ndarray, dist: np.ndarray) -> np.ndarray:
    return target + dist[:, None] * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)


def sample_trajectory(
    rng: np.random.Generator,
    kind: str,
    num_frames: int,
    target: np.ndarray,
    distance: float,
    min_distance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``num_frames`` cameras around ``target`` at roughly ``distance`` (never closer than
    ``min_distance``).

    Kinds: ``orbit`` an arc of 60-150 deg at near-constant height; ``circle`` a full turn (turntable);
    ``hemisphere`` random, mutually separated viewpoints; ``forward`` a curved approach from far to near
    (zoom-like, never collinear); ``spiral`` a rising, tightening arc.

    Returns centres (S, 3), look-at targets (S, 3) and rolls (S,) in radians.
    """
    s = num_frames
    u = np.linspace(0.0, 1.0, s) if s > 1 else np.zeros(1)  # progress along the path
    deg = math.pi / 180.0
    az0 = rng.uniform(0.0, 2 * math.pi)
    sign = rng.choice([-1.0, 1.0])
    if kind == "orbit":
        az = az0 + sign * rng.uniform(60, 150) * deg * u + rng.normal(0, 2 * deg, s)
        el = rng.uniform(15, 40) * deg + rng.uniform(-8, 8) * deg * np.sin(math.pi * u)
        dist = distance * rng.uniform(0.95, 1.05, s)
    elif kind == "circle":
        az = az0 + sign * 2 * math.pi * (np.arange(s) + rng.uniform(-0.15, 0.15, s)) / s
        el = np.clip(rng.uniform(20, 45) * deg + rng.normal(0, 3 * deg, s), 10 * deg, 60 * deg)
        dist = distance * rng.uniform(0.93, 1.07, s)
    elif kind == "hemisphere":
        min_sep = min(0.3, 1.5 / math.sqrt(s)) * distance
        pts, az, el, dist = [], np.empty(s), np.empty(s), np.empty(s)
        for i in range(s):
            for _ in range(100):  # rejection keeps viewpoints apart (pose estimation needs baselines)
                a, e, r = rng.uniform(0, 2 * math.pi), rng.uniform(12, 60) * deg, distance * rng.uniform(0.9, 1.25)
                p = _spherical(target, np.array([a]), np.array([e]), np.array([r]))[0]
                if all(np.linalg.norm(p - q) >= min_sep for q in pts):
                    break
            pts.append(p)
            az[i], el[i], dist[i] = a, e, r
    elif kind == "forward":
        az = az0 + sign * rng.uniform(10, 18) * deg * np.sin(math.pi * u)  # sideways bow: not collinear
        el = rng.uniform(12, 30) * deg + rng.uniform(-8, 8) * deg * u
        dist = distance * (1.35 - 0.55 * u)
    elif kind == "spiral":
        az = az0 + sign * rng.uniform(150, 300) * deg * u
        el = (10 + 40 * u + rng.normal(0, 1.5, s)) * deg
        dist = distance * (1.15 - 0.3 * u)
    else:
        raise ValueError(f"unknown trajectory {kind!r}; valid: {', '.join(TRAJECTORIES)}")
    centers = _spherical(target, az, el, np.maximum(dist, min_distance))
    targets = target + rng.normal(0.0, 0.03 * distance, (s, 3))  # not every frame aims at the exact centre
    rolls = rng.normal(0.0, 2.5 * deg, s)
    return centers, targets, rolls


def _axis_range(a: float, z: float, r: float, f: float, c0: float, n: int) -> tuple[int, int] | None:
    # Extent along one image axis of a ball (centre (a, z) in the camera's a-z plane, radius r): the
    # tangent rays from the camera bound it exactly; angles beyond +-90 deg mean "to the image border".
    rho = math.hypot(a, z)
    if rho <= r:
        return 0, n
    ang, da = math.atan2(a, z), math.asin(r / rho)
    lo, hi = ang - da, ang + da
    if lo >= math.pi / 2 or hi <= -math.pi / 2:
        return None  # behind the camera
    p_lo = -math.inf if lo <= -math.pi / 2 + 1e-9 else c0 + f * math.tan(lo)
    p_hi = math.inf if hi >= math.pi / 2 - 1e-9 else c0 + f * math.tan(hi)
    i0 = 0 if p_lo == -math.inf else max(0, math.floor(p_lo) - 1)
    i1 = n if p_hi == math.inf else min(n, math.ceil(p_hi) + 2)
    return (i0, i1) if i0 < i1 else None


def screen_bbox(
    center: np.ndarray, radius: float, rot: np.ndarray, cam_center: np.ndarray, f: float, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Conservative pixel rectangle ``(v0, v1, u0, u1)`` (half-open) covering the projection of a ball,
    or ``None`` if the ball is not visible. Pixel (u, v) looks through image point (u, v) with the
    principal point at (W/2, H/2)."""
    pc = rot @ (center - cam_center)
    r = radius * (1.0 + 1e-6) + 1e-9
    xs = _axis_range(pc[0], pc[2], r, f, width / 2.0, width)
    ys = _axis_range(pc[1], pc[2], r, f, height / 2.0, height)
    if xs is None or ys is None:
        return None
    return ys[0], ys[1], xs[0], xs[1]
