"""VGGT's losses on cases with known values."""

from __future__ import annotations

import math

import torch

from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding
from qvggt.train.losses import LossWeights, camera_loss, dense_loss, drop_outliers, point_map_normals, vggt_loss


def test_camera_loss_weights_stages_and_focal() -> None:
    gt = torch.zeros(1, 2, 9)
    pred = gt.clone()
    pred[..., :3] = 1.0  # T error 1 per coordinate
    pred[..., 7:] = 2.0  # FoV error 2
    w = LossWeights(camera_gamma=0.5)
    out = camera_loss([pred, pred], gt, torch.tensor([True]), w)
    stage_sum = (0.5 + 1.0) / 2  # gamma^(K-1-k) / K summed over K = 2 stages
    assert math.isclose(float(out["loss_T"]), stage_sum)
    assert math.isclose(float(out["loss_FL"]), 2 * stage_sum)
    assert math.isclose(float(out["loss_camera"]), stage_sum + 0.5 * 2 * stage_sum)
    none = camera_loss([pred], gt, torch.tensor([False]), w)
    assert float(none["loss_camera"]) == 0.0


def test_dense_loss_known_values() -> None:
    gt = torch.ones(1, 1, 20, 20, 1)
    pred = gt + 0.5
    conf = torch.full((1, 1, 20, 20), 2.0)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    out = dense_loss(pred, conf, gt, mask, "depth", LossWeights(conf_alpha=0.2, valid_range=1.0))
    assert math.isclose(float(out["loss_reg_depth"]), 0.5, rel_tol=1e-6)
    assert math.isclose(float(out["loss_conf_depth"]), 0.5 * 2 - 0.2 * math.log(2), rel_tol=1e-6)
    assert float(out["loss_grad_depth"]) == 0.0  # a constant error has no gradient
    few = dense_loss(pred, conf, gt, torch.zeros_like(mask), "depth", LossWeights())
    assert all(float(v) == 0.0 for v in few.values())


def test_normals_of_a_plane_and_normal_loss_zero_for_exact_points() -> None:
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    plane = torch.stack([xs, ys, torch.full_like(xs, 3.0)], dim=-1)[None]
    normals, valid = point_map_normals(plane, torch.ones(1, 6, 7, dtype=torch.bool))
    n = normals[valid]
    assert torch.allclose(n.abs(), torch.tensor([0.0, 0.0, 1.0]).expand_as(n))
    conf = torch.full((1, 1, 6, 7), 1.5)
    out = dense_loss(
        plane[:, None], conf, plane[:, None], torch.ones(1, 1, 6, 7, dtype=torch.bool), "point", LossWeights()
    )
    assert float(out["loss_grad_point"]) < 1e-6 and float(out["loss_reg_point"]) == 0.0


def test_outliers_above_the_quantile_are_dropped() -> None:
    loss = torch.cat([torch.linspace(0, 1, 2000), torch.full((10,), 50.0)])
    kept = drop_outliers(loss, 0.98)
    assert kept.max() < 1.0 and 1950 < kept.numel() < 2000


def test_outliers_of_a_large_batch_are_cut_exactly_and_without_random_draws() -> None:
    """Above torch.quantile's 1M-element limit the threshold is the exact order statistic, and the global generator
    is left alone (a resumed run does not restore it, so a draw there would break exact resume)."""
    loss = torch.arange(2_000_000, dtype=torch.float32) / 2_000_000  # uniform in [0, 1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    kept = drop_outliers(loss, 0.98)
    assert torch.equal(torch.get_rng_state(), before)
    assert kept.numel() == 1_959_999 and float(kept.max()) < 0.98  # everything below the 1,960,000th value


def test_total_loss_is_zero_camera_for_perfect_pose() -> None:
    B, S, H, W = 1, 2, 14, 14
    extr = torch.eye(3, 4).expand(B, S, 3, 4).clone()
    intr = torch.tensor([[20.0, 0, 7], [0, 20.0, 7], [0, 0, 1]]).expand(B, S, 3, 3)
    enc = extri_intri_to_pose_encoding(extr, intr, (H, W))
    batch = {
        "images": torch.rand(B, S, 3, H, W),
        "depth": torch.ones(B, S, H, W),
        "world_points": torch.ones(B, S, H, W, 3),
        "valid_mask": torch.ones(B, S, H, W, dtype=torch.bool),
        "extrinsics": extr,
        "intrinsics": intr,
    }
    preds = {"pose_enc_list": [enc]}
    out = vggt_loss(preds, batch)
    assert float(out["loss_camera"]) < 1e-6 and float(out["objective"]) < 1e-5
