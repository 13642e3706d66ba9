"""Track-head tracker: iterative refinement of 2D point tracks over a correlation pyramid.

Computes the same function as VGGT's published ``BaseTrackerPredictor`` (itself derived from CoTracker and
VGGSfM), with the same parameter names, so ``track_head.tracker.*`` checkpoint tensors load unchanged
(including the published misspelling ``updateformer.virual_tracks``).

Per refinement iteration, each track (a query point of frame 0 followed through all S frames) is turned into
one token per frame: [flow embedding | correlation features | track feature] + query position embedding +
a frame-0/other-frame token. A transformer alternating attention over time (per track) and over space
(tracks <-> a few learned virtual tracks, per frame) predicts a coordinate delta and a feature delta.

Shape legend:
    B  batch                      S  frames (frame 0 holds the queries)
    N  query points (tracks)      C  feature channels (latent_dim)
    HH, WW  feature-map height/width (image size / stride)
    L  pyramid levels             R  correlation window side, 2 * radius + 1
    D  transformer input width, 3 * C + 4      E  transformer hidden width (hidden_size)
    K  virtual tracks             M  a flattened leading dimension (stated where used)
Coordinates are (x, y) pixels with the align-corners convention: x = 0 is the centre of the first column.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CorrelationPyramid",
    "CrossAttentionBlock",
    "EfficientUpdateFormer",
    "Mlp",
    "PackedMultiheadAttention",
    "SelfAttentionBlock",
    "Tracker",
    "bilinear_sample",
    "frequency_embedding_2d",
    "sample_at_points",
    "sincos_grid_embedding",
]


# ----------------------------------------------------------------------------------------------------------------
# Sampling and embedding helpers
# ----------------------------------------------------------------------------------------------------------------


def bilinear_sample(field: Tensor, coords: Tensor, padding_mode: str = "border") -> Tensor:
    """Bilinearly sample ``field`` at pixel coordinates (``grid_sample`` with align_corners=True).

    field: [M, Cf, H, W]; coords: [M, Ho, Wo, 2] as (x, y) pixels -> [M, Cf, Ho, Wo].
    Coordinates are detached: as published, no gradient flows into the sampling locations.
    """
    coords = coords.detach().to(device=field.device, dtype=field.dtype)
    height, width = field.shape[-2:]
    # Pixel -> [-1, 1]; a size-1 axis maps pixel 0 to -1 instead of dividing by zero. Python scalars, not a tensor
    # built from a list: that would be a host-to-device copy per call, which CUDA-graph capture forbids.
    sx, sy = 2 / max(width - 1, 1), 2 / max(height - 1, 1)
    grid = torch.stack((coords[..., 0] * sx, coords[..., 1] * sy), dim=-1) - 1
    return F.grid_sample(field, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def sample_at_points(field: Tensor, points: Tensor) -> Tensor:
    """Features of ``field`` at ``points`` with border padding.

    field: [B, Cf, H, W]; points: [B, N, 2] (x, y) pixels -> [B, N, Cf].
    """
    sampled = bilinear_sample(field, points.unsqueeze(2))  # [B, Cf, N, 1]
    return sampled.squeeze(3).transpose(1, 2)


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """[M] float64 positions -> [M, dim] float64: [sin(p * w_k) for k, cos(p * w_k) for k], w_k = 1e4^(-2k/dim)."""
    exponents = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    freqs = 1.0 / 10000**exponents
    angles = positions[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_grid_embedding(dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2D sin/cos position embedding of every pixel of a height x width grid -> [1, dim, height, width].

    The first dim/2 channels encode the column (x), the last dim/2 the row (y); each half is
    [sin | cos] over dim/4 geometric frequencies. Computed in float64, returned in float32.
    """
    if dim % 4:
        raise ValueError(f"sin/cos grid embedding needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    emb = torch.cat([_sincos_1d(xs.reshape(-1), dim // 2), _sincos_1d(ys.reshape(-1), dim // 2)], dim=1)
    return emb.float().reshape(height, width, dim).permute(2, 0, 1).unsqueeze(0)


def frequency_embedding_2d(xy: Tensor, dim: int) -> Tensor:
    """Sin/cos embedding of 2D offsets, as the published flow embedding.

    xy: [M, S, 2] -> [M, S, 2 * dim] float32: [emb(x) | emb(y)], each dim channels with sin at even and cos at
    odd channels. The frequencies grow linearly, f_k = 2k * 1000 / dim (unlike the usual geometric ladder).
    """
    if dim % 2:
        raise ValueError(f"frequency embedding needs an even dim, got {dim}")
    freqs = torch.arange(0, dim, 2, device=xy.device, dtype=torch.float32) * (1000.0 / dim)  # [dim/2]
    angles = xy.unsqueeze(-1) * freqs  # [M, S, 2, dim/2]
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1)  # interleave sin/cos: [M, S, 2, dim/2, 2]
    return emb.reshape(*xy.shape[:-1], 2 * dim).float()


