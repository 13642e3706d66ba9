"""Patch embedders: the DINOv2 ViT with registers that VGGT uses, or a single patchify conv.

Shape legend: F frames (batch x views flattened), H/W image height/width, P patches per frame, C channels.
Only the final-normed patch tokens leave the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvggt.model.layers import Block


class PatchConv(nn.Module):
    """Non-overlapping patchify conv: [F, 3, H, W] -> [F, P, C]."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2Encoder(nn.Module):
    """DINOv2 ViT with a cls token, register tokens and a learned position embedding.

    The stored position embedding covers a square ``grid x grid`` patch layout (37x37 for the released
    518-pixel model); other layouts are resized bicubically with antialiasing, as published.
    """

    def __init__(
        self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, num_registers: int
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_registers = num_registers
        self.patch_embed = PatchConv(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        # Unused at inference (masked-image pretraining), kept so the released checkpoint loads strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, init_values=1.0, norm_eps=1e-6) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """[1, 1 + grid_h*grid_w, C]: cls slot, then the patch grid resized to (grid_h, grid_w)."""
        if grid_h == grid_w == self.grid:
            return self.pos_embed
        pe = self.pos_embed.float()
        cls_pe, patch_pe = pe[:, :1], pe[:, 1:]
        dim = pe.shape[-1]
        m = math.isqrt(patch_pe.shape[1])
        patch_pe = patch_pe.reshape(1, m, m, dim).permute(0, 3, 1, 2)
        patch_pe = F.interpolate(patch_pe, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch_pe = patch_pe.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pe, patch_pe], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        """images: [F, 3, H, W] normalised -> patch tokens [F, P, C]."""
        n, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_embedding(h // self.patch_size, w // self.patch_size, x.dtype)
        # Registers go between cls and patches, after the position embedding (they have none).
        x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1 + self.num_registers :]
