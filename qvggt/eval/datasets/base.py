"""The one interface every evaluation dataset implements: :class:`EvalSample` and :class:`EvalDataset`.

Legend for shapes: S frames of one sample, H x W the PREPROCESSED image size (what the model sees; multiples
of 14).

Conventions shared by all datasets
----------------------------------
- ``extrinsics`` are camera-from-world ``[R | t]`` in OpenCV axes (x right, y down, z forward):
  ``x_cam = R x_world + t``.
- ``intrinsics`` are in pixels of the preprocessed image with the origin at the centre of the top-left pixel
  (OpenCV; the convention of :mod:`qvggt.data.synthetic` and of VGGT's depth unprojection): pixel ``(u, v)``
  (column, row) is the image point ``(u, v)`` and ``K @ x_cam / z = (u, v, 1)``.
- ``depth`` is the camera-frame z in the dataset's units (metres for 7-Scenes); 0 marks invalid pixels, and
  ``valid_mask``/``world_points`` follow it (``world_points`` are 0 where invalid).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qvggt.data.images import DEFAULT_TARGET_SIZE, preprocess_geometry

__all__ = ["DATASET_SPECS", "EvalDataset", "EvalSample", "make_dataset", "preprocessed_intrinsics", "scene_key"]


def scene_key(sample_id: str) -> str:
    """The scene a sample id draws its frames from: the id without a trailing ``frames-...`` part.

    ``"co3d/apple/110_13051_23361/frames-3-17"`` -> ``"co3d/apple/110_13051_23361"`` (dataset, category,
    sequence); synthetic ids (``"synthetic/boxes/200003"``) already name one scene and are returned unchanged.
    Two samples with the same key show the same scene, whatever frames or frame count were drawn: what a
    calibration / evaluation leakage check must compare.
    """
    head, sep, last = sample_id.rpartition("/")
    return head if sep and last.startswith("frames-") else sample_id


def preprocessed_intrinsics(
    intrinsics: np.ndarray, width: int, height: int, target_size: int = DEFAULT_TARGET_SIZE, mode: str = "crop"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Carry pixel intrinsics of a ``width x height`` image through VGGT's preprocessing.

    Args:
        intrinsics: float [..., 3, 3] in pixels of the original image, origin at the top-left pixel centre.
        width, height: original image size.
        target_size, mode: as for :func:`qvggt.data.images.preprocess_pil`.

    Returns:
        ``(K', (H', W'))``: float64 [..., 3, 3] for the preprocessed image and its size. With
        ``(new_w, new_h, x0, y0) = preprocess_geometry(...)``, ``sx = new_w / width``, ``sy = new_h / height``:
        ``fx' = fx sx``, ``fy' = fy sy``, ``cx' = (cx + 0.5) sx - 0.5 - x0``, ``cy' = (cy + 0.5) sy - 0.5 - y0``
        (the resize is centre-aligned, so it scales corner-origin coordinates ``u + 0.5``; ``x0, y0`` are the
        crop start / minus the padding).
    """
    new_w, new_h, x0, y0 = preprocess_geometry(width, height, mode, target_size)
    sx, sy = new_w / width, new_h / height
    k = np.array(intrinsics, dtype=np.float64, copy=True)
    k[..., 0, :] *= sx  # fx, skew, cx all scale with x
    k[..., 1, :] *= sy
    k[..., 0, 2] += 0.5 * sx - 0.5 - x0
    k[..., 1, 2] += 0.5 * sy - 0.5 - y0
    out_h = target_size if mode == "pad" else min(new_h, target_size)
    out_w = target_size if mode == "pad" else new_w
    return k, (out_h, out_w)


