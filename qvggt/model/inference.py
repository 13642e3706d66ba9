"""One scene through a VGGT model, as numpy: the step ``qvggt predict`` and ``qvggt eval`` share."""

from __future__ import annotations

import numpy as np
import torch

from qvggt.geometry.pose_encoding import pose_encoding_to_extri_intri
from qvggt.model.vggt import VGGT

__all__ = ["infer_scene"]


@torch.no_grad()
def infer_scene(model: VGGT, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """Forward pass on one scene's [S, 3, H, W] images (moved to the model's device).

    Returns:
        The model's tensor outputs as float32 numpy arrays without the batch dim (``pose_enc`` [S, 9], ``depth``
        [S, H, W, 1], ``depth_conf``, ``world_points`` [S, H, W, 3], ``world_points_conf``, ...), plus the decoded
        cameras: ``extrinsic`` [S, 3, 4] (world to camera, OpenCV) and ``intrinsic`` [S, 3, 3] in pixels.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"infer_scene expects one scene's images as [S, 3, H, W], got {tuple(images.shape)}")
    device = next(model.parameters()).device
    images = images.to(device)
    out = model(images, dtype=dtype)
    extrinsic, intrinsic = pose_encoding_to_extri_intri(out["pose_enc"], images.shape[-2:])
    arrays = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    arrays.update(extrinsic=extrinsic, intrinsic=intrinsic)
    return {k: v[0].float().cpu().numpy() for k, v in arrays.items()}
