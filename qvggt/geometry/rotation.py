"""Quaternion <-> rotation matrix, quaternions scalar-last (XYZW) as VGGT encodes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quat_to_mat(q: Tensor) -> Tensor:
    """[..., 4] XYZW quaternions (any norm) -> [..., 3, 3] rotation matrices."""
    i, j, k, r = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)
    m = torch.stack(
        (
            1 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
            two_s * (i * j + k * r),
            1 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1 - two_s * (i * i + j * j),
        ),
        -1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def mat_to_quat(m: Tensor) -> Tensor:
    """[..., 3, 3] rotation matrices -> [..., 4] unit XYZW quaternions with non-negative real part.

    Picks, per matrix, the best-conditioned of the four candidate formulas (largest |component|), so the
    result is stable for rotations near 180 degrees.
    """
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"expected [..., 3, 3] rotation matrices, got {tuple(m.shape)}")
    batch = m.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.reshape(batch + (9,)).unbind(-1)
    q_abs = torch.stack(
        [1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22, 1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], dim=-1
    )
    q_abs = torch.where(q_abs > 0, q_abs.clamp(min=0).sqrt(), torch.zeros_like(q_abs))
    # Candidate (r, i, j, k) quaternions, each scaled by 4 * one of its components.
    cand = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    cand = cand / (2.0 * q_abs[..., None].clamp(min=0.1))
    best = F.one_hot(q_abs.argmax(dim=-1), num_classes=4).to(torch.bool)
    rijk = cand[best].reshape(batch + (4,))
    xyzw = rijk[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)
