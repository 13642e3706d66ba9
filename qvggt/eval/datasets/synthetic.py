"""Procedural synthetic scenes (:mod:`qvggt.data.synthetic`) as an evaluation dataset with exact ground truth.

Each sample is ``make_scene(seed, num_frames, height, width, category).normalized()``: VGGT's normalised frame
(first camera ``[I | 0]``, mean valid-point distance 1), so depth, points and translations are directly
comparable with the model's outputs. Sample ids are ``synthetic/<category>/<seed>``; ``frame_ids`` are
``("0", "1", ...)``.

Legend for shapes: S frames (``num_frames``), H x W the rendered size (multiples of 14).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from qvggt.config import DataConfig
from qvggt.data.synthetic import CATEGORIES, make_scene
from qvggt.eval.datasets.base import EvalDataset, EvalSample

__all__ = ["SyntheticEvalDataset"]


class SyntheticEvalDataset(EvalDataset):
    """Synthetic scenes for ``seeds``: one sample per seed, or per (seed, category) pair.

    Args:
        seeds: scene seeds (non-negative ints); use :meth:`from_config` for the project's held-out split.
        num_frames: S views per scene.
        height, width: rendered size H, W (multiples of 14).
        categories: ``None`` renders each seed in its default category ``CATEGORIES[seed % 8]``; a list renders
            every seed in every listed category (``len(seeds) * len(categories)`` samples, seed-major order).

    Samples: ``images`` [S, 3, H, W], ``extrinsics`` [S, 3, 4], ``intrinsics`` [S, 3, 3], ``depth`` [S, H, W],
    ``valid_mask`` [S, H, W] (the ray hit a surface), ``world_points`` [S, H, W, 3]; all exact.
    Rendering is deterministic and takes ~0.1 s per 8-frame 126x126 scene; nothing is cached.
    """

    name = "synthetic"

    def __init__(
        self,
        seeds: Sequence[int],
        num_frames: int = 8,
        height: int = 126,
        width: int = 126,
        categories: Sequence[str] | None = None,
    ) -> None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("SyntheticEvalDataset needs at least one seed")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be non-negative, got {[s for s in seeds if s < 0][:5]}")
        if categories is not None:
            unknown = [c for c in categories if c not in CATEGORIES]
            if unknown or not categories:
                raise ValueError(f"unknown synthetic categories {unknown}; valid: {list(CATEGORIES)}")
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % 14:
                raise ValueError(f"{name}={value} must be a positive multiple of 14")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.seeds, self.num_frames, self.height, self.width = seeds, int(num_frames), int(height), int(width)
        self.categories = None if categories is None else list(categories)
        pairs = (
            [(s, CATEGORIES[s % len(CATEGORIES)]) for s in seeds]
            if self.categories is None
            else [(s, c) for s in seeds for c in self.categories]
        )
        self._index = {f"synthetic/{c}/{s}": (s, c) for s, c in pairs}
        if len(self._index) != len(pairs):
            raise ValueError("duplicate seeds: every sample id must be unique")

    @classmethod
    def from_config(
        cls,
        n: int = 16,
        split: Literal["eval", "calib"] = "eval",
        data: DataConfig | None = None,
        categories: Sequence[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> SyntheticEvalDataset:
        """The first ``n`` seeds of ``data.eval_seeds`` (``split="eval"``, the held-out split) or of
        ``data.calib_seeds`` (``split="calib"``); ``data`` defaults to ``DataConfig()``, and frame count and
        size default to its ``num_frames``, ``height``, ``width``. The config guarantees the ranges are disjoint."""
        data = data or DataConfig()
        if split not in ("eval", "calib"):
            raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
        seed_range = (data.eval_seeds if split == "eval" else data.calib_seeds).seeds()
        if not 1 <= n <= len(seed_range):
            raise ValueError(f"n must be in [1, {len(seed_range)}] for the {split} seed range, got {n}")
        return cls(
            seed_range[:n],
            num_frames=data.num_frames if num_frames is None else num_frames,
            height=data.height if height is None else height,
            width=data.width if width is None else width,
            categories=categories,
        )

    @classmethod
    def held_out(cls, n: int = 16, **kwargs: object) -> SyntheticEvalDataset:
        """Shorthand for ``from_config(n, split="eval", **kwargs)``."""
        return cls.from_config(n, "eval", **kwargs)  # type: ignore[arg-type]

    def sample_ids(self) -> list[str]:
        return list(self._index)

    def settings(self) -> dict[str, object]:
        return {"num_frames": self.num_frames, "height": self.height, "width": self.width}

    def load(self, sample_id: str) -> EvalSample:
        if sample_id not in self._index:
            raise self._unknown(sample_id)
        seed, category = self._index[sample_id]
        scene = make_scene(seed, self.num_frames, self.height, self.width, category).normalized()
        return EvalSample(
            sample_id=sample_id,
            category=category,
            images=np.ascontiguousarray(scene.images, dtype=np.float32),
            extrinsics=scene.extrinsics.astype(np.float32),
            intrinsics=scene.intrinsics.astype(np.float32),
            depth=scene.depth.astype(np.float32),
            valid_mask=scene.valid_mask.astype(bool),
            world_points=scene.world_points.astype(np.float32),
            frame_ids=tuple(str(i) for i in range(self.num_frames)),
        )
