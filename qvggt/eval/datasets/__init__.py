"""Evaluation datasets behind one interface (:class:`EvalDataset` yielding :class:`EvalSample`).

Build one from a spec with :func:`make_dataset`: ``"synthetic"`` / ``"synthetic:eval"`` (held-out procedural
scenes), ``"synthetic:calib"``, ``"co3d:<root>"`` (Co3Dv2, pose only), ``"7scenes:<root>"`` (RGB-D, depth and
points). Conventions (OpenCV camera-from-world extrinsics, pixel intrinsics of the preprocessed image with the
origin at the first pixel centre) are in :mod:`qvggt.eval.datasets.base`.
"""

from qvggt.eval.datasets.base import (
    DATASET_SPECS,
    EvalDataset,
    EvalSample,
    make_dataset,
    preprocessed_intrinsics,
    scene_key,
)
from qvggt.eval.datasets.co3d import (
    CO3D_VGGT_CATEGORIES,
    Co3DDataset,
    co3d_ndc_to_pixel_intrinsics,
    pytorch3d_to_opencv_extrinsics,
    resolve_co3d_categories,
)
from qvggt.eval.datasets.seven_scenes import KINECT_INTRINSICS, SevenScenesDataset, resize_depth_nearest
from qvggt.eval.datasets.synthetic import SyntheticEvalDataset

__all__ = [
    "CO3D_VGGT_CATEGORIES",
    "DATASET_SPECS",
    "KINECT_INTRINSICS",
    "Co3DDataset",
    "EvalDataset",
    "EvalSample",
    "SevenScenesDataset",
    "SyntheticEvalDataset",
    "co3d_ndc_to_pixel_intrinsics",
    "make_dataset",
    "preprocessed_intrinsics",
    "pytorch3d_to_opencv_extrinsics",
    "resize_depth_nearest",
    "resolve_co3d_categories",
    "scene_key",
]
