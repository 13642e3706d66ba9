"""Procedural multi-view scenes with exact ground truth: the embedded dataset of qvggt.

A scene is a handful of textured analytic objects (spheres, ellipsoids, upright and tilted boxes and
cylinders) standing on a finite textured ground disk, lit by a directional light (with cast shadows) plus
ambient, under a sky gradient. ``S`` pinhole cameras on a trajectory around the objects see it; every
pixel is ray cast exactly (pure NumPy, vectorised), so depth, world points and cameras are exact.

Conventions
-----------
- World: z up, ground at ``z = 0``. Cameras: OpenCV (x right, y down, z forward); ``extrinsics`` are
  camera-from-world ``[R | t]`` (``x_cam = R x_world + t``); ``intrinsics`` ``K = [[f, 0, W/2],
  [0, f, H/2], [0, 0, 1]]`` (square pixels, principal point at ``(W/2, H/2)`` as VGGT assumes).
- Pixel centres: pixel ``(u, v)`` (column ``u``, row ``v``, integers from 0) is the image point
  ``(x, y) = (u, v)``: its ray is ``K^-1 [u, v, 1]`` and its world point projects to exactly ``(u, v)``.
  This is the convention of VGGT's ``unproject_depth_map_to_point_map`` (``meshgrid(arange(W),
  arange(H))``) and OpenCV. Each pixel is a single ray (no anti-aliasing), so colour and geometry agree.
- Invalid pixels (sky, rays that miss everything): ``valid_mask`` False, ``depth`` 0, ``world_points`` 0.
- Normalised scenes (:meth:`SyntheticScene.normalized`) follow VGGT's training targets: the first camera
  becomes ``[I | 0]`` and everything is scaled so that the mean distance of valid points (all frames) to
  the first camera centre is 1.

Categories and seeds
--------------------
:data:`CATEGORIES` has 8 entries differing in shapes, counts, layout, textures and trajectory:

- ``spheres``: 3-6 spheres/ellipsoids, orbit arc; ``boxes``: 3-6 upright/tilted boxes, full circle;
- ``pillars``: 3-7 tall cylinders/boxes, random hemisphere views; ``mixed``: 4-7 of every shape;
- ``cluttered``: 9-14 small objects; ``towers``: 2-4 stacks of boxes/cylinders (balls on top), spiral;
- ``centerpiece``: one large object and up to 2 small ones, turntable circle (Co3D-like);
- ``flythrough``: 4-8 objects, forward (zoom-like) approach.

When ``category`` is ``None`` it is ``CATEGORIES[seed % 8]``, so seeds ``0..7`` cover every category once.
The scene (objects, textures, light) depends only on ``(seed, category)``; the cameras on those and
``num_frames``; ``height``/``width`` only change the sampling (intrinsics scale with the image), so one
seed rendered at two sizes shows the same views.

Legend for shapes: S frames, H image height, W image width (both multiples of 14), B scenes in a batch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qvggt.data.synthetic_cameras import TRAJECTORIES, look_at, sample_trajectory, screen_bbox
from qvggt.data.synthetic_raycast import cast_any, intersect, normals
from qvggt.data.synthetic_world import CATEGORIES, CATEGORY_SPECS, World, sample_world

__all__ = ["CATEGORIES", "PATCH_SIZE", "TRAJECTORIES", "SyntheticDataset", "SyntheticScene", "make_batch", "make_scene"]

PATCH_SIZE = 14
_ARRAY_FIELDS = ("images", "depth", "world_points", "valid_mask", "object_mask", "intrinsics", "extrinsics")


# ---------------------------------------------------------------------------------------------- render


def _render(
    world: World, rots: np.ndarray, centers: np.ndarray, focal: float, height: int, width: int, shadows: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ray cast all frames: rgb (S, H, W, 3), depth (S, H, W), points (S, H, W, 3), valid, object masks."""
    s = len(rots)
    xs = (np.arange(width) - width / 2.0) / focal
    ys = (np.arange(height) - height / 2.0) / focal
    # World ray directions d = R^T [x, y, 1]: with camera-z component 1, the ray parameter t is the depth.
    dirs = tuple(
        rots[:, 0, j, None, None] * xs[None, None, :]
        + rots[:, 1, j, None, None] * ys[None, :, None]
        + rots[:, 2, j, None, None]
        for j in range(3)
    )
    prims = [world.ground, *world.objects]
    t_best = np.full((s, height, width), np.inf)
    ids = np.full((s, height, width), -1, dtype=np.int16)
    for k, prim in enumerate(prims):
        for i in range(s):
            # Only trace the pixels that can see the primitive's bounding ball (big win at 518 px).
            box = screen_bbox(prim.center, prim.bound_radius, rots[i], centers[i], focal, height, width)
            if box is None:
                continue
            sub = (i, slice(box[0], box[1]), slice(box[2], box[3]))
            t = intersect(prim, tuple(centers[i]), tuple(d[sub] for d in dirs))
            tb = t_best[sub]  # a view: the updates below write through
            closer = t < tb
            tb[closer] = t[closer]
            ids[sub][closer] = k
    valid = ids >= 0
    depth = np.where(valid, t_best, 0.0)
    points = np.stack([np.where(valid, centers[:, j, None, None] + depth * dirs[j], 0.0) for j in range(3)], -1)

    # Sky gradient for misses (darker below the horizon, where the ground disk ends).
    elev = dirs[2] / np.sqrt(dirs[0] ** 2 + dirs[1] ** 2 + dirs[2] ** 2)
    horizon, zenith = world.sky
    blend = np.clip(2.5 * elev, 0.0, 1.0)[..., None] ** 0.8
    rgb = (horizon + blend * (zenith - horizon)) * (1.0 - 0.3 * np.clip(-3.0 * elev, 0.0, 1.0))[..., None]
    flat_ids, flat_pts, flat_depth = ids.reshape(-1), points.reshape(-1, 3), depth.reshape(-1)
    flat_rgb = rgb.reshape(-1, 3)  # a view: shading writes into rgb
    for k, prim in enumerate(prims):
        sel = np.nonzero(flat_ids == k)[0]
        if sel.size == 0:
            continue
        p = flat_pts[sel]
        n = normals(prim, p)
        # Pixel footprint on the surface: ray spacing t / f, stretched by 1 / cos(incidence).
        ray = np.stack([d.reshape(-1)[sel] for d in dirs], 1)
        cos = np.abs((n * ray).sum(1)) / np.linalg.norm(ray, axis=1)
        footprint = flat_depth[sel] / focal / np.maximum(cos, 0.1)
        albedo = prim.texture.albedo((p - prim.center) @ prim.rotation, world.noise, footprint)
        lam = np.clip(n @ world.light_dir, 0.0, None)
        if shadows:
            lit = np.nonzero(lam > 0)[0]
            # All objects are convex, so a lit point can only be shadowed by *other* objects.
            others = [o for j, o in enumerate(world.objects) if j != k - 1]
            occluded = cast_any(others, p[lit] + n[lit] * (1e-4 * world.radius), world.light_dir)
            lam[lit[occluded]] = 0.0
        flat_rgb[sel] = albedo * (world.ambient + (1.0 - world.ambient) * lam[:, None]) * world.light_rgb
    return np.clip(rgb, 0.0, 1.0), depth, points, valid, ids > 0