@dataclass(frozen=True, eq=False)
class EvalSample:
    """One evaluation input (a set of S views) with whatever ground truth its dataset has.

    Fields:

    - ``sample_id`` stable, unique, human-readable id, e.g. ``"synthetic/boxes/200003"``,
      ``"co3d/apple/110_13051_23361/frames-3-17-..."``, ``"7scenes/chess/seq-03/frames-0-20-..."``.
    - ``category`` object category / scene name.
    - ``images`` float32 [S, 3, H, W] in [0, 1], already preprocessed for the model.
    - ``extrinsics`` float32 [S, 3, 4] camera-from-world OpenCV, or None.
    - ``intrinsics`` float32 [S, 3, 3] in preprocessed pixels (see the module docstring), or None.
    - ``depth`` float32 [S, H, W], 0 = invalid, or None.
    - ``valid_mask`` bool [S, H, W], or None (given whenever ``depth`` is).
    - ``world_points`` float32 [S, H, W, 3], 0 where invalid, or None.
    - ``frame_ids`` tuple of S strings naming the frames used (file stems, frame numbers), in ``images`` order.
    """

    sample_id: str
    category: str
    images: np.ndarray
    extrinsics: np.ndarray | None
    intrinsics: np.ndarray | None
    depth: np.ndarray | None
    valid_mask: np.ndarray | None
    world_points: np.ndarray | None
    frame_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        # Fail at construction, naming the sample, rather than deep inside a metric.
        img = self.images
        where = f"EvalSample {self.sample_id!r}"
        if not isinstance(img, np.ndarray) or img.ndim != 4 or img.shape[1] != 3 or img.dtype != np.float32:
            got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"{where}: images must be float32 [S, 3, H, W], got {got}")
        s, _, h, w = img.shape
        expected = {
            "extrinsics": ((s, 3, 4), np.float32),
            "intrinsics": ((s, 3, 3), np.float32),
            "depth": ((s, h, w), np.float32),
            "valid_mask": ((s, h, w), np.bool_),
            "world_points": ((s, h, w, 3), np.float32),
        }
        for name, (shape, dtype) in expected.items():
            arr = getattr(self, name)
            if arr is None:
                continue
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"{where}: {name} must be {np.dtype(dtype)} {list(shape)}, got {got}")
        if self.depth is not None and self.valid_mask is None:
            raise ValueError(f"{where}: valid_mask is required when depth is given")
        if len(self.frame_ids) != s or not all(isinstance(f, str) for f in self.frame_ids):
            raise ValueError(f"{where}: frame_ids must be {s} strings, got {self.frame_ids!r}")

    @property
    def num_frames(self) -> int:
        """S."""
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the preprocessed images."""
        return int(self.images.shape[2]), int(self.images.shape[3])


class EvalDataset(ABC):
    """A deterministic, ordered collection of :class:`EvalSample` addressed by sample id.

    Subclasses set ``name`` and implement :meth:`sample_ids` (cheap: no image is read) and :meth:`load`.
    Iteration yields ``load(i)`` for ``i`` in ``sample_ids()`` order.
    """

    name: str = "eval"

    @abstractmethod
    def sample_ids(self) -> list[str]:
        """All sample ids, in the dataset's fixed order."""

    @abstractmethod
    def load(self, sample_id: str) -> EvalSample:
        """Load one sample; ``KeyError`` naming a few valid ids if ``sample_id`` is not in this dataset."""

    def settings(self) -> dict[str, object]:
        """JSON-able settings that change a sample's content without changing its id (frame count, image size,
        ...): part of an evaluation's resume signature. Subclasses list theirs; the default has none."""
        return {}

    def category_of(self, sample_id: str) -> str:
        """The category of a sample without loading it; ids follow ``<dataset>/<category>/...``."""
        parts = sample_id.split("/")
        return parts[1] if len(parts) > 1 else ""

    def __len__(self) -> int:
        return len(self.sample_ids())

    def __iter__(self) -> Iterator[EvalSample]:
        for sid in self.sample_ids():
            yield self.load(sid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, samples={len(self)})"

    def _unknown(self, sample_id: str) -> KeyError:
        ids = self.sample_ids()
        shown = ", ".join(repr(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else "")
        return KeyError(f"{sample_id!r} is not a sample of dataset {self.name!r} ({len(ids)} samples: {shown})")


#: The accepted ``make_dataset`` spec forms, with what each builds.
DATASET_SPECS: dict[str, str] = {
    "synthetic": "held-out synthetic scenes (DataConfig.eval_seeds), same as synthetic:eval",
    "synthetic:eval": "held-out synthetic scenes (first n of DataConfig.eval_seeds)",
    "synthetic:calib": "calibration synthetic scenes (first n of DataConfig.calib_seeds)",
    "co3d:<root>": "Co3Dv2 in its published layout under <root>",
    "7scenes:<root>": "7-Scenes in its published layout under <root>",
}


def make_dataset(spec: str, **kwargs: object) -> EvalDataset:
    """Build a dataset from a spec string (see :data:`DATASET_SPECS`); ``kwargs`` go to its constructor.

    ``synthetic[:eval|:calib]`` -> :meth:`SyntheticEvalDataset.from_config` (e.g. ``n=16``, ``num_frames``),
    ``co3d:<root>`` -> :class:`Co3DDataset`, ``7scenes:<root>`` -> :class:`SevenScenesDataset`.
    Raises ``ValueError`` listing the valid forms for anything else.
    """
    # Imported here: the dataset modules import this one.
    from qvggt.eval.datasets.co3d import Co3DDataset
    from qvggt.eval.datasets.seven_scenes import SevenScenesDataset
    from qvggt.eval.datasets.synthetic import SyntheticEvalDataset

    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.strip().partition(":")  # split at the first colon only: paths may contain colons
    kind = kind.lower()
    if kind == "synthetic" and (not sep or arg in ("eval", "calib")):
        return SyntheticEvalDataset.from_config(split=arg or "eval", **kwargs)  # type: ignore[arg-type]
    if kind in ("co3d", "7scenes") and sep and arg.strip():
        cls = Co3DDataset if kind == "co3d" else SevenScenesDataset
        return cls(arg, **kwargs)  # type: ignore[arg-type]
    forms = "; ".join(f"{k!r}: {v}" for k, v in DATASET_SPECS.items())
    raise ValueError(f"unknown dataset spec {spec!r}; valid forms are {forms}")
