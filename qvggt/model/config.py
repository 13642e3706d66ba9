"""Typed architecture config for VGGT and its size presets.

Every architectural knob lives here; modules read nothing else. ``vggt-1b`` is the released architecture
(1,797 tensors, 1,256,537,516 parameters); ``tiny`` and ``small`` run the same code paths at CPU scale.

A frozen dataclass validated on construction, not a pydantic model: the model, quantization and kernel modules
must import with torch, numpy and triton alone (the GPU machine has nothing else). Its JSON (``to_json``) is the
one stored in checkpoints; for every preset it is byte for byte what the earlier pydantic model wrote (checked when
the change was made), and any JSON that model wrote reads back (``from_json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CONFIG_VERSION = 1


def _pos(default: float) -> Any:
    return field(default=default, metadata={"gt": 0})


def _nonneg(default: int) -> Any:
    return field(default=default, metadata={"ge": 0})


@dataclass(frozen=True)
class VGGTConfig:
    """Architecture of a VGGT model.

    The aggregator and the DINOv2 patch embedder share ``embed_dim``; heads read the concatenation of frame and
    global block outputs, so their input width is ``2 * embed_dim``. Construction checks every field's type and
    range and the cross-field constraints, raising ValueError naming the field; ``replace`` (a validated copy),
    ``to_dict`` / ``to_json`` and ``from_dict`` / ``from_json`` (unknown keys refused) are its whole API.
    """

    version: int = CONFIG_VERSION
    name: str = "custom"

    # Input geometry. ``img_size`` is the training size that sets the stored position-embedding grid
    # (img_size / patch_size per side); any multiple of ``patch_size`` runs by interpolation.
    img_size: int = _pos(518)
    patch_size: int = _pos(14)
    default_image_hw: tuple[int, int] = (392, 518)

    # Patch embedder: a DINOv2 ViT with registers ("dinov2") or a single conv ("conv").
    patch_embed: Literal["dinov2", "conv"] = "dinov2"
    encoder_depth: int = _nonneg(24)
    encoder_num_heads: int = _pos(16)
    encoder_mlp_ratio: float = _pos(4.0)
    num_register_tokens: int = _nonneg(4)

    # Aggregator (alternating frame / global attention).
    embed_dim: int = _pos(1024)
    depth: int = _pos(24)
    num_heads: int = _pos(16)
    mlp_ratio: float = _pos(4.0)
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01

    # Heads.
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    camera_trunk_depth: int = _pos(4)
    camera_num_heads: int = _pos(16)
    camera_iterations: int = _pos(4)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    dpt_features: int = _pos(256)
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    track_features: int = _pos(128)
    track_iters: int = _pos(4)
    track_corr_levels: int = _pos(7)
    track_corr_radius: int = _pos(4)
    track_hidden_size: int = _pos(384)
    track_depth: int = _pos(6)
    track_num_virtual_tracks: int = _pos(64)
    track_num_heads: int = _pos(8)
    # The published "tracker_fixed" evaluation checkpoint only flips this flag (no extra weights).
    track_feature_pos_embed: bool = False

    # Correspondence tokens (small models only; off in every preset that mirrors a released checkpoint): a matcher
    # network finds each later frame's patch matches in frame 0, and an embedding of the match offsets is added to
    # the aggregator's patch tokens. VGGT-1B reads correspondences out of DINOv2 features and global attention; a
    # small model trained from scratch on a CPU cannot (docs/TRAINING_NOTES.md section 7). See
    # qvggt/model/correspondence.py.
    correspondence_tokens: bool = False
    matcher_depth: int = _pos(4)
    matcher_dim: int = _pos(64)
    matcher_temperature: float = _pos(0.1)

    # Inference: frames per DPT chunk (memory), and whether to keep every aggregator layer as published.
    frames_chunk_size: int = _pos(8)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, _HINTS[f.name], getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
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

    def replace(self, **changes: Any) -> VGGTConfig:
        """A validated copy with ``changes`` applied; an unknown field name raises ValueError."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), in field order."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }

    def to_json(self, indent: int | None = None) -> str:
        """The JSON checkpoints store (compact without ``indent``)."""
        if indent is None:
            return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VGGTConfig:
        """Build from ``to_dict``'s output (lists for tuples); missing keys take their defaults, unknown keys raise
        ValueError."""
        if not isinstance(data, Mapping):
            kind = type(data).__name__
            raise ValueError(f"a VGGT config must be a mapping of field names to values, got {kind}")  # noqa: TRY004
        _refuse_unknown(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> VGGTConfig:
        """Parse ``to_json``'s output; malformed JSON raises ValueError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the VGGT config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

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


_HINTS = typing.get_type_hints(VGGTConfig)


def _refuse_unknown(names: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(VGGTConfig)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown VGGT config field(s) {unknown}; the fields are {sorted(known)}")


def _checked(f: dataclasses.Field[Any], hint: Any, value: Any) -> Any:
    """``value`` for field ``f`` of type ``hint``, ints widened to float and lists to tuples; else ValueError."""
    where = f"VGGTConfig.{f.name}"
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise ValueError(f"{where} must be a sequence of {len(args)} ints, got {value!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where} must hold ints, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    else:  # a field type this checker does not know: a programming error, not a user's
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    if "gt" in f.metadata and not value > f.metadata["gt"]:
        raise ValueError(f"{where} must be > {f.metadata['gt']}, got {value!r}")
    if "ge" in f.metadata and not value >= f.metadata["ge"]:
        raise ValueError(f"{where} must be >= {f.metadata['ge']}, got {value!r}")
    return value


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