# ------------------------------------------------------------------------------------------------- API


@dataclass(frozen=True, eq=False)
class SyntheticScene:
    """One rendered multi-view scene with exact ground truth (see the module docstring for conventions).

    Shapes (S frames, H x W pixels):

    - ``images`` float32 [S, 3, H, W], RGB in [0, 1].
    - ``depth`` float32 [S, H, W], camera-frame z of each pixel's surface point; 0 where invalid.
    - ``world_points`` float32 [S, H, W, 3], the surface point of each pixel; 0 where invalid.
    - ``valid_mask`` bool [S, H, W], the pixel's ray hit a surface (objects or ground; not sky).
    - ``object_mask`` bool [S, H, W], the pixel shows an object (valid and not ground): a foreground mask.
    - ``intrinsics`` float32 [S, 3, 3]; ``extrinsics`` float32 [S, 3, 4], camera-from-world ``[R | t]``.
    - ``seed``, ``category``, ``trajectory`` (from :data:`TRAJECTORIES`), ``scene_id`` (property,
      ``"synthetic/<category>/<seed>"``).
    - ``is_normalized`` whether this is the VGGT-normalised frame; ``scale`` the factor from world units
      to this frame's units (1.0 in world coordinates).
    """

    images: np.ndarray
    depth: np.ndarray
    world_points: np.ndarray
    valid_mask: np.ndarray
    object_mask: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    seed: int
    category: str
    trajectory: str
    is_normalized: bool = False
    scale: float = 1.0

    @property
    def scene_id(self) -> str:
        """Stable identifier ``"synthetic/<category>/<seed>"``."""
        return f"synthetic/{self.category}/{self.seed}"

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def camera_centers(self) -> np.ndarray:
        """Camera centres in this scene's frame, float64 [S, 3] (``C = -R^T t``)."""
        e = self.extrinsics.astype(np.float64)
        return -np.einsum("sji,sj->si", e[:, :, :3], e[:, :, 3])

    def normalized(self) -> SyntheticScene:
        """The scene in VGGT's normalised frame: transform by the first camera's extrinsic (so it becomes
        ``[I | 0]``), then scale depth, points and translations by ``1 / mean ||valid point||`` (the mean
        over all frames of the distance to the first camera centre). Intrinsics and images are unchanged.
        Idempotent up to float32 rounding."""
        e = self.extrinsics.astype(np.float64)
        r0, t0 = e[0, :, :3], e[0, :, 3]
        pts = self.world_points.astype(np.float64) @ r0.T + t0
        dist = np.linalg.norm(pts[self.valid_mask], axis=-1)
        s = 1.0 / float(dist.mean()) if dist.size and dist.mean() > 0 else 1.0
        rel = e[:, :, :3] @ r0.T  # R_i R_0^T
        ext = np.concatenate([rel, (e[:, :, 3] - np.einsum("sij,j->si", rel, t0))[..., None] * s], -1)
        ext[0] = np.eye(3, 4)  # exactly the identity (R_0 R_0^T is only I up to rounding)
        pts = np.where(self.valid_mask[..., None], pts * s, 0.0)
        return replace(
            self,
            world_points=pts.astype(np.float32),
            depth=(self.depth * s).astype(np.float32),
            extrinsics=ext.astype(np.float32),
            is_normalized=True,
            scale=self.scale * s,
        )

    def to_torch(self, device: Any = None, batch_dim: bool = False) -> dict[str, Any]:
        """The array fields as torch tensors (same names, dtypes and shapes; ``batch_dim`` prepends B = 1)."""
        import torch  # lazy: the generator itself needs only NumPy

        out = {}
        for name in _ARRAY_FIELDS:
            t = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
            if batch_dim:
                t = t[None]
            out[name] = t if device is None else t.to(device)
        return out


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return operator.index(value)


