"""Typed architecture config for VGGT and its size presets.

Every architectural knob lives here; modules read nothing else. ``vggt-1b`` is the released architecture
(1,797 tensors, 1,256,537,516 parameters); ``tiny`` and ``small`` run the same code paths at CPU scale.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_VERSION = 1


class VGGTConfig(BaseModel):
    """Architecture of a VGGT model.

    The aggregator and the DINOv2 patch embedder share ``embed_dim``; heads read the concatenation of frame and
    global block outputs, so their input width is ``2 * embed_dim``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = CONFIG_VERSION
    name: str = "custom"

    # Input geometry. ``img_size`` is the training size that sets the stored position-embedding grid
    # (img_size / patch_size per side); any multiple of ``patch_size`` runs by interpolation.
    img_size: int = Field(518, gt=0)
    patch_size: int = Field(14, gt=0)
    default_image_hw: tuple[int, int] = (392, 518)

    # Patch embedder: a DINOv2 ViT with registers ("dinov2") or a single conv ("conv").
    patch_embed: Literal["dinov2", "conv"] = "dinov2"
    encoder_depth: int = Field(24, ge=0)
    encoder_num_heads: int = Field(16, gt=0)
    encoder_mlp_ratio: float = Field(4.0, gt=0)
    num_register_tokens: int = Field(4, ge=0)

    # Aggregator (alternating frame / global attention).
    embed_dim: int = Field(1024, gt=0)
    depth: int = Field(24, gt=0)
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01

    # Heads.
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    camera_trunk_depth: int = Field(4, gt=0)
    camera_num_heads: int = Field(16, gt=0)
    camera_iterations: int = Field(4, gt=0)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    dpt_features: int = Field(256, gt=0)
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    track_features: int = Field(128, gt=0)
    track_iters: int = Field(4, gt=0)
    track_corr_levels: int = Field(7, gt=0)
    track_corr_radius: int = Field(4, gt=0)
    track_hidden_size: int = Field(384, gt=0)
    track_depth: int = Field(6, gt=0)
    track_num_virtual_tracks: int = Field(64, gt=0)
    track_num_heads: int = Field(8, gt=0)
    # The published "tracker_fixed" evaluation checkpoint only flips this flag (no extra weights).
    track_feature_pos_embed: bool = False

    # Correspondence tokens (small models only; off in every preset that mirrors a released checkpoint): a matcher
    # network finds each later frame's patch matches in frame 0, and an embedding of the match offsets is added to
    # the aggregator's patch tokens. VGGT-1B reads correspondences out of DINOv2 features and global attention; a
    # small model trained from scratch on a CPU cannot (docs/TRAINING_NOTES.md section 7). See
    # qvggt/model/correspondence.py.
    correspondence_tokens: bool = False
    matcher_depth: int = Field(4, gt=0)
    matcher_dim: int = Field(64, gt=0)
    matcher_temperature: float = Field(0.1, gt=0)

    # Inference: frames per DPT chunk (memory), and whether to keep every aggregator layer as published.
    frames_chunk_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _check(self) -> VGGTConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.rope_freq > 0 and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"2D RoPE needs a head dim divisible by 4, got {self.embed_dim // self.num_heads}: "
                "change embed_dim or num_heads"
            )
        if self.patch_embed == "dinov2" and self.embed_dim % self.encoder_num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by encoder_num_heads")
        if (2 * self.embed_dim) % self.camera_num_heads:
            raise ValueError(f"2*embed_dim {2 * self.embed_dim} is not divisible by camera_num_heads")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        for h in self.default_image_hw:
            if h % self.patch_size:
                raise ValueError(f"default_image_hw {self.default_image_hw} must be multiples of {self.patch_size}")
        bad = [i for i in self.intermediate_layer_idx if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"intermediate_layer_idx {self.intermediate_layer_idx} out of range for depth {self.depth}"
            )
        return self

    @property
    def head_dim_in(self) -> int:
        return 2 * self.embed_dim

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in each frame's sequence (camera + registers come first)."""
        return 1 + self.num_register_tokens

    def layers_read_by_heads(self) -> tuple[int, ...]:
        """Aggregator layers any enabled head reads: DPT/track layers and the last one (camera)."""
        read: set[int] = set()
        if self.enable_camera:
            read.add(self.depth - 1)
        if self.enable_depth or self.enable_point or self.enable_track:
            read.update(self.intermediate_layer_idx)
        return tuple(sorted(read))


PRESETS: dict[str, VGGTConfig] = {
    "vggt-1b": VGGTConfig(name="vggt-1b"),
    # Same code paths, CPU scale. Head dims stay multiples of 4 for 2D RoPE.
    "tiny": VGGTConfig(
        name="tiny",
        img_size=126,
        default_image_hw=(126, 126),
        encoder_depth=2,
        encoder_num_heads=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        intermediate_layer_idx=(0, 1, 2, 3),
        camera_trunk_depth=1,
        camera_num_heads=4,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
        track_features=32,
        track_iters=2,
        track_corr_levels=3,
        track_corr_radius=2,
        track_hidden_size=64,
        track_depth=1,
        track_num_virtual_tracks=8,
        track_num_heads=4,
    ),
    "small": VGGTConfig(
        name="small",
        img_size=126,
        default_image_hw=(126, 126),
        encoder_depth=4,
        encoder_num_heads=4,
        embed_dim=128,
        depth=8,
        num_heads=4,
        intermediate_layer_idx=(1, 3, 5, 7),
        camera_trunk_depth=2,
        camera_num_heads=8,
        dpt_features=64,
        dpt_out_channels=(32, 64, 128, 128),
        enable_track=False,
    ),
}


def get_preset(name: str) -> VGGTConfig:
    """Return the named preset; raises ValueError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