# ----------------------------------------------------------------------------------------------------------------
# Correlation pyramid
# ----------------------------------------------------------------------------------------------------------------


class CorrelationPyramid:
    """Multi-scale local correlation between track features and per-frame feature maps (CoTracker "CorrBlock").

    Level l is the feature map average-pooled 2^l times (floor sizes). Correlation volumes are computed on
    demand in ``sample`` and discarded level by level, so the full [B, S, N, H, W] volume never exists for
    all levels at once.
    """

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        """fmaps: [B, S, C, HH, WW]."""
        B, S, C, H, W = fmaps.shape
        self.radius = radius
        self.levels: list[Tensor] = [fmaps]
        for _ in range(num_levels - 1):
            pooled = F.avg_pool2d(self.levels[-1].reshape(B * S, C, H, W), kernel_size=2, stride=2)
            H, W = pooled.shape[-2:]
            self.levels.append(pooled.reshape(B, S, C, H, W))
        # Window offsets [R, R, 2]. Component 0 (added to x) varies along the window's *rows*: the published
        # (CoTracker) layout, i.e. the window is transposed relative to the image. It fixes the order of the
        # R*R correlation features that corr_mlp was trained on, so it must be kept.
        steps = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        self.offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1)

    def sample(self, track_feats: Tensor, coords: Tensor) -> Tensor:
        """track_feats: [B, S, N, C]; coords: [B, S, N, 2] level-0 pixels -> [B, S, N, L * R * R].

        Correlations are dot products scaled by 1/sqrt(C), sampled with zero padding outside the map.
        """
        B, S, N, C = track_feats.shape
        side = 2 * self.radius + 1
        offsets = self.offsets.to(device=coords.device, dtype=coords.dtype).view(1, side, side, 2)
        per_level = []
        for level, fmap in enumerate(self.levels):
            H, W = fmap.shape[-2:]
            corr = torch.matmul(track_feats, fmap.reshape(B, S, C, H * W)) / math.sqrt(C)  # [B, S, N, H*W]
            centres = coords.reshape(B * S * N, 1, 1, 2) / (2**level)
            window = bilinear_sample(corr.reshape(B * S * N, 1, H, W), centres + offsets, padding_mode="zeros")
            per_level.append(window.reshape(B, S, N, side * side))
        return torch.cat(per_level, dim=-1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Transformer parts
# ----------------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact GELU. x: [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim if out_dim is not None else in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (packed ``in_proj_weight`` [3E, E],
    ``in_proj_bias`` [3E], ``out_proj``), batch-first, no dropout, no mask.

    The projections run on token-major [n, M, E] views and the scores use ``bmm`` over [M*h, n, E/h], the
    memory layout of ``nn.MultiheadAttention``. That does not change the math, but it reproduces the published
    fp32 rounding bit for bit on CPU, which matters here: the tracker's iterative refinement amplifies tiny
    rounding differences (a fused SDPA kernel would drift by ~1e-7 per block, ~1e-3 after 4 iterations).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # Same initialisation as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        """query: [M, Nq, E]; context (keys and values): [M, Nk, E] -> [M, Nq, E]."""
        M, Nq, E = query.shape
        Nk = context.shape[1]
        h = self.num_heads
        head_dim = E // h
        w_q, w_kv = self.in_proj_weight.split([E, 2 * E])
        b_q, b_kv = self.in_proj_bias.split([E, 2 * E])
        q = F.linear(query.transpose(0, 1), w_q, b_q)  # [Nq, M, E]
        k, v = F.linear(context.transpose(0, 1), w_kv, b_kv).chunk(2, dim=-1)  # [Nk, M, E] each

        def split_heads(t: Tensor, n: int) -> Tensor:  # [n, M, E] -> [M*h, n, E/h]
            return t.reshape(n, M * h, head_dim).transpose(0, 1)

        q = split_heads(q, Nq) * math.sqrt(1.0 / head_dim)
        weights = torch.softmax(torch.bmm(q, split_heads(k, Nk).transpose(1, 2)), dim=-1)  # [M*h, Nq, Nk]
        out = torch.bmm(weights, split_heads(v, Nk))  # [M*h, Nq, E/h]
        out = out.reshape(M, h, Nq, head_dim).transpose(1, 2).reshape(M, Nq, E)
        return self.out_proj(out)