def _check_size(name: str, value: Any) -> int:
    value = _check_int(name, value, 1)
    if value % PATCH_SIZE:
        lower = value // PATCH_SIZE * PATCH_SIZE
        nearest = f"{lower} or {lower + PATCH_SIZE}" if lower else str(PATCH_SIZE)
        raise ValueError(f"{name}={value} is not a multiple of the patch size {PATCH_SIZE}; nearest valid: {nearest}")
    return value


def _resolve_category(seed: int, category: str | None) -> str:
    if category is None:
        return CATEGORIES[seed % len(CATEGORIES)]
    if category not in CATEGORY_SPECS:
        raise ValueError(f"unknown category {category!r}; valid categories: {', '.join(CATEGORIES)}")
    return category


def make_scene(
    seed: int,
    num_frames: int = 8,
    height: int = 126,
    width: int = 126,
    category: str | None = None,
    *,
    shadows: bool = True,
) -> SyntheticScene:
    """Render scene ``seed`` of ``category`` (default ``CATEGORIES[seed % 8]``) from ``num_frames`` views.

    Bit-identical for identical arguments and independent of global RNG state (NumPy ``PCG64(seed)``
    for the world, its ``jumped()`` stream for the cameras). ``height`` and ``width`` must be multiples of 14.
    Returns a :class:`SyntheticScene` in world coordinates; call ``.normalized()`` for VGGT's frame.
    ``shadows=False`` skips the shadow rays (about a quarter faster; geometry is unchanged, only shading).
    Raises ``ValueError`` for ``num_frames < 1``, a negative seed, bad sizes or an unknown category.
    """
    seed = _check_int("seed", seed, 0)
    num_frames = _check_int("num_frames", num_frames, 1)
    height, width = _check_size("height", height), _check_size("width", width)
    category = _resolve_category(seed, category)
    cat = CATEGORY_SPECS[category]
    world = sample_world(np.random.Generator(np.random.PCG64(seed)), cat)

    rng = np.random.Generator(np.random.PCG64(seed).jumped())  # cameras: independent of the world's draws
    trajectory = str(rng.choice(cat.trajectories))
    fov = math.radians(rng.uniform(*cat.fov_deg))
    # Distance at which the objects' bounding ball spans 85-110 % of the half field of view (the ball is
    # conservative, so the objects themselves stay mostly in frame).
    distance = world.radius / math.sin(rng.uniform(0.85, 1.1) * fov / 2)
    centers, targets, rolls = sample_trajectory(rng, trajectory, num_frames, world.target, distance, 1.3 * world.radius)
    rots = np.empty((num_frames, 3, 3))
    trans = np.empty((num_frames, 3))
    for i in range(num_frames):
        rots[i], trans[i] = look_at(centers[i], targets[i], rolls[i])
        if centers[i][2] <= 0 or any(o.contains(centers[i]) for o in world.objects):
            raise RuntimeError(f"internal error: camera {i} of {category}/{seed} is below ground or in an object")

    focal = 0.5 * max(height, width) / math.tan(fov / 2)  # the FoV is that of the longer side
    rgb, depth, points, valid, objects = _render(world, rots, centers, focal, height, width, shadows)
    k = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
    return SyntheticScene(
        images=np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32),
        depth=depth.astype(np.float32),
        world_points=points.astype(np.float32),
        valid_mask=valid,
        object_mask=objects,
        intrinsics=np.broadcast_to(k, (num_frames, 3, 3)).astype(np.float32),
        extrinsics=np.concatenate([rots, trans[..., None]], -1).astype(np.float32),
        seed=seed,
        category=category,
        trajectory=trajectory,
    )


