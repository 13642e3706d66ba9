"""Track head: a feature-only DPT at half resolution feeding an iterative point tracker.

Shape legend: B batch, S frames, N query points, H/W image size, F track features.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from qvggt.model.config import VGGTConfig
from qvggt.model.heads.dpt import DPTHead
from qvggt.model.heads.tracker import Tracker


class TrackHead(nn.Module):
    """Tracks query points given in frame 0 through all S frames."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.feature_extractor = DPTHead(
            cfg.head_dim_in,
            patch_size=cfg.patch_size,
            features=cfg.track_features,
            out_channels=cfg.dpt_out_channels,
            layer_idx=cfg.intermediate_layer_idx,
            feature_only=True,
            down_ratio=2,
            pos_embed=cfg.track_feature_pos_embed,
        )
        self.tracker = Tracker(
            latent_dim=cfg.track_features,
            predict_conf=True,
            stride=2,
            corr_levels=cfg.track_corr_levels,
            corr_radius=cfg.track_corr_radius,
            hidden_size=cfg.track_hidden_size,
            depth=cfg.track_depth,
            num_virtual_tracks=cfg.track_num_virtual_tracks,
            num_heads=cfg.track_num_heads,
        )
        self.iters = cfg.track_iters

    def forward(
        self,
        layers: Sequence[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor,
        iters: int | None = None,
        frames_chunk_size: int | None = 8,
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """query_points [B, N, 2] in pixels of frame 0 -> (tracks per iteration [B, S, N, 2], vis [B, S, N],
        conf [B, S, N])."""
        fmaps = self.feature_extractor(layers, images, patch_start_idx, frames_chunk_size)
        return self.tracker(query_points, fmaps, iters=iters or self.iters)