class SelfAttentionBlock(nn.Module):
    """Self-attention block. Note the residual starts from the *normalised* input, as published:
    ``x = norm1(x); x = x + attn(x); x = x + mlp(norm2(x))``. x: [M, T, E] -> [M, T, E]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        # Registration order (norms first) matches the published state_dict order.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = PackedMultiheadAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Cross-attention block, residual from the normalised query as in ``SelfAttentionBlock``.

    x: [M, Nq, E]; context: [M, Nk, E] -> [M, Nq, E].
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = PackedMultiheadAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.cross_attn(x, self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Track transformer: ``depth`` rounds of time attention (per track, over frames), each followed, when space
    attention is on, by a space round through K learned virtual tracks (per frame):
    virtual <- points (cross), virtual <- virtual (self), points <- virtual (cross). Cost is O(N*K), not O(N^2).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_size: int,
        output_dim: int,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
        use_space_attn: bool = True,
    ) -> None:
        super().__init__()
        self.num_virtual_tracks = num_virtual_tracks
        self.use_space_attn = use_space_attn
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        # Published spelling ("virual") kept: it is the checkpoint key.
        self.virual_tracks: nn.Parameter | None = (
            nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size)) if use_space_attn else None
        )
        self.time_blocks = nn.ModuleList([SelfAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if use_space_attn:
            self.space_virtual_blocks = nn.ModuleList(
                [SelfAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
            )
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
            )
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # Published init: xavier-uniform linears with zero bias; a near-zero flow head so the first
        # iterations start as small corrections.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, S, D] -> [B, N, S, output_dim]."""
        tokens = self.input_transform(self.input_norm(x))  # [B, N, S, E]
        input_tokens = tokens
        B, N, S, E = tokens.shape
        if self.virual_tracks is not None:
            tokens = torch.cat([tokens, self.virual_tracks.expand(B, -1, S, -1)], dim=1)
        n_all = tokens.shape[1]  # N + K with space attention, else N

        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(B * n_all, S, E)).reshape(B, n_all, S, E)
            if not self.use_space_attn:
                continue
            per_frame = tokens.permute(0, 2, 1, 3).reshape(B * S, n_all, E)
            points, virtual = per_frame[:, :N], per_frame[:, N:]
            virtual = self.space_virtual2point_blocks[i](virtual, points)
            virtual = self.space_virtual_blocks[i](virtual)
            points = self.space_point2virtual_blocks[i](points, virtual)
            tokens = torch.cat([points, virtual], dim=1).reshape(B, S, n_all, E).permute(0, 2, 1, 3)

        tokens = tokens[:, :N] + input_tokens  # drop the virtual tracks; long skip from the input projection
        return self.flow_head(self.output_norm(tokens))


# ----------------------------------------------------------------------------------------------------------------
# Tracker
# ----------------------------------------------------------------------------------------------------------------


