"""VGGT's 9-d camera encoding <-> OpenCV extrinsics / pinhole intrinsics.

Encoding ``absT_quaR_FoV``: [T (3), quaternion XYZW (4), fov_h, fov_w]. Extrinsics are camera-from-world
[R | T] (OpenCV: x right, y down, z forward); intrinsics have the principal point at the image centre.
Shape legend: ... any leading dims (typically B, S).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvggt.geometry.rotation import mat_to_quat, quat_to_mat


def extri_intri_to_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """extrinsics [..., 3, 4], intrinsics [..., 3, 3], image (H, W) -> pose encoding [..., 9] float32."""
    H, W = image_hw
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def pose_encoding_to_extri_intri(
    pose_enc: Tensor, image_hw: tuple[int, int] | None = None, build_intrinsics: bool = True
) -> tuple[Tensor, Tensor | None]:
    """pose encoding [..., 9] -> (extrinsics [..., 3, 4], intrinsics [..., 3, 3] or None).

    fy = (H/2) / tan(fov_h/2), fx = (W/2) / tan(fov_w/2), principal point (W/2, H/2).
    """
    if pose_enc.shape[-1] != 9:
        raise ValueError(f"pose encoding must have 9 values in its last dim, got {tuple(pose_enc.shape)}")
    R = quat_to_mat(pose_enc[..., 3:7])
    extrinsics = torch.cat([R, pose_enc[..., :3, None]], dim=-1)
    if not build_intrinsics:
        return extrinsics, None
    if image_hw is None:
        raise ValueError("image_hw (H, W) is needed to build intrinsics from the field of view")
    H, W = image_hw
    intrinsics = torch.zeros(pose_enc.shape[:-1] + (3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intrinsics[..., 0, 0] = (W / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    intrinsics[..., 1, 1] = (H / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    intrinsics[..., 0, 2] = W / 2
    intrinsics[..., 1, 2] = H / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics
