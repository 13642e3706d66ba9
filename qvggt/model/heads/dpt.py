"""DPT head: dense prediction from four aggregator layers by multi-scale fusion (Ranftl et al., 2021).

Shape legend: B batch, S frames, N = B*s frames of a chunk, P tokens per frame, C = 2 * embed_dim,
h/w patch grid, H/W image size, F fusion features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvggt.model.heads.activations import activate_dense

# F.interpolate indexes with int32 on some backends; split larger outputs along the batch.
_INTERP_MAX_ELEMENTS = 1_610_612_736


def interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True resize of [N, C, h, w] to ``size``, chunked to stay under int32 limits."""
    n_out = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n_out <= _INTERP_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = x.chunk(n_out // _INTERP_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])


def uv_position_embedding(h: int, w: int, channels: int, aspect: float, device: torch.device) -> Tensor:
    """Sin/cos embedding [channels, h, w] of a centred UV grid spanning the image diagonal.

    u spans +-aspect/diag and v +-1/diag (pixel centres); half the channels encode u, half v, each as
    [sin(pos * omega), cos(pos * omega)] with omega = 100^(-k/(channels/4)). Computed in float64, as published.
    """
    diag = (aspect**2 + 1.0) ** 0.5
    span_x, span_y = aspect / diag, 1.0 / diag
    u = torch.linspace(-span_x * (w - 1) / w, span_x * (w - 1) / w, w, dtype=torch.float32, device=device)
    v = torch.linspace(-span_y * (h - 1) / h, span_y * (h - 1) / h, h, dtype=torch.float32, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # [h, w] each
    quarter = channels // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=device) / (channels / 4.0)
    omega = 1.0 / 100.0**omega

    def embed(p: Tensor) -> Tensor:
        ang = p.reshape(-1, 1).double() * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    emb = torch.cat([embed(uu), embed(vv)], dim=1).float()  # [h*w, channels]
    return emb.reshape(h, w, channels).permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv2(relu(conv1(relu(x))))``.

    The published unit applies an in-place ReLU to its input before the skip connection, so the skip carries
    relu(x), not x; we compute that explicitly without mutating the caller's tensor.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    """RefineNet-style fusion: add the (refined) skip feature, refine, upsample, 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block needs a skip feature")
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        out_size = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(interpolate(x, out_size))


class DPTHead(nn.Module):
    """Dense head over layers ``layer_idx`` of the aggregator output.

    With ``feature_only`` it returns features [B, S, F, H/down, W/down] (the track head's extractor);
    otherwise ``(values [B, S, H, W, D], conf [B, S, H, W])`` after ``activation``.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.layer_idx = tuple(layer_idx)
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        c1, c2, _c3, c4 = out_channels
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, 1) for c in out_channels])
        # Bring the four layers to 4x, 2x, 1x and 1/2x of the patch grid.
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FusionBlock(features)
        self.scratch.refinenet2 = FusionBlock(features)
        self.scratch.refinenet3 = FusionBlock(features)
        self.scratch.refinenet4 = FusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
            )

    def forward(
        self, layers: Sequence[Tensor | None], images: Tensor, patch_start_idx: int, frames_chunk_size: int | None = 8
    ) -> Tensor | tuple[Tensor, Tensor]:
        """layers: aggregator output list (entries [B, S, P, C]); images: [B, S, 3, H, W].

        Frames are processed ``frames_chunk_size`` at a time to bound the memory of the upsampled features.
        """
        S, _, H, W = images.shape[1:]
        missing = [i for i in self.layer_idx if i >= len(layers) or layers[i] is None]
        if missing:
            raise ValueError(f"DPT head reads aggregator layers {self.layer_idx}; layers {missing} were not kept")
        step = S if not frames_chunk_size or frames_chunk_size >= S else frames_chunk_size
        chunks = [self._forward_frames(layers, H, W, patch_start_idx, s, min(s + step, S)) for s in range(0, S, step)]
        if self.feature_only:
            return torch.cat(chunks, dim=1)
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    def _add_pos(self, x: Tensor, H: int, W: int) -> Tensor:
        pe = uv_position_embedding(x.shape[-2], x.shape[-1], x.shape[1], W / H, x.device)
        return x + 0.1 * pe.to(x.dtype)

    def _forward_frames(
        self, layers: Sequence[Tensor | None], H: int, W: int, start: int, s0: int, s1: int
    ) -> Tensor | tuple[Tensor, Tensor]:
        h, w = H // self.patch_size, W // self.patch_size
        feats = []
        for k, li in enumerate(self.layer_idx):
            x = layers[li][:, s0:s1, start:]  # type: ignore[index]
            B, s = x.shape[:2]
            x = self.norm(x.reshape(B * s, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(B * s, -1, h, w)
            x = self.projects[k](x)
            if self.pos_embed:
                x = self._add_pos(x, H, W)
            feats.append(self.resize_layers[k](x))
        out = self._fuse(feats)
        out = interpolate(out, (int(h * self.patch_size / self.down_ratio), int(w * self.patch_size / self.down_ratio)))
        if self.pos_embed:
            out = self._add_pos(out, H, W)
        if self.feature_only:
            return out.reshape(B, s, *out.shape[1:])
        values, conf = activate_dense(self.scratch.output_conv2(out), self.activation, self.conf_activation)
        return values.reshape(B, s, *values.shape[1:]), conf.reshape(B, s, *conf.shape[1:])

    def _fuse(self, feats: list[Tensor]) -> Tensor:
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
