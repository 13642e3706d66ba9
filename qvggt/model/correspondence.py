"""Correspondence tokens: a patch matcher whose matches into frame 0 are embedded into the aggregator's patch tokens.

VGGT-1B finds cross-view correspondences inside its aggregator, starting from DINOv2 features that already match
across views. A small model trained from scratch for an hour on a CPU does not: it learns depth and the monocular
part of the pose, but not the yaw between views (docs/TRAINING_NOTES.md sections 5-7). Given the ground-truth
patch flow in its patch tokens, the same small model learns relative pose in ~1,000 steps; given the argmax of a
learned matcher, it gets half of the identity baseline's error. This module is that construction:

1. ``PatchMatcher``: a shallow aggregator (same blocks, ``matcher_depth`` layers) and a linear projection to
   ``matcher_dim`` unit-norm descriptors per patch, trained with InfoNCE on ground-truth correspondences
   (:mod:`qvggt.train.correspondence`).
2. ``match_to_first_frame``: for each patch of frames 1..S-1, its most similar frame-0 patch and the softmax
   probability of that match (a confidence); no gradient flows through either.
3. ``CorrespondenceTokens``: the match's offset (du, dv in image widths / heights) and confidence, embedded by one
   linear layer and added to the aggregator's patch tokens before its first block. Frame 0 gets the embedding of
   zeros (it is the reference).

The option is off in every preset that mirrors a released checkpoint, and ``load_vggt`` refuses it for
``vggt-1b``: the released weights have no such module.

Shape legend: B batch, S frames, N patches per frame (gh * gw), D descriptor width, C embed_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvggt.model.aggregator import Aggregator
from qvggt.model.config import VGGTConfig


class PatchMatcher(nn.Module):
    """Images [B, S, 3, H, W] -> unit-norm patch descriptors [B, S, N, D] for cross-view matching."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        depth = cfg.matcher_depth
        sub = cfg.replace(
            depth=depth,
            intermediate_layer_idx=tuple(min(i, depth - 1) for i in cfg.intermediate_layer_idx),
            correspondence_tokens=False,
        )
        self.backbone = Aggregator(sub)
        self.proj = nn.Linear(sub.head_dim_in, cfg.matcher_dim)
        self.patch_start_idx = sub.patch_start_idx

    def forward(self, images: Tensor) -> Tensor:
        layers = self.backbone(images, keep_layers=(self.backbone.cfg.depth - 1,))
        tokens = layers[-1][:, :, self.patch_start_idx :]  # [B, S, N, 2C]
        return F.normalize(self.proj(tokens), dim=-1)


def frame_zero_similarity(descriptors: Tensor) -> Tensor:
    """descriptors [B, S, N, D] -> cosine similarities [B, S-1, N, N] of frames 1..S-1's patches (rows) to frame
    0's (columns), in float32."""
    d = descriptors.float()
    return torch.einsum("bsnd,bmd->bsnm", d[:, 1:], d[:, 0])


@torch.no_grad()
def match_to_first_frame(descriptors: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """descriptors [B, S, N, D] -> (index [B, S, N] of each patch's best frame-0 patch, its softmax probability).

    Frame 0's own entries are the identity match with confidence 0 (it is the reference, not a match).
    """
    B, _, N, _ = descriptors.shape
    conf, index = (frame_zero_similarity(descriptors) / temperature).softmax(-1).max(-1)
    own = torch.arange(N, device=descriptors.device).expand(B, 1, N)
    return torch.cat([own, index], 1), torch.cat([torch.zeros_like(conf[:, :1]), conf], 1)


def match_offsets(index: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Patch indices [...] of matches on a (gh, gw) patch grid -> offsets (du, dv) [...] from each patch's own
    centre (its position in the last dimension) to its match's, in image widths and heights."""
    gh, gw = grid_hw
    own = torch.arange(index.shape[-1], device=index.device)
    du = ((index % gw) - (own % gw)).to(torch.float32) / gw
    dv = ((index // gw) - (own // gw)).to(torch.float32) / gh
    return du, dv


class CorrespondenceTokens(nn.Module):
    """The matcher and the embedding of its matches: images -> (patch-token offsets [B*S, N, C], descriptors)."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = PatchMatcher(cfg)
        self.embed = nn.Linear(3, cfg.embed_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _, H, W = images.shape
        p = self.cfg.patch_size
        descriptors = self.matcher(images)
        index, conf = match_to_first_frame(descriptors, self.cfg.matcher_temperature)
        du, dv = match_offsets(index, (H // p, W // p))
        flow = torch.stack([du, dv, conf], -1)  # [B, S, N, 3]
        flow[:, 0] = 0.0  # the reference frame: no match, no offset
        return self.embed(flow.to(self.embed.weight.dtype)).reshape(B * S, -1, self.cfg.embed_dim), descriptors
