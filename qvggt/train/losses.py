"""VGGT's training losses, in its normalised coordinates (first camera = identity, mean point distance 1).

Shape legend: B batch, S frames, H/W image size, C channels (1 depth, 3 points), K stages of the camera head.

- Camera: L1 between predicted and ground-truth pose encodings (T, quaternion, FoV; FoV weighted 0.5), over the
  K refinement passes with weights gamma^(K-1-k), averaged.
- Depth and points: ``gamma * ||pred - gt|| * conf - alpha * log(conf)`` (aleatoric confidence weighting) plus
  the unweighted regression term, plus a multi-scale gradient term (image-space gradients of the error for
  depth, surface normals for points); per-pixel losses above the ``valid_range`` quantile are dropped as
  outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding

MIN_VALID_PIXELS = 100


@dataclass(frozen=True)
class LossWeights:
    camera: float = 5.0
    depth: float = 1.0
    point: float = 1.0
    camera_gamma: float = 0.6
    focal: float = 0.5
    conf_alpha: float = 0.2
    valid_range: float = 0.98


def _finite(x: Tensor) -> Tensor:
    """Zero out NaN/inf so one bad pixel cannot poison a step."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def camera_loss(pose_enc_list: list[Tensor], gt_pose_enc: Tensor, valid: Tensor, w: LossWeights) -> dict[str, Tensor]:
    """pose_enc_list: K tensors [B, S, 9]; gt_pose_enc [B, S, 9]; valid [B] scenes whose reference frame has
    enough valid pixels to define the normalisation."""
    k = len(pose_enc_list)
    zero = pose_enc_list[-1].sum() * 0
    terms = {"loss_T": zero, "loss_R": zero, "loss_FL": zero}
    if valid.any():
        gt = gt_pose_enc[valid]
        for i, pred in enumerate(pose_enc_list):
            diff = _finite((pred[valid] - gt).abs())
            stage = w.camera_gamma ** (k - 1 - i) / k
            terms["loss_T"] = terms["loss_T"] + stage * diff[..., :3].clamp(max=100).mean()
            terms["loss_R"] = terms["loss_R"] + stage * diff[..., 3:7].mean()
            terms["loss_FL"] = terms["loss_FL"] + stage * diff[..., 7:].mean()
    terms["loss_camera"] = terms["loss_T"] + terms["loss_R"] + w.focal * terms["loss_FL"]
    return terms


def drop_outliers(loss: Tensor, quantile: float, min_elements: int = 1000, hard_max: float = 100.0) -> Tensor:
    """Keep per-pixel losses below the ``quantile`` (after clamping at ``hard_max``); small sets are kept whole."""
    if loss.numel() <= min_elements or quantile >= 1:
        return loss
    loss = loss.clamp(max=hard_max)
    sample = loss.detach().flatten()
    if sample.numel() > 1_000_000:
        # Beyond torch.quantile's input limit: the exact order statistic. (A random subsample drew from the global
        # generator, which a resumed run does not restore: resume would no longer be exact.)
        k = min(sample.numel(), max(1, math.ceil(quantile * sample.numel())))
        threshold = float(torch.kthvalue(sample, k).values)
    else:
        threshold = float(torch.quantile(sample, quantile))
    keep = loss < min(threshold, hard_max)
    return loss[keep] if keep.sum() > min_elements else loss


