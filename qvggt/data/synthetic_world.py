"""Scene categories and random world layout (helper of :mod:`qvggt.data.synthetic`).

World frame: z up, ground disk at ``z = 0`` centred on the origin. Objects rest on the ground (or on each
other, for towers); a few spheres float. Every random draw comes from the generator passed in, so a world
is a pure function of its seed and category.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qvggt.data.synthetic_raycast import BOX, CYLINDER, DISK, SPHERE, Primitive
from qvggt.data.synthetic_textures import TEXTURE_KINDS, NoiseField, hsv_to_rgb, sample_texture

__all__ = ["CATEGORIES", "CATEGORY_SPECS", "Category", "World", "sample_world"]


@dataclass(frozen=True)
class Category:
    """How the scenes of one category are drawn."""

    shapes: tuple[str, ...]  # drawn uniformly; repeat a name to weight it
    count: tuple[int, int]  # inclusive range of objects (of stacks for "towers")
    size: tuple[float, float]  # characteristic object radius / half extent, world units
    textures: tuple[str, ...]
    trajectories: tuple[str, ...]
    layout: str = "scatter"  # scatter | towers | centerpiece
    tall: float = 1.0  # vertical stretch of boxes/cylinders/ellipsoids
    fov_deg: tuple[float, float] = (45.0, 70.0)  # horizontal FoV of the longer image side


_ALL_SHAPES = ("sphere", "ellipsoid", "box", "tilted_box", "cylinder", "tilted_cylinder")
CATEGORY_SPECS: dict[str, Category] = {
    # Co3D-style families: what varies is shape mix, object count/size, layout, textures and camera path.
    "spheres": Category(
        ("sphere", "sphere", "ellipsoid"), (3, 6), (0.3, 0.6), ("noise", "checker", "marble", "dots"), ("orbit",)
    ),
    "boxes": Category(("box", "box", "tilted_box"), (3, 6), (0.3, 0.6), ("checker", "stripes", "noise"), ("circle",)),
    "pillars": Category(
        ("cylinder", "cylinder", "box"), (3, 7), (0.2, 0.35), ("stripes", "noise", "marble"), ("hemisphere",), tall=2.5
    ),
    "mixed": Category(_ALL_SHAPES, (4, 7), (0.3, 0.55), TEXTURE_KINDS, ("orbit", "circle", "hemisphere")),
    "cluttered": Category(_ALL_SHAPES, (9, 14), (0.18, 0.35), TEXTURE_KINDS, ("hemisphere", "orbit")),
    "towers": Category(
        ("box", "cylinder"),
        (2, 4),
        (0.3, 0.5),
        ("checker", "stripes", "noise", "gradient"),
        ("spiral",),
        layout="towers",
    ),
    "centerpiece": Category(
        _ALL_SHAPES, (0, 2), (0.45, 0.7), TEXTURE_KINDS, ("circle",), layout="centerpiece", fov_deg=(40.0, 60.0)
    ),
    "flythrough": Category(_ALL_SHAPES, (4, 8), (0.3, 0.5), TEXTURE_KINDS, ("forward",), fov_deg=(55.0, 75.0)),
}
#: Scene categories, in the order used by ``category = CATEGORIES[seed % len(CATEGORIES)]``.
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_SPECS)


# ----------------------------------------------------------------------------------------------- scene


@dataclass(frozen=True, eq=False)
class World:
    """A sampled scene: primitives, lighting and where the cameras should look."""

    objects: list[Primitive]  # everything but the ground
    ground: Primitive
    noise: NoiseField
    target: np.ndarray  # (3,) look-at centre
    radius: float  # the objects lie in this ball around target
    light_dir: np.ndarray  # (3,) unit, towards the light
    light_rgb: np.ndarray
    ambient: float
    sky: tuple[np.ndarray, np.ndarray]  # horizon, zenith RGB


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _extent(kind: int, rot: np.ndarray, scale: np.ndarray, axis: np.ndarray) -> float:
    """Half extent of a primitive along the world unit vector ``axis``."""
    a = rot.T @ axis  # the axis in the object frame
    if kind == SPHERE:
        return float(np.linalg.norm(a * scale))
    if kind == BOX:
        return float(np.abs(a) @ scale)
    return float(abs(a[2]) * scale[2] + math.sqrt(max(0.0, 1.0 - a[2] ** 2)) * scale[0])  # cylinder


def _shape(rng: np.random.Generator, name: str, size: float, tall: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(kind, rotation, scale) of a random object of family ``name``."""
    spin = _rot_z(rng.uniform(0, 2 * math.pi))
    stretch = np.array([1.0, 1.0, tall])
    if name == "sphere":
        return SPHERE, spin, np.full(3, size)
    if name == "ellipsoid":
        return SPHERE, spin @ _rot_x(rng.uniform(-0.6, 0.6)), size * rng.uniform(0.6, 1.3, 3) * stretch
    if name in ("box", "tilted_box"):
        tilt = _rot_x(rng.uniform(0.3, 0.9)) @ _rot_z(rng.uniform(0, 1.5)) if name == "tilted_box" else np.eye(3)
        return BOX, spin @ tilt, size * rng.uniform(0.6, 1.2, 3) * stretch
    r = size * rng.uniform(0.5, 1.0)
    h = size * rng.uniform(0.8, 1.6) * tall
    tilt = _rot_x(rng.uniform(0.4, math.pi / 2)) if name == "tilted_cylinder" else np.eye(3)
    return CYLINDER, spin @ tilt, np.array([r, r, h])