class Tracker(nn.Module):
    """Iterative point tracker of VGGT's track head (published ``BaseTrackerPredictor``).

    Defaults are VGGT-1B's track-head settings. ``latent_dim`` must equal the feature maps' channel count and be
    a multiple of 4; the maps must be at least 2^(corr_levels - 1) pixels on each side.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        max_scale: float = 518,
        depth: int = 6,
        num_virtual_tracks: int = 64,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        use_space_attn: bool = True,
    ) -> None:
        super().__init__()
        if latent_dim % 4:
            raise ValueError(f"latent_dim must be a multiple of 4 (sin/cos embeddings), got {latent_dim}")
        if corr_levels < 1 or corr_radius < 0 or depth < 1 or stride <= 0:
            raise ValueError(
                f"need corr_levels >= 1, corr_radius >= 0, depth >= 1, stride > 0; got {corr_levels}, "
                f"{corr_radius}, {depth}, {stride}"
            )
        if use_space_attn and num_virtual_tracks < 1:
            raise ValueError(f"space attention needs num_virtual_tracks >= 1, got {num_virtual_tracks}")
        self.latent_dim = latent_dim
        self.predict_conf = predict_conf
        self.stride = stride
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.transformer_dim = 3 * latent_dim + 4  # flow emb (C) + 2 x scaled flow (4) + corr emb (C) + feat (C)

        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        # Index 0 is added to frame 0's tokens, index 1 to every other frame's.
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            output_dim=latent_dim + 2,  # (dx, dy) + feature delta
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_virtual_tracks=num_virtual_tracks,
            use_space_attn=use_space_attn,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1)) if predict_conf else None

    def _check_inputs(self, query_points: Tensor, fmaps: Tensor, iters: int) -> None:
        if query_points.dim() != 3 or query_points.shape[-1] != 2:
            raise ValueError(f"query_points must be [B, N, 2] (x, y) pixels, got {tuple(query_points.shape)}")
        if fmaps.dim() != 5:
            raise ValueError(f"fmaps must be [B, S, C, HH, WW], got {tuple(fmaps.shape)}")
        if query_points.shape[0] != fmaps.shape[0]:
            raise ValueError(f"batch mismatch: query_points has {query_points.shape[0]}, fmaps {fmaps.shape[0]}")
        if fmaps.shape[2] != self.latent_dim:
            raise ValueError(f"fmaps have {fmaps.shape[2]} channels, the tracker expects latent_dim={self.latent_dim}")
        min_side = 2 ** (self.corr_levels - 1)
        if min(fmaps.shape[-2:]) < min_side:
            raise ValueError(
                f"fmaps {tuple(fmaps.shape[-2:])} too small for {self.corr_levels} pyramid levels: "
                f"each side must be >= {min_side}"
            )
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")

    def forward(
        self, query_points: Tensor, fmaps: Tensor, iters: int = 4, apply_sigmoid: bool = True
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Track frame-0 query points through all frames.

        query_points: [B, N, 2] (x, y) in image pixels, on frame 0.
        fmaps: [B, S, C, HH, WW] feature maps at 1/stride of the image resolution.
        Returns (coord_preds, vis, conf):
            coord_preds: ``iters`` tensors [B, S, N, 2], image pixels, one per iteration (the last is the answer);
                frame 0 always equals the query points.
            vis: [B, S, N] visibility, conf: [B, S, N] confidence (None if predict_conf is False); probabilities,
                or logits when apply_sigmoid is False.
        """
        self._check_inputs(query_points, fmaps, iters)
        B, N, _ = query_points.shape
        _, S, C, HH, WW = fmaps.shape

        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        queries = query_points / float(self.stride)  # feature-map pixels [B, N, 2]

        query_feats = sample_at_points(fmaps[:, 0], queries)  # [B, N, C]
        # Every frame starts at the query location with the query feature. Materialised copies (not expand):
        # the correlation matmul rounds differently on stride-0 inputs, and the refinement amplifies rounding.
        track_feats = query_feats.unsqueeze(1).repeat(1, S, 1, 1)  # [B, S, N, C]
        coords = queries.unsqueeze(1).repeat(1, S, 1, 1)  # [B, S, N, 2]
        pyramid = CorrelationPyramid(fmaps, self.corr_levels, self.corr_radius)

        # Per-track constants: position embedding of the query location, sampled from the sin/cos grid (bilinear,
        # border padding), plus the frame-0 / other-frame token. Both are broadcast over [B*N, S, D].
        grid_emb = sincos_grid_embedding(self.transformer_dim, HH, WW, device=fmaps.device).to(fmaps.dtype)
        query_pos = sample_at_points(grid_emb.expand(B, -1, -1, -1), queries).reshape(B * N, 1, -1)
        frame_token = torch.cat(
            [self.query_ref_token[:, :1], self.query_ref_token[:, 1:].expand(-1, S - 1, -1)], dim=1
        ).to(dtype=fmaps.dtype)  # [1, S, D]

        coord_preds: list[Tensor] = []
        for _ in range(iters):
            coords = coords.detach()  # no gradient through the previous iterations' coordinates
            corr = pyramid.sample(track_feats, coords)  # [B, S, N, L*R*R]
            corr_emb = self.corr_mlp(corr.permute(0, 2, 1, 3).reshape(B * N, S, -1))  # [B*N, S, C]

            flows = (coords - coords[:, :1]).permute(0, 2, 1, 3).reshape(B * N, S, 2)  # motion w.r.t. frame 0
            flow_emb = frequency_embedding_2d(flows, C // 2).to(flows.dtype)
            scaled_flows = flows / self.max_scale
            feats = track_feats.permute(0, 2, 1, 3).reshape(B * N, S, C)

            x = torch.cat([flow_emb, scaled_flows, scaled_flows, corr_emb, feats], dim=2)  # [B*N, S, D]
            x = x + query_pos + frame_token
            delta = self.updateformer(x.reshape(B, N, S, -1)).reshape(B * N * S, C + 2)

            feats = feats.reshape(B * N * S, C) + self.ffeat_updater(self.ffeat_norm(delta[:, 2:]))
            track_feats = feats.reshape(B, N, S, C).permute(0, 2, 1, 3)  # [B, S, N, C]
            coords = coords + delta[:, :2].reshape(B, N, S, 2).permute(0, 2, 1, 3)
            coords = torch.cat([queries.unsqueeze(1), coords[:, 1:]], dim=1)  # frame 0 stays pinned to the query
            coord_preds.append(coords * self.stride)

        flat_feats = track_feats.reshape(B * S * N, C)
        vis = self.vis_predictor(flat_feats).reshape(B, S, N)
        conf = self.conf_predictor(flat_feats).reshape(B, S, N) if self.conf_predictor is not None else None
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        return coord_preds, vis, conf
