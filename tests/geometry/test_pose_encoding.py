"""Pose encoding <-> extrinsics/intrinsics and quaternion conversions on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from qvggt.geometry.rotation import mat_to_quat, quat_to_mat


def _rot_z(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_known_rotation_quaternion() -> None:
    # 90 degrees about z: q = (0, 0, sin 45, cos 45) in XYZW.
    q = mat_to_quat(_rot_z(90.0).double())
    s = math.sqrt(0.5)
    assert torch.allclose(q, torch.tensor([0.0, 0.0, s, s], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(quat_to_mat(q), _rot_z(90.0).double(), atol=1e-12)


def test_quaternion_round_trip_including_near_180_degrees() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(500, 4, generator=g, dtype=torch.float64)
    q = torch.cat([q, torch.tensor([[1.0, 0.0, 0.0, 1e-9], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)])
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[..., 3:] < 0, -q, q)  # standard form: real part >= 0
    back = mat_to_quat(quat_to_mat(q))
    # q and -q are the same rotation; compare rotations for the 180-degree cases.
    assert torch.allclose(quat_to_mat(back), quat_to_mat(q), atol=1e-9)
    assert torch.allclose(back[:500], q[:500], atol=1e-9)
    assert (back[..., 3] >= 0).all()


def test_unnormalised_quaternion_gives_a_rotation() -> None:
    R = quat_to_mat(torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R, _rot_z(90.0).double(), atol=1e-12)


def test_pose_encoding_round_trip_and_known_intrinsics() -> None:
    H, W = 392, 518
    R = torch.stack([_rot_z(d) for d in (0.0, 30.0, -120.0)])
    T = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 2.0], [3.0, 0.1, -0.2]])
    extr = torch.cat([R, T[..., None]], dim=-1)[None]  # [1, 3, 3, 4]
    K = torch.tensor([[300.0, 0.0, W / 2], [0.0, 310.0, H / 2], [0.0, 0.0, 1.0]]).expand(1, 3, 3, 3)
    enc = extri_intri_to_pose_encoding(extr, K, (H, W))
    assert enc.shape == (1, 3, 9)
    assert torch.allclose(enc[..., 7], torch.full((1, 3), 2 * math.atan(H / 2 / 310.0)))
    assert torch.allclose(enc[..., 8], torch.full((1, 3), 2 * math.atan(W / 2 / 300.0)))
    extr2, K2 = pose_encoding_to_extri_intri(enc, (H, W))
    assert torch.allclose(extr2, extr, atol=1e-5)
    assert torch.allclose(K2, K, atol=1e-3)


def test_errors() -> None:
    with pytest.raises(ValueError, match="9 values"):
        pose_encoding_to_extri_intri(torch.zeros(1, 2, 8), (14, 14))
    with pytest.raises(ValueError, match="image_hw"):
        pose_encoding_to_extri_intri(torch.zeros(1, 2, 9))
    with pytest.raises(ValueError, match="3, 3"):
        mat_to_quat(torch.zeros(2, 4, 4))
