"""Co3Dv2 (Common Objects in 3D v2) camera-pose evaluation data, read from the published directory layout.

Layout (``<root>`` as downloaded)::

    <root>/<category>/frame_annotations.jgz              gzip JSON list of frame dicts
    <root>/<category>/sequence_annotations.jgz           gzip JSON list: sequence_name, viewpoint_quality_score, ...
    <root>/<category>/set_lists/set_lists_<subset>.json  {"train"|"val"|"test": [[sequence_name, frame_number,
                                                          image_path], ...]}
    <root>/<image_path>                                  e.g. apple/110_13051_23361/images/frame000001.jpg

Selection (VGGT's evaluation protocol, from its ``preprocess_co3d.py`` / ``test_co3d.py``): VGGT's 41 categories
(:data:`CO3D_VGGT_CATEGORIES`; a full Co3Dv2 has 51) unless others are asked for; the ``split`` list of
``set_lists_<subset>.json`` (default subset ``fewview_dev``, split ``test``); sequences with
``viewpoint_quality_score > min_quality`` (0.5); at least ``max(min_sequence_length, num_frames)`` listed frames
(50); no listed frame with a broken pose, ``T[0] + T[1] + T[2] > 1e5`` (VGGT's sanity check on the PyTorch3D
viewpoint ``T``; a non-finite ``T`` counts as broken too); ``num_frames`` (10) distinct frames drawn per sequence.
One sample per sequence; sequences and their frames keep set-list order.

Frame draw: ``np.random.default_rng([seed, zlib.crc32(f"{category}/{sequence_name}")]).choice(n, num_frames,
replace=False)`` over the sequence's listed frames. Unlike VGGT's script (one global ``np.random.seed(0)`` stream
consumed sequence after sequence), the draw of one sequence does not depend on which others are loaded, so a
subset of categories gives the same samples. The frames are kept in DRAW order, not sorted (as VGGT: the first
drawn frame is the reference view); ``frame_ids`` are the frame numbers as strings.

Cameras (PyTorch3D -> OpenCV; checked against PyTorch3D's ``_opencv_from_cameras_projection`` and implicitron's
``_get_pytorch3d_camera``):

- PyTorch3D: row vectors ``X_view = X_world @ R + T``; view axes +X left, +Y up, +Z forward. OpenCV flips x and y:
  ``F = diag(-1, -1, 1)``, ``R_cv = F @ R^T``, ``t_cv = F @ T`` (camera-from-world ``[R_cv | t_cv]``).
- NDC intrinsics: ``x_ndc = fx X/Z + px`` (PyTorch3D view coordinates), NDC +1 at the left/top image EDGE
  (align_corners=False). Pixel ``x_s = W/2 - x_ndc * s_x``, ``y_s = H/2 - y_ndc * s_y`` with the origin at the
  top-left image CORNER. ``intrinsics_format`` ``"ndc_isotropic"`` (what Co3Dv2 files store):
  ``s_x = s_y = min(H, W)/2``; ``"ndc_norm_image_bounds"`` (the default of Co3D's own ``ViewpointAnnotation``
  when the key is absent; legacy Co3Dv1): ``s_x = W/2``, ``s_y = H/2``. So ``fx_px = fx s_x``, ``fy_px = fy s_y``,
  ``cx_s = W/2 - px s_x``, ``cy_s = H/2 - py s_y``. PyTorch3D's OpenCV conversion stops here; this module then
  moves the origin to the top-left pixel CENTRE (the project convention, see :mod:`.base`): ``cx = cx_s - 0.5``,
  ``cy = cy_s - 0.5``.
- Preprocessing (crop mode, ``target_size``) then goes through :func:`.base.preprocessed_intrinsics`.

Co3D has no metric depth/points for this protocol: ``depth``, ``valid_mask``, ``world_points`` are None.

Legend for shapes: S = ``num_frames``; H x W the preprocessed size (``W = target_size``).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qvggt.data.images import DEFAULT_TARGET_SIZE, check_target_size, load_images
from qvggt.eval.datasets.base import EvalDataset, EvalSample, preprocessed_intrinsics

__all__ = [
    "CO3D_VGGT_CATEGORIES",
    "Co3DDataset",
    "co3d_ndc_to_pixel_intrinsics",
    "pytorch3d_to_opencv_extrinsics",
    "resolve_co3d_categories",
]

#: The 41 categories VGGT reports Co3Dv2 results on (its ``SEEN_CATEGORIES``).
CO3D_VGGT_CATEGORIES: tuple[str, ...] = (
    "apple", "backpack", "banana", "baseballbat", "baseballglove", "bench", "bicycle", "bottle", "bowl",
    "broccoli", "cake", "car", "carrot", "cellphone", "chair", "cup", "donut", "hairdryer", "handbag", "hydrant",
    "keyboard", "laptop", "microwave", "motorcycle", "mouse", "orange", "parkingmeter", "pizza", "plant",
    "stopsign", "teddybear", "toaster", "toilet", "toybus", "toyplane", "toytrain", "toytruck", "tv", "umbrella",
    "vase", "wineglass",
)  # fmt: skip

_FRAME_FILE = "frame_annotations.jgz"
_MAX_POSE_T_SUM = 1e5  # VGGT's test_co3d.py drops a sequence with any frame whose T[0] + T[1] + T[2] exceeds this
_SEQUENCE_FILE = "sequence_annotations.jgz"
_FLIP_XY = np.diag([-1.0, -1.0, 1.0])


def pytorch3d_to_opencv_extrinsics(rotation: Any, translation: Any) -> np.ndarray:
    """PyTorch3D ``R`` [3, 3] (row-vector convention) and ``T`` [3] -> OpenCV camera-from-world float64 [3, 4]
    ``[F R^T | F T]`` with ``F = diag(-1, -1, 1)``."""
    r = np.asarray(rotation, dtype=np.float64).reshape(3, 3)
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    return np.concatenate([_FLIP_XY @ r.T, (_FLIP_XY @ t)[:, None]], axis=1)


def co3d_ndc_to_pixel_intrinsics(
    focal_length: Sequence[float],
    principal_point: Sequence[float],
    image_size_hw: Sequence[int],
    intrinsics_format: str = "ndc_isotropic",
) -> np.ndarray:
    """Co3D NDC focal length / principal point -> pixel ``K`` float64 [3, 3] of the ORIGINAL image, origin at the
    top-left pixel centre (see the module docstring for the formulas)."""
    h, w = (float(x) for x in image_size_hw)
    fmt = intrinsics_format.lower()
    if fmt == "ndc_isotropic":
        sx = sy = min(h, w) / 2.0
    elif fmt == "ndc_norm_image_bounds":
        sx, sy = w / 2.0, h / 2.0
    else:
        valid = "'ndc_isotropic' or 'ndc_norm_image_bounds'"
        raise ValueError(f"unknown Co3D intrinsics_format {intrinsics_format!r}; expected {valid}")
    fx, fy = (float(v) for v in focal_length)
    px, py = (float(v) for v in principal_point)
    # -0.5: PyTorch3D pixel coordinates put the origin at the image corner, ours at the first pixel centre.
    return np.array([[fx * sx, 0.0, w / 2.0 - px * sx - 0.5], [0.0, fy * sy, h / 2.0 - py * sy - 0.5], [0, 0, 1.0]])


def _read_jgz(path: Path) -> Any:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read Co3D annotation file {path}: {type(exc).__name__}: {exc}") from exc


def resolve_co3d_categories(root: str | Path, categories: Sequence[str] | str | None) -> tuple[list[str], list[str]]:
    """The categories a :class:`Co3DDataset` reads (see its ``categories`` argument), and the VGGT categories absent
    under ``root`` when the default was asked for. Cheap: looks for the category folders only.

    Raises:
        FileNotFoundError: no ``root``, or no category folder (none of VGGT's 41, for the default) under it.
        ValueError: an empty list.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Co3D root not found or not a directory: {root}")
    present = sorted(p.parent.name for p in root.glob(f"*/{_FRAME_FILE}"))
    if isinstance(categories, str) and categories.strip().lower() not in ("vggt", "all"):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    if categories is not None and not isinstance(categories, str):
        if not categories:
            raise ValueError("categories must name at least one Co3D category")
        return list(categories), []
    if categories is not None and categories.strip().lower() == "all":
        chosen, missing = present, []
    else:
        chosen = [c for c in CO3D_VGGT_CATEGORIES if c in present]
        missing = [c for c in CO3D_VGGT_CATEGORIES if c not in present]
    if not chosen:
        which = "category folders" if not present else f"folders of VGGT's 41 categories (found {present})"
        hint = "; pass categories='all' (--categories all) to use every category" if present else ""
        raise FileNotFoundError(f"no Co3D {which} under {root}: expected <root>/<category>/{_FRAME_FILE}{hint}")
    return chosen, missing


@dataclass(frozen=True)
class _Selected:
    category: str
    sequence_name: str
    frame_numbers: tuple[int, ...]  # draw order
    image_paths: tuple[str, ...]  # relative to root


class Co3DDataset(EvalDataset):
    """Co3Dv2 pose evaluation samples (see the module docstring for layout, selection and camera conventions).

    Args:
        root: the Co3Dv2 root directory.
        categories: category folder names (a list, or one comma-separated string); ``None`` or ``"vggt"`` = the
            41 :data:`CO3D_VGGT_CATEGORIES` VGGT reports, those present under ``root`` (the absent ones are in
            ``missing_categories``); ``"all"`` = every folder holding a ``frame_annotations.jgz``.
        split: ``"test"`` (evaluation), ``"train"`` (e.g. calibration) or ``"val"``.
        subset: set list name, ``set_lists/set_lists_<subset>.json``.
        num_frames: frames drawn per sequence (S).
        min_sequence_length: minimum listed frames of a sequence in the split (lower it for small test copies).
        min_quality: keep sequences with ``viewpoint_quality_score > min_quality``; ``None`` keeps all.
        seed: frame draw seed.
        target_size: crop-mode preprocessing width (multiple of 14).

    Samples: ``images`` [S, 3, H, W], ``extrinsics`` [S, 3, 4], ``intrinsics`` [S, 3, 3]; no depth/points.
    ``sample_id`` = ``co3d/<category>/<sequence_name>/frames-<n1>-<n2>-...`` (frame numbers in draw order).
    All annotations are read at construction (the pose filter needs every listed frame's ``T``); only the drawn
    frames' annotations are kept.

    Raises:
        FileNotFoundError: missing root, category folder or annotation file (named).
        ValueError: unknown split, unreadable annotations, or nothing left after the filters (with the counts
            each filter removed).
    """

    name = "co3d"

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] | str | None = None,
        split: str = "test",
        subset: str = "fewview_dev",
        num_frames: int = 10,
        min_sequence_length: int = 50,
        min_quality: float | None = 0.5,
        seed: int = 0,
        target_size: int = DEFAULT_TARGET_SIZE,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Co3D root not found or not a directory: {self.root}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.split, self.subset, self.num_frames, self.seed = split, subset, int(num_frames), int(seed)
        self.min_sequence_length, self.min_quality = int(min_sequence_length), min_quality
        self.target_size = check_target_size(target_size)
        self.categories, self.missing_categories = resolve_co3d_categories(self.root, categories)
        for cat in self.categories:
            for f in self._annotation_files(cat):
                if not f.is_file():
                    raise FileNotFoundError(f"Co3D annotation file missing: {f}")

        self._samples: dict[str, _Selected] = {}
        # (category, sequence, frame number) -> frame annotation, for the drawn frames only: a category's file can
        # hold >100k frames.
        self._frames: dict[tuple[str, str, int], dict[str, Any]] = {}
        counts = {"listed": 0, "quality": 0, "length": 0, "pose": 0}
        for cat in self.categories:
            for sel in self._select(cat, counts):
                sid = f"co3d/{cat}/{sel.sequence_name}/frames-" + "-".join(str(n) for n in sel.frame_numbers)
                self._samples[sid] = sel
        if not self._samples:
            min_len = max(self.min_sequence_length, self.num_frames)
            raise ValueError(
                f"Co3D selection is empty for categories {self.categories} (split={split!r}, subset={subset!r}): "
                f"{counts['listed']} sequences listed in the split; {counts['quality']} removed by the quality "
                f"filter (viewpoint_quality_score > {min_quality}); {counts['length']} removed for having fewer "
                f"than max(min_sequence_length={self.min_sequence_length}, num_frames={num_frames}) = {min_len} "
                f"listed frames; {counts['pose']} removed for a broken pose (T[0] + T[1] + T[2] > "
                f"{_MAX_POSE_T_SUM:g}). Lower min_quality/min_sequence_length or pick another split/subset."
            )

    def settings(self) -> dict[str, object]:
        return {
            "num_frames": self.num_frames, "target_size": self.target_size, "split": self.split,
            "subset": self.subset, "min_quality": self.min_quality, "min_sequence_length": self.min_sequence_length,
            "seed": self.seed, "categories": self.categories,
        }  # fmt: skip

    def _annotation_files(self, category: str) -> tuple[Path, Path, Path]:
        d = self.root / category
        return d / _FRAME_FILE, d / _SEQUENCE_FILE, d / "set_lists" / f"set_lists_{self.subset}.json"

    def _select(self, category: str, counts: dict[str, int]) -> list[_Selected]:
        frame_file, seq_file, list_file = self._annotation_files(category)
        try:
            set_lists = json.loads(list_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read Co3D set list {list_file}: {exc}") from exc
        if self.split not in set_lists:
            raise ValueError(f"{list_file} has no {self.split!r} list (keys: {sorted(set_lists)})")
        quality = {s["sequence_name"]: s.get("viewpoint_quality_score") for s in _read_jgz(seq_file)}

        frames: dict[str, list[tuple[int, str]]] = {}  # set-list order, as VGGT's preprocessing
        for seq_name, frame_number, image_path in set_lists[self.split]:
            frames.setdefault(seq_name, []).append((int(frame_number), image_path))
        kept: dict[str, list[tuple[int, str]]] = {}
        min_len = max(self.min_sequence_length, self.num_frames)
        for seq_name, seq_frames in frames.items():
            counts["listed"] += 1
            score = quality.get(seq_name)
            if self.min_quality is not None and (score is None or not score > self.min_quality):
                counts["quality"] += 1  # a sequence without a score fails too (VGGT keeps only scored ones)
                continue
            if len(seq_frames) < min_len:
                counts["length"] += 1
                continue
            kept[seq_name] = seq_frames
        if not kept:
            return []
        listed = {(seq, n) for seq, seq_frames in kept.items() for n, _ in seq_frames}
        annotations: dict[tuple[str, int], dict[str, Any]] = {}
        broken: set[str] = set()
        for fa in _read_jgz(frame_file):
            key = (fa["sequence_name"], int(fa["frame_number"]))
            if key not in listed:
                continue
            annotations[key] = fa
            t = np.asarray(fa["viewpoint"]["T"], dtype=np.float64)
            # VGGT's test: the plain sum, not its magnitude; a non-finite T would poison every pose error.
            if not np.isfinite(t).all() or t[:3].sum() > _MAX_POSE_T_SUM:
                broken.add(key[0])
        out = []
        for seq_name, seq_frames in kept.items():
            if seq_name in broken:
                counts["pose"] += 1
                continue
            key = zlib.crc32(f"{category}/{seq_name}".encode())
            idx = np.random.default_rng([self.seed, key]).choice(len(seq_frames), self.num_frames, replace=False)
            chosen = [seq_frames[i] for i in idx]
            out.append(_Selected(category, seq_name, tuple(n for n, _ in chosen), tuple(p for _, p in chosen)))
            for n, _ in chosen:
                if (seq_name, n) in annotations:  # a missing one is reported by load, naming the file
                    self._frames[(category, seq_name, n)] = annotations[(seq_name, n)]
        return out

    def sample_ids(self) -> list[str]:
        return list(self._samples)

    def load(self, sample_id: str) -> EvalSample:
        sel = self._samples.get(sample_id)
        if sel is None:
            raise self._unknown(sample_id)
        paths = [self.root / p for p in sel.image_paths]
        extrinsics, intrinsics, size = [], [], None
        for n, path in zip(sel.frame_numbers, paths, strict=True):
            fa = self._frames.get((sel.category, sel.sequence_name, n))
            if fa is None:
                raise ValueError(f"{self._annotation_files(sel.category)[0]} has no frame {n} of {sel.sequence_name}")
            h, w = (int(x) for x in fa["image"]["size"])
            try:
                with Image.open(path) as img:  # header only: the size decides the crop geometry
                    actual = img.size
            except OSError as exc:
                raise ValueError(f"cannot open Co3D image {path}: {exc}") from exc
            if actual != (w, h):
                raise ValueError(f"{path} is {actual[0]}x{actual[1]} but its annotation says {w}x{h} (WxH)")
            if size is not None and size != (w, h):
                raise ValueError(f"{sample_id}: frames differ in size ({size} vs {(w, h)}); cannot batch them")
            size = (w, h)
            vp = fa["viewpoint"]
            extrinsics.append(pytorch3d_to_opencv_extrinsics(vp["R"], vp["T"]))
            fmt = vp.get("intrinsics_format", "ndc_norm_image_bounds")  # Co3D's dataclass default
            intrinsics.append(co3d_ndc_to_pixel_intrinsics(vp["focal_length"], vp["principal_point"], (h, w), fmt))
        assert size is not None
        k, out_hw = preprocessed_intrinsics(np.stack(intrinsics), size[0], size[1], self.target_size, "crop")
        images = load_images(paths, mode="crop", target_size=self.target_size).numpy()
        assert images.shape[2:] == out_hw, (images.shape, out_hw)
        return EvalSample(
            sample_id=sample_id,
            category=sel.category,
            images=images.astype(np.float32, copy=False),
            extrinsics=np.stack(extrinsics).astype(np.float32),
            intrinsics=k.astype(np.float32),
            depth=None,
            valid_mask=None,
            world_points=None,
            frame_ids=tuple(str(n) for n in sel.frame_numbers),
        )
