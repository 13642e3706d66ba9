"""Training the correspondence matcher (:mod:`qvggt.model.correspondence`) on ground-truth patch matches.

The targets come from the rendered geometry of a normalised batch (frame 0's camera is ``[I | 0]``, so world
points are in its camera coordinates): the surface point at each patch centre of frame k is projected into frame
0, and its match is the frame-0 patch it lands in, kept only where frame 0 sees that same point (inside the image,
on a valid pixel, depth agreeing within ``depth_tol``: not occluded). The loss is InfoNCE of each such patch's
descriptor against all of frame 0's, as in the experiments of docs/TRAINING_NOTES.md section 7.

Shape legend: B batch, S frames, N patches per frame, D descriptor width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qvggt.model.correspondence import frame_zero_similarity


def match_targets(batch: dict[str, Tensor], patch_size: int, depth_tol: float = 0.03) -> tuple[Tensor, Tensor]:
    """(index [B, S-1, N] of the frame-0 patch seeing each patch centre of frames 1..S-1, visible [B, S-1, N]).

    ``batch`` holds ``world_points`` [B, S, H, W, 3] in frame 0's camera coordinates, ``valid_mask``, ``depth``
    [B, S, H, W] and ``intrinsics`` [B, S, 3, 3] (pixels), as :func:`qvggt.train.data.select_frames` gives them.
    """
    pts_all, valid, depth, K = batch["world_points"], batch["valid_mask"], batch["depth"], batch["intrinsics"][:, 0]
    B, S, H, W, _ = pts_all.shape
    if S < 2:
        raise ValueError("correspondence targets need at least 2 frames per scene")
    gh, gw = H // patch_size, W // patch_size
    cy = torch.arange(gh, device=pts_all.device) * patch_size + patch_size // 2
    cx = torch.arange(gw, device=pts_all.device) * patch_size + patch_size // 2
    pts = pts_all[:, 1:][:, :, cy][:, :, :, cx].reshape(B, S - 1, -1, 3).double()  # [B, S-1, N, 3]
    ok = valid[:, 1:][:, :, cy][:, :, :, cx].reshape(B, S - 1, -1)
    z = pts[..., 2]
    zs = z.clamp(min=1e-6)
    u = K[:, None, None, 0, 0].double() * pts[..., 0] / zs + K[:, None, None, 0, 2].double()
    v = K[:, None, None, 1, 1].double() * pts[..., 1] / zs + K[:, None, None, 1, 2].double()
    # Pixel (i, j) is the ray through image point (i, j) (qvggt.data.synthetic: pixel centres on integers), so a
    # projection lands in the pixel it rounds to, and the image spans [-0.5, W - 0.5).
    inside = (z > 1e-4) & (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    ui = (u + 0.5).floor().clamp(0, W - 1).long()
    vi = (v + 0.5).floor().clamp(0, H - 1).long()
    rows = torch.arange(B, device=pts.device)[:, None, None]
    seen = valid[:, 0][rows, vi, ui] & ((depth[:, 0][rows, vi, ui].double() - z).abs() <= depth_tol * z)
    index = (vi // patch_size).clamp(max=gh - 1) * gw + (ui // patch_size).clamp(max=gw - 1)
    return index, ok & inside & seen


def matching_loss(
    descriptors: Tensor, batch: dict[str, Tensor], patch_size: int, temperature: float
) -> tuple[Tensor, float]:
    """InfoNCE of frames 1..S-1's patch descriptors [B, S, N, D] against frame 0's, on visible ground-truth
    matches: (loss, top-1 accuracy of the argmax match). A batch with no visible match gives a zero loss that
    still depends on the descriptors (so backward works) and accuracy NaN."""
    index, visible = match_targets(batch, patch_size)
    logits = frame_zero_similarity(descriptors) / temperature
    if not bool(visible.any()):
        return logits.sum() * 0.0, float("nan")
    picked, target = logits[visible], index[visible]
    loss = F.cross_entropy(picked, target)
    top1 = float((picked.argmax(-1) == target).float().mean())
    return loss, top1