def image_gradient_loss(pred: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
    """Mean L1 difference of horizontal/vertical gradients of the error. pred/gt [N, H, W, C], mask [N, H, W]."""
    m = mask[..., None].to(pred.dtype)
    diff = (pred - gt) * m
    gx = (diff[:, :, 1:] - diff[:, :, :-1]).abs().clamp(max=100) * (m[:, :, 1:] * m[:, :, :-1])
    gy = (diff[:, 1:] - diff[:, :-1]).abs().clamp(max=100) * (m[:, 1:] * m[:, :-1])
    denom = m.expand_as(diff).sum()
    return (gx.sum() + gy.sum()) / denom if denom > 0 else pred.sum() * 0


def point_map_normals(points: Tensor, mask: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Normals from the 4 cross products of neighbour differences: ([4, N, H, W, 3] unit, [4, N, H, W] valid)."""
    pts = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    pm = F.pad(mask, (1, 1, 1, 1), value=False)
    c = pts[:, 1:-1, 1:-1]
    up, left, down, right = pts[:, :-2, 1:-1] - c, pts[:, 1:-1, :-2] - c, pts[:, 2:, 1:-1] - c, pts[:, 1:-1, 2:] - c
    normals = torch.stack(
        [
            torch.cross(up, left, dim=-1),
            torch.cross(left, down, dim=-1),
            torch.cross(down, right, dim=-1),
            torch.cross(right, up, dim=-1),
        ]
    )
    mc = pm[:, 1:-1, 1:-1]
    mu, ml, md, mr = pm[:, :-2, 1:-1], pm[:, 1:-1, :-2], pm[:, 2:, 1:-1], pm[:, 1:-1, 2:]
    valid = torch.stack([mu & mc & ml, ml & mc & md, md & mc & mr, mr & mc & mu])
    return F.normalize(normals, dim=-1, eps=eps), valid


def normal_loss(pred: Tensor, gt: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean (1 - cos) between predicted and ground-truth surface normals. pred/gt [N, H, W, 3]."""
    pn, pv = point_map_normals(pred, mask, eps)
    gn, gv = point_map_normals(gt, mask, eps)
    valid = pv & gv
    if valid.sum() < 10:
        return pred.sum() * 0
    cos = (pn[valid] * gn[valid]).sum(-1).clamp(-1 + eps, 1 - eps)
    return _finite(1 - cos).mean()


def multiscale(fn, pred: Tensor, gt: Tensor, mask: Tensor, scales: int) -> Tensor:
    """Average ``fn`` over ``scales`` strided subsamplings (step 1, 2, 4, ...)."""
    total = pred.sum() * 0
    for s in range(scales):
        step = 2**s
        total = total + fn(pred[:, ::step, ::step], gt[:, ::step, ::step], mask[:, ::step, ::step])
    return total / scales


def dense_loss(pred: Tensor, conf: Tensor, gt: Tensor, mask: Tensor, kind: str, w: LossWeights) -> dict[str, Tensor]:
    """pred [B, S, H, W, C], conf [B, S, H, W], gt [B, S, H, W, C], mask [B, S, H, W]; kind "depth" or "point"."""
    zero = pred.sum() * 0
    if mask.sum() < MIN_VALID_PIXELS:
        return {f"loss_conf_{kind}": zero, f"loss_reg_{kind}": zero, f"loss_grad_{kind}": zero}
    err = _finite(torch.linalg.vector_norm(gt[mask] - pred[mask], dim=-1))
    c = conf[mask]
    conf_term = _finite(err * c - w.conf_alpha * torch.log(c))
    b, s, h, wd, ch = pred.shape
    flat = (pred.reshape(b * s, h, wd, ch), gt.reshape(b * s, h, wd, ch), mask.reshape(b * s, h, wd))
    grad = multiscale(image_gradient_loss, *flat, scales=4) if kind == "depth" else multiscale(normal_loss, *flat, 3)
    return {
        f"loss_conf_{kind}": drop_outliers(conf_term, w.valid_range).mean(),
        f"loss_reg_{kind}": drop_outliers(err, w.valid_range).mean(),
        f"loss_grad_{kind}": grad,
    }


def vggt_loss(preds: dict, batch: dict, w: LossWeights = LossWeights()) -> dict[str, Tensor]:
    """Total VGGT objective and its parts.

    batch: ``images`` [B, S, 3, H, W], ``depth`` [B, S, H, W], ``world_points`` [B, S, H, W, 3], ``valid_mask``
    [B, S, H, W] bool, ``extrinsics`` [B, S, 3, 4], ``intrinsics`` [B, S, 3, 3], all in normalised coordinates.
    """
    mask = batch["valid_mask"]
    out: dict[str, Tensor] = {}
    total = 0
    if "pose_enc_list" in preds:
        gt_enc = extri_intri_to_pose_encoding(batch["extrinsics"], batch["intrinsics"], batch["images"].shape[-2:])
        valid = mask[:, 0].flatten(1).sum(-1) > MIN_VALID_PIXELS
        out.update(camera_loss(preds["pose_enc_list"], gt_enc, valid, w))
        total = total + w.camera * out["loss_camera"]
    for kind, key, gt_key in (("depth", "depth", "depth"), ("point", "world_points", "world_points")):
        if key in preds:
            gt = batch[gt_key][..., None] if kind == "depth" else batch[gt_key]
            parts = dense_loss(preds[key], preds[f"{key}_conf"], gt, mask, kind, w)
            out.update(parts)
            total = total + getattr(w, kind) * sum(parts.values())
    out["objective"] = total
    return out
