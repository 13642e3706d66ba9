"""Camera head: iterative refinement of a 9-d pose encoding from each frame's camera token.

Shape legend: B batch, S frames, C = 2 * embed_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qvggt.model.heads.activations import activate_pose
from qvggt.model.layers import Block, Mlp

POSE_DIM = 9  # T(3), quaternion XYZW(4), fov_h, fov_w


class CameraHead(nn.Module):
    """A trunk of transformer blocks over the S camera tokens, run ``iterations`` times with adaLN
    conditioning on the previous (detached) pose estimate; each pass adds a delta to the encoding."""

    def __init__(self, dim: int, trunk_depth: int = 4, num_heads: int = 16, init_values: float = 0.01) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*[Block(dim, num_heads, 4.0, init_values=init_values) for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, POSE_DIM)

    def forward(self, last_layer_tokens: Tensor, iterations: int = 4) -> list[Tensor]:
        """last_layer_tokens: [B, S, P, C] (the aggregator's last layer) -> list of ``iterations`` [B, S, 9]."""
        tokens = self.token_norm(last_layer_tokens[:, :, 0])  # camera token of each frame
        B, S, _ = tokens.shape
        raw: Tensor | None = None
        encodings: list[Tensor] = []
        for _ in range(iterations):
            prev = self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(prev)).chunk(3, dim=-1)
            x = tokens + gate * (self.adaln_norm(tokens) * (1 + scale) + shift)
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            encodings.append(activate_pose(raw))
        return encodings
