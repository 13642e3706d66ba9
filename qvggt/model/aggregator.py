"""The VGGT aggregator: patch embedding, special tokens, alternating frame / global attention.

Shape legend: B batch, S frames, P tokens per frame (special + patches), C = embed_dim, H/W image size.
Frame blocks see ``[B*S, P, C]`` (attention within a frame); global blocks see ``[B, S*P, C]`` (across all
frames, no mask). Each frame's sequence is ``[camera, registers..., patches...]``; patches start at
``patch_start_idx``. Frame 0 takes the first slot of each special token, every other frame the second.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from qvggt.model.config import VGGTConfig
from qvggt.model.encoder import DinoV2Encoder, PatchConv
from qvggt.model.layers import Block
from qvggt.model.rope import RotaryEmbedding2D, TokenPositions, grid_positions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=16)
def _normalization(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std [1, 1, 3, 1, 1] on ``device``, made once: a host-to-device copy on every forward would
    synchronise the stream, which CUDA-graph capture forbids. Constants, not buffers: a model built on meta and
    loaded with assign=True has nothing left to fill. Plain tensors even when first made under inference_mode."""
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(1, 1, 3, 1, 1)
    return mean, std


def expand_special_tokens(token: Tensor, B: int, S: int) -> Tensor:
    """[1, 2, X, C] learned slots -> [B*S, X, C]: slot 0 for frame 0, slot 1 for frames 1..S-1."""
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    others = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, others], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Turns images [B, S, 3, H, W] in [0, 1] into per-layer tokens [B, S, P, 2C].

    ``forward`` returns a list of length ``depth``; entry i is the concatenation of frame block i's and global
    block i's outputs. Only layers in ``keep_layers`` are filled (the rest are None), so inference keeps the
    4 layers the heads read instead of all 24.
    """

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        if cfg.patch_embed == "dinov2":
            self.patch_embed: nn.Module = DinoV2Encoder(
                cfg.img_size,
                cfg.patch_size,
                dim,
                cfg.encoder_depth,
                cfg.encoder_num_heads,
                cfg.encoder_mlp_ratio,
                cfg.num_register_tokens,
            )
        else:
            self.patch_embed = PatchConv(cfg.patch_size, dim)
        self.rope = RotaryEmbedding2D(cfg.rope_freq) if cfg.rope_freq > 0 else None

        def make_block() -> Block:
            return Block(
                dim, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values, qk_norm=cfg.qk_norm, rope=self.rope
            )

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, dim) * 1e-6)
        self.patch_start_idx = cfg.patch_start_idx
        # Gradient checkpointing per block while training (memory), as published.
        self.gradient_checkpointing = True

    def _run(self, block: nn.Module, x: Tensor, pos: TokenPositions | None) -> Tensor:
        if self.training and self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, pos, use_reentrant=False)
        return block(x, pos=pos)

    def forward(
        self, images: Tensor, keep_layers: tuple[int, ...] | None = None, patch_offsets: Tensor | None = None
    ) -> list[Tensor | None]:
        """images [B, S, 3, H, W] in [0, 1] -> list over layers of [B, S, P, 2C] (None where not kept).

        keep_layers: layer indices to return; None keeps all of them (the published behaviour).
        patch_offsets: [B*S, P_patch, C] added to the patch embeddings before the first block (the correspondence
        tokens of :mod:`qvggt.model.correspondence`); None for the published model.
        """
        B, S, c_in, H, W = images.shape
        if c_in != 3:
            raise ValueError(f"expected 3 input channels, got {c_in} (images must be [B, S, 3, H, W])")
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        keep = set(range(self.cfg.depth)) if keep_layers is None else set(keep_layers)

        mean, std = _normalization(images.dtype, images.device)
        x = ((images - mean) / std).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # [B*S, P_patch, C]
        if patch_offsets is not None:
            if patch_offsets.shape != patches.shape:
                raise ValueError(
                    f"patch_offsets must match the patch embeddings {tuple(patches.shape)}, got {tuple(patch_offsets.shape)}"
                )
            patches = patches + patch_offsets.to(patches.dtype)
        C = patches.shape[-1]
        special = [expand_special_tokens(self.camera_token, B, S), expand_special_tokens(self.register_token, B, S)]
        tokens = torch.cat([*special, patches.to(special[0].dtype)], dim=1)
        P = tokens.shape[1]
        pos = None
        if self.rope is not None:
            pos = grid_positions(B * S, H // p, W // p, self.patch_start_idx, images.device)

        outputs: list[Tensor | None] = []
        for i in range(self.cfg.depth):
            tokens = self._run(self.frame_blocks[i], tokens.reshape(B * S, P, C), pos)
            frame_out = tokens.reshape(B, S, P, C)
            global_pos = None if pos is None else pos.reshape(B, S * P)
            tokens = self._run(self.global_blocks[i], tokens.reshape(B, S * P, C), global_pos)
            if i in keep:
                outputs.append(torch.cat([frame_out, tokens.reshape(B, S, P, C)], dim=-1))
            else:
                outputs.append(None)
        return outputs
