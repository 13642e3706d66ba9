"""2D rotary position embedding as VGGT uses it.

The head dim is split in two halves: the first is rotated by the token's row (y), the second by its column (x).
Each half uses rotate-half pairing (``cat(-x2, x1)``), not interleaved pairs, with inverse frequencies
``base^(-k/(d/2))`` for k = 0, 2, ..., d/2 - 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TokenPositions:
    """Integer (y, x) positions ``yx`` [B, N, 2] of tokens and ``size``, an exclusive bound on their values.

    Carrying the bound avoids reading ``yx.max()`` back from the device in every attention layer.
    """

    yx: Tensor
    size: int

    def reshape(self, batch: int, tokens: int) -> TokenPositions:
        return TokenPositions(self.yx.reshape(batch, tokens, 2), self.size)


def grid_positions(batch: int, grid_h: int, grid_w: int, num_special: int, device: torch.device) -> TokenPositions:
    """Integer (y, x) positions of one frame's tokens, special tokens first.

    Patch (r, c) sits at (r + 1, c + 1); the ``num_special`` camera/register tokens sit at (0, 0), so they get
    no rotation. Positions are [batch, num_special + grid_h * grid_w, 2] int64.
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    patch = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1) + 1
    special = torch.zeros(num_special, 2, dtype=patch.dtype, device=device)
    yx = torch.cat([special, patch], dim=0).unsqueeze(0).expand(batch, -1, -1)
    return TokenPositions(yx, max(grid_h, grid_w) + 1)


class RotaryEmbedding2D(nn.Module):
    """Applies 2D RoPE to queries or keys [B, h, N, d] given their token positions."""

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _tables(self, half_dim: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (half_dim, length, device, dtype)
        if key not in self._cache:
            inv_freq = 1.0 / self.base ** (torch.arange(0, half_dim, 2, device=device).float() / half_dim)
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            # Cast angles before cos/sin, as published: bf16 runs see the same rounding.
            angles = torch.cat([angles, angles], dim=-1).to(dtype)
            self._cache[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._cache[key]

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def _rotate(self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        c = cos[pos][:, None]  # [B, 1, N, d/2]
        s = sin[pos][:, None]
        return x * c + self._rotate_half(x) * s

    def forward(self, x: Tensor, pos: TokenPositions) -> Tensor:
        if x.shape[-1] % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {x.shape[-1]}")
        half = x.shape[-1] // 2
        cos, sin = self._tables(half, pos.size, x.device, x.dtype)
        y_part, x_part = x.chunk(2, dim=-1)
        return torch.cat(
            [self._rotate(y_part, pos.yx[..., 0], cos, sin), self._rotate(x_part, pos.yx[..., 1], cos, sin)], dim=-1
        )
