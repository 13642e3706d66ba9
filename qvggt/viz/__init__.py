"""Visualisation: PLY point clouds, confidence filtering, and prediction summary figures (matplotlib Agg)."""

from qvggt.viz.figure import save_prediction_figure
from qvggt.viz.pointcloud import (
    VIEWS,
    colors_to_uint8,
    confident_points,
    read_ply,
    render_points,
    write_ply,
)

__all__ = [
    "VIEWS",
    "colors_to_uint8",
    "confident_points",
    "read_ply",
    "render_points",
    "save_prediction_figure",
    "write_ply",
]
