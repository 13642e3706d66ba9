"""Procedural solid textures (helper of :mod:`qvggt.data.synthetic`).

Textures are *solid*: the albedo is a function of the 3-D object-frame position of a surface point, so no
UV parameterisation is needed, every shape gets a texture, and a surface point has the same colour in every
view (Lambertian shading keeps it view independent), which is what makes the views matchable. Every
pattern is modulated by fine value noise so that flat-coloured regions still carry texture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TEXTURE_KINDS", "NoiseField", "Texture", "hsv_to_rgb", "sample_texture"]

TEXTURE_KINDS: tuple[str, ...] = ("checker", "stripes", "noise", "marble", "dots", "gradient")


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """RGB (3,) in [0, 1] of a hue ``h`` (any real, wraps at 1), saturation and value in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * (h % 1.0)) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


class NoiseField:
    """Seeded 3-D value noise: random values on the integer lattice, smoothstep-trilinear in between."""

    def __init__(self, rng: np.random.Generator) -> None:
        p = rng.permutation(256)
        self._perm = np.concatenate([p, p])  # doubled so that perm[perm[i] + j] never wraps
        self._values = rng.random(512).astype(np.float32)  # indexed by perm[..] + 0..1

    def value(self, p: np.ndarray) -> np.ndarray:
        """Noise (N,) in [0, 1] at points ``p`` (N, 3)."""
        idx, wts = [], []
        for j in range(3):  # per axis: lattice index (wrapped to the table) and smoothstep weight
            c = p[:, j]
            fl = np.floor(c)
            f = (c - fl).astype(np.float32)  # float32 is plenty for a colour and halves the traffic
            idx.append(fl.astype(np.intp) & 255)
            wts.append(f * f * (3.0 - 2.0 * f))
        perm, vals = self._perm, self._values
        hx = [perm[idx[0] + dx] for dx in (0, 1)]
        hy = [[perm[h + idx[1] + dy] for dy in (0, 1)] for h in hx]
        wx, wy, wz = wts

        def lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
            return a + w * (b - a)

        ys = []
        for dx in (0, 1):
            zs = [lerp(vals[hy[dx][dy] + idx[2]], vals[hy[dx][dy] + idx[2] + 1], wz) for dy in (0, 1)]
            ys.append(lerp(zs[0], zs[1], wy))
        return lerp(ys[0], ys[1], wx).astype(np.float64)

    def fbm(self, p: np.ndarray, octaves: int = 3) -> np.ndarray:
        """Fractal sum of ``octaves`` noise octaves (N,), normalised to [0, 1]."""
        total, amp, norm = np.zeros(len(p)), 1.0, 0.0
        for k in range(octaves):
            total += amp * self.value(p * (2.0**k) + 17.31 * k)  # offset decorrelates the octaves
            norm += amp
            amp *= 0.5
        return total / norm


