"""VGGT: images of a scene -> cameras, depth maps, point maps and tracks in one forward pass.

Shape legend: B batch, S frames, H/W image size (multiples of the patch size), N query points.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from qvggt.model.aggregator import Aggregator
from qvggt.model.config import VGGTConfig
from qvggt.model.correspondence import CorrespondenceTokens
from qvggt.model.heads.camera import CameraHead
from qvggt.model.heads.dpt import DPTHead
from qvggt.model.heads.track import TrackHead


def _autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``, or autocast disabled for float32; a no-op where autocast does not exist (meta)."""
    if device_type not in ("cpu", "cuda", "xpu", "mps"):
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


class VGGT(nn.Module):
    """The VGGT model; submodule and parameter names match the released checkpoint.

    Inference options (``forward`` keywords):
      - ``dtype=torch.bfloat16`` runs the aggregator under bf16 autocast and the heads in fp32, as the
        published model is run (its residual stream stays fp32).
      - ``keep_all_layers=False`` (default) keeps only the aggregator layers the heads read (4, 11, 17, 23
        for vggt-1b) instead of all 24; outputs are identical.
      - ``frames_chunk_size`` bounds the dense heads' memory by processing that many frames at a time.
    """

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.aggregator = Aggregator(cfg)
        # Small models only (VGGTConfig.correspondence_tokens): a matcher whose matches enter the patch tokens.
        self.correspondence = CorrespondenceTokens(cfg) if cfg.correspondence_tokens else None
        d = cfg.head_dim_in
        self.camera_head = (
            CameraHead(d, cfg.camera_trunk_depth, cfg.camera_num_heads, cfg.init_values) if cfg.enable_camera else None
        )
        dense = {
            "patch_size": cfg.patch_size,
            "features": cfg.dpt_features,
            "out_channels": cfg.dpt_out_channels,
            "layer_idx": cfg.intermediate_layer_idx,
        }
        self.point_head = DPTHead(d, output_dim=4, activation="inv_log", **dense) if cfg.enable_point else None
        self.depth_head = DPTHead(d, output_dim=2, activation="exp", **dense) if cfg.enable_depth else None
        self.track_head = TrackHead(cfg) if cfg.enable_track else None

    def _head_dtype(self) -> torch.dtype:
        for head in (self.camera_head, self.depth_head, self.point_head, self.track_head):
            if head is not None:
                return next(head.parameters()).dtype
        return torch.float32

    def check_images(self, images: Tensor) -> Tensor:
        """Validate and return images as [B, S, 3, H, W]; raises ValueError naming the problem."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [S, 3, H, W] or [B, S, 3, H, W], got {tuple(images.shape)}")
        p = self.cfg.patch_size
        H, W = images.shape[-2:]
        if H % p or W % p:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {p}; "
                f"resize to e.g. {max(p, H // p * p)}x{max(p, W // p * p)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        return images

    def aggregate(
        self, images: Tensor, keep_layers: tuple[int, ...] | None, preds: dict[str, Tensor | list[Tensor]]
    ) -> list[Tensor | None]:
        """The aggregator's layers for ``images`` [B, S, 3, H, W]; with correspondence tokens, their offsets enter
        the patch tokens and the matcher's descriptors go into ``preds["match_descriptors"]``."""
        offsets = None
        if self.correspondence is not None:
            offsets, preds["match_descriptors"] = self.correspondence(images)
        return self.aggregator(images, keep_layers=keep_layers, patch_offsets=offsets)

    def forward(
        self,
        images: Tensor,
        query_points: Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        keep_all_layers: bool = False,
        frames_chunk_size: int | None = None,
    ) -> dict[str, Tensor | list[Tensor]]:
        """images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1]; query_points [N, 2] or [B, N, 2] in pixels.

        Returns a dict with ``pose_enc`` [B, S, 9] (last refinement pass; ``pose_enc_list`` holds all),
        ``depth`` [B, S, H, W, 1], ``depth_conf`` [B, S, H, W], ``world_points`` [B, S, H, W, 3],
        ``world_points_conf`` [B, S, H, W]; with query points also ``track`` [B, S, N, 2], ``vis`` and ``conf``
        [B, S, N]. A model with correspondence tokens also returns ``match_descriptors`` [B, S, N_patch, D].
        """
        images = self.check_images(images)
        if query_points is not None:
            if query_points.dim() == 2:
                query_points = query_points.unsqueeze(0)
            if query_points.dim() != 3 or query_points.shape[-1] != 2 or query_points.shape[0] != images.shape[0]:
                raise ValueError(f"query_points must be [N, 2] or [B, N, 2] pixels, got {tuple(query_points.shape)}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        chunk = frames_chunk_size or self.cfg.frames_chunk_size
        keep = None if keep_all_layers else self.cfg.layers_read_by_heads()

        device_type = images.device.type
        preds: dict[str, Tensor | list[Tensor]] = {}
        with _autocast(device_type, dtype):
            layers = self.aggregate(images, keep, preds)
        patch_start = self.aggregator.patch_start_idx
        # Heads run with autocast off in their own weights' dtype: fp32 as published (a bf16-cast model: bf16).
        head_dtype = self._head_dtype()
        layers = [None if t is None else t.to(head_dtype) for t in layers]
        with _autocast(device_type, torch.float32):
            if self.camera_head is not None:
                pose_list = self.camera_head(layers[-1], self.cfg.camera_iterations)
                preds["pose_enc"] = pose_list[-1]
                preds["pose_enc_list"] = pose_list
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(layers, images, patch_start, chunk)
                preds["depth"], preds["depth_conf"] = depth, depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(layers, images, patch_start, chunk)
                preds["world_points"], preds["world_points_conf"] = points, points_conf
            if self.track_head is not None and query_points is not None:
                tracks, vis, conf = self.track_head(
                    layers, images, patch_start, query_points.to(head_dtype), frames_chunk_size=chunk
                )
                preds["track"], preds["vis"], preds["conf"] = tracks[-1], vis, conf
        return preds