def make_batch(
    seeds: Sequence[int],
    num_frames: int = 8,
    height: int = 126,
    width: int = 126,
    category: str | None = None,
    normalized: bool = True,
) -> dict[str, Any]:
    """Stack several scenes: every array field of :class:`SyntheticScene` with a leading batch axis
    (``images`` [B, S, 3, H, W], ``depth`` [B, S, H, W], ``world_points`` [B, S, H, W, 3], masks
    [B, S, H, W], ``intrinsics`` [B, S, 3, 3], ``extrinsics`` [B, S, 3, 4]) plus lists ``seed``,
    ``category``, ``scene_id`` (length B). ``normalized`` selects VGGT's normalised frame."""
    if len(seeds) == 0:
        raise ValueError("make_batch needs at least one seed")
    scenes = [make_scene(s, num_frames, height, width, category) for s in seeds]
    if normalized:
        scenes = [sc.normalized() for sc in scenes]
    out: dict[str, Any] = {name: np.stack([getattr(sc, name) for sc in scenes]) for name in _ARRAY_FIELDS}
    out.update(
        seed=[sc.seed for sc in scenes],
        category=[sc.category for sc in scenes],
        scene_id=[sc.scene_id for sc in scenes],
    )
    return out


class SyntheticDataset(Sequence[SyntheticScene]):
    """Indexable dataset of scenes: item ``i`` is ``make_scene(seeds[i], ...)`` (normalised by default).

    ``seeds`` is a sequence of seeds or an int ``n`` for seeds ``0..n-1`` (which cycles through the
    categories when ``category`` is ``None``). Scenes are rendered on access, not cached.
    """

    def __init__(
        self,
        seeds: Sequence[int] | int,
        num_frames: int = 8,
        height: int = 126,
        width: int = 126,
        category: str | None = None,
        normalized: bool = True,
    ) -> None:
        self.seeds = (
            list(range(_check_int("seeds", seeds, 0)))
            if isinstance(seeds, (int, np.integer))
            else [_check_int("seed", s, 0) for s in seeds]
        )
        _check_int("num_frames", num_frames, 1)
        _check_size("height", height)
        _check_size("width", width)
        if category is not None:
            _resolve_category(0, category)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.category, self.normalized = category, normalized

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> SyntheticScene:  # type: ignore[override]
        scene = make_scene(self.seeds[index], self.num_frames, self.height, self.width, self.category)
        return scene.normalized() if self.normalized else scene

    def __iter__(self) -> Iterator[SyntheticScene]:
        return (self[i] for i in range(len(self)))