@dataclass(frozen=True, eq=False)
class Texture:
    """A solid texture: ``kind`` from :data:`TEXTURE_KINDS`, three RGB ``colors`` (3, 3), ``freq`` in
    cycles per world unit, a unit ``direction`` (3,) for stripes/marble/gradient, a noise-space
    ``offset`` (3,) and ``detail``, the relative amplitude of the fine-noise modulation."""

    kind: str
    colors: np.ndarray
    freq: float
    direction: np.ndarray
    offset: np.ndarray
    detail: float

    def albedo(self, p: np.ndarray, noise: NoiseField, footprint: np.ndarray | None = None) -> np.ndarray:
        """Albedo (N, 3) in [0, 1] at object-frame points ``p`` (N, 3) (world units).

        ``footprint`` (N,), the size of a pixel on the surface (world units), fades a pattern to its mean
        colour once a pixel covers more than a quarter of its period: with one ray per pixel, finer
        patterns would alias into moire that differs from view to view and cannot be matched.
        """
        q = p * self.freq + self.offset
        c0, c1, c2 = self.colors
        if self.kind == "checker":
            parity = (np.floor(q).astype(np.int64).sum(1) & 1).astype(np.float64)
            mix = parity[:, None] * (c1 - c0) + c0
            mean = (c0 + c1) / 2
        elif self.kind == "stripes":
            s = (p @ self.direction) * self.freq
            phase = s - np.floor(s)
            band = np.where(phase < 0.45, 0, np.where(phase < 0.55, 2, 1))  # two bands and a thin line
            mix = self.colors[band]
            mean = 0.45 * (c0 + c1) + 0.1 * c2
        elif self.kind == "dots":
            cell = q - np.floor(q) - 0.5
            inside = (cell * cell).sum(1) < 0.16
            mix = np.where(inside[:, None], c1, c0)
            mean = 0.73 * c0 + 0.27 * c1  # dot radius 0.4: area 4/3 pi 0.4^3 of a unit cell (solid)
        else:
            if self.kind == "noise":
                x = noise.fbm(q, 4)
                x = np.clip((x - 0.5) * 2.2 + 0.5, 0.0, 1.0)  # stretch: fBm values bunch near 0.5
            elif self.kind == "marble":
                x = 0.5 + 0.5 * np.sin(2 * np.pi * ((p @ self.direction) * self.freq + 1.5 * noise.fbm(q, 3)))
            else:  # gradient, broken up by noise so that it still has features to match
                g = (p @ self.direction) * self.freq * 0.5
                x = np.clip(0.5 + 0.5 * np.tanh(g) + 0.35 * (noise.fbm(q * 1.7, 3) - 0.5), 0.0, 1.0)
            # Piecewise-linear ramp c0 -> c1 -> c2.
            lo = np.clip(2 * x, 0, 1)[:, None]
            hi = np.clip(2 * x - 1, 0, 1)[:, None]
            mix = c0 + lo * (c1 - c0) + hi * (c2 - c1)
            mean = c1
        fine = 2.0 * noise.value(q * 4.0 + 101.7) - 1.0
        if footprint is not None:
            fp = footprint * self.freq  # pixel size in pattern periods
            mix = mean + np.clip(2.0 - 4.0 * fp, 0.0, 1.0)[:, None] * (mix - mean)
            fine = fine * np.clip(2.0 - 16.0 * fp, 0.0, 1.0)  # the detail noise is 4x finer
        return np.clip(mix * (1.0 + self.detail * fine[:, None]), 0.0, 1.0)


def _contrasting_colors(rng: np.random.Generator, muted: bool) -> np.ndarray:
    h = rng.random()
    s_hi = 0.45 if muted else 0.85
    bright = hsv_to_rgb(h, rng.uniform(0.2, s_hi), rng.uniform(0.75, 0.97))
    dark = hsv_to_rgb(h + rng.uniform(0.2, 0.8), rng.uniform(0.3, s_hi + 0.1), rng.uniform(0.2, 0.45))
    mid = hsv_to_rgb(h + rng.uniform(-0.15, 0.15), rng.uniform(0.3, s_hi + 0.1), rng.uniform(0.5, 0.7))
    pair = [bright, dark] if rng.random() < 0.5 else [dark, bright]
    return np.stack([pair[0], mid, pair[1]] if rng.random() < 0.5 else [pair[0], pair[1], mid])


def sample_texture(rng: np.random.Generator, kind: str, size: float, muted: bool = False) -> Texture:
    """Random texture of ``kind`` whose pattern period suits an object of characteristic ``size``."""
    if kind not in TEXTURE_KINDS:
        raise ValueError(f"unknown texture kind {kind!r}; valid: {', '.join(TEXTURE_KINDS)}")
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    cycles = {
        "checker": (2.0, 4.0),
        "stripes": (2.5, 5.0),
        "noise": (1.5, 3.0),
        "marble": (0.8, 1.6),
        "dots": (2.5, 4.5),
        "gradient": (0.8, 1.5),
    }[kind]
    return Texture(
        kind=kind,
        colors=_contrasting_colors(rng, muted),
        freq=float(rng.uniform(*cycles) / size),
        direction=direction,
        offset=rng.uniform(0.0, 64.0, size=3),
        detail=float(rng.uniform(0.08, 0.2)),
    )
