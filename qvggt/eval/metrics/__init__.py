"""Evaluation metrics: camera pose (Co3Dv2 protocol), depth, point maps, quantization fidelity, statistics.

Pure functions, numpy in and out (torch tensors accepted); see each module for shapes and degenerate inputs.
"""

from qvggt.eval.metrics._common import top_percent_mask
from qvggt.eval.metrics.depth import depth_metrics, select_depth_pixels
from qvggt.eval.metrics.fidelity import fidelity_metrics, rel_l2
from qvggt.eval.metrics.pointmap import align_points, chamfer_metrics, estimate_normals, pointmap_metrics, umeyama
from qvggt.eval.metrics.pose import (
    pose_auc,
    pose_errors,
    pose_metrics,
    pose_pairs,
    reference_yaw_deg,
    relative_poses,
    rotation_angle_deg,
    rra,
    rta,
    translation_angle_deg,
)
from qvggt.eval.metrics.stats import paired_bootstrap, retention

__all__ = [
    "align_points",
    "chamfer_metrics",
    "depth_metrics",
    "estimate_normals",
    "fidelity_metrics",
    "paired_bootstrap",
    "pointmap_metrics",
    "pose_auc",
    "pose_errors",
    "pose_metrics",
    "pose_pairs",
    "reference_yaw_deg",
    "rel_l2",
    "relative_poses",
    "retention",
    "rotation_angle_deg",
    "rra",
    "rta",
    "select_depth_pixels",
    "top_percent_mask",
    "translation_angle_deg",
    "umeyama",
]