def _scatter(rng: np.random.Generator, items: list[tuple[float, Any]], radius: float) -> list[np.ndarray]:
    """Positions (x, y) in a disk of ``radius`` for items (footprint radius, payload), avoiding overlaps."""
    placed: list[tuple[np.ndarray, float]] = []
    for fp, _ in items:
        for _ in range(60):
            a, r = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.random())
            xy = np.array([r * math.cos(a), r * math.sin(a)])
            if all(np.linalg.norm(xy - q) >= fp + fq + 0.05 for q, fq in placed):
                break
        placed.append((xy, fp))
    return [p for p, _ in placed]


def sample_world(rng: np.random.Generator, cat: Category) -> World:
    """Draw the objects, textures, ground, light and sky of one scene of category ``cat``."""
    ez, ex, ey = np.eye(3)[2], np.eye(3)[0], np.eye(3)[1]
    specs: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # kind, rot, scale, lift above resting
    positions: list[np.ndarray] = []
    if cat.layout == "towers":
        n = int(rng.integers(cat.count[0], cat.count[1] + 1))
        stacks = []
        for _ in range(n):
            base = float(rng.uniform(*cat.size))
            stacks.append((base * math.sqrt(2), base))
        spread = 0.9 * float(np.mean([b for _, b in stacks])) * (1 + math.sqrt(n))
        for xy, (_, base) in zip(_scatter(rng, stacks, spread), stacks, strict=True):
            z, size = 0.0, base
            for _level in range(int(rng.integers(2, 4))):
                kind, rot, scale = _shape(rng, str(rng.choice(cat.shapes)), size, 1.0)
                half = _extent(kind, rot, scale, ez)
                specs.append((kind, rot, scale, 0.0))
                positions.append(np.array([xy[0], xy[1], z + half]))
                z += 2 * half
                size *= rng.uniform(0.6, 0.85)
            if rng.random() < 0.5:  # a ball on top
                specs.append((SPHERE, np.eye(3), np.full(3, size), 0.0))
                positions.append(np.array([xy[0], xy[1], z + size]))
    else:
        n = int(rng.integers(cat.count[0], cat.count[1] + 1))
        big = cat.layout == "centerpiece"
        sizes = [float(rng.uniform(*cat.size)) * (0.55 if big else 1.0) for _ in range(n)]
        items = []
        for size in sizes:
            kind, rot, scale = _shape(rng, str(rng.choice(cat.shapes)), size, cat.tall)
            fp = math.hypot(_extent(kind, rot, scale, ex), _extent(kind, rot, scale, ey))
            lift = rng.uniform(0.2, 1.0) * size if kind == SPHERE and rng.random() < 0.2 else 0.0
            items.append((fp, (kind, rot, scale, lift)))
        if big:  # one dominant object in the middle, the small ones around it (Co3D-like)
            kind, rot, scale = _shape(rng, str(rng.choice(cat.shapes)), float(rng.uniform(*cat.size)), 1.0)
            fp0 = math.hypot(_extent(kind, rot, scale, ex), _extent(kind, rot, scale, ey))
            specs.append((kind, rot, scale, 0.0))
            positions.append(np.zeros(2))
            for fp, spec in items:
                a = rng.uniform(0, 2 * math.pi)
                positions.append((fp0 + fp + rng.uniform(0.1, 0.5)) * np.array([math.cos(a), math.sin(a)]))
                specs.append(spec)
        else:
            mean_size = sum(sizes) / n
            positions = _scatter(rng, items, mean_size * (1.2 + 0.9 * math.sqrt(n)))
            specs = [spec for _, spec in items]
        positions = [
            np.array([p[0], p[1], _extent(k, r, s, ez) + lift])
            for p, (k, r, s, lift) in zip(positions, specs, strict=True)
        ]

    objects = []
    for (kind, rot, scale, _), pos in zip(specs, positions, strict=True):
        tex = sample_texture(rng, str(rng.choice(cat.textures)), float(np.mean(scale)))
        objects.append(Primitive(kind, pos, rot, scale, tex))
    lo = np.min([o.center[:2] - o.bound_radius for o in objects], 0)
    hi = np.max([o.center[:2] + o.bound_radius for o in objects], 0)
    top = max(o.center[2] + _extent(o.kind, o.rotation, o.scale, ez) for o in objects)
    target = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0.4 * top])
    radius = max(float(np.linalg.norm(o.center - target)) + o.bound_radius for o in objects)

    ground_r = float(np.linalg.norm(target[:2])) + radius * rng.uniform(7.0, 9.0)  # well past the cameras
    ground_tex = sample_texture(
        rng, str(rng.choice(["checker", "noise", "stripes"])), rng.uniform(0.6, 1.2), muted=True
    )
    ground = Primitive(DISK, np.zeros(3), np.eye(3), np.array([ground_r, ground_r, 1.0]), ground_tex)
    az, el = rng.uniform(0, 2 * math.pi), rng.uniform(35, 70) * math.pi / 180
    light = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    hue = rng.uniform(0.52, 0.66) if rng.random() < 0.7 else rng.random()
    sky = (
        hsv_to_rgb(hue, rng.uniform(0.05, 0.25), rng.uniform(0.8, 0.95)),
        hsv_to_rgb(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.6), rng.uniform(0.55, 0.85)),
    )
    return World(
        objects,
        ground,
        NoiseField(rng),
        target,
        radius,
        light,
        hsv_to_rgb(rng.random(), rng.uniform(0, 0.12), 1.0),
        float(rng.uniform(0.25, 0.4)),
        sky,
    )
