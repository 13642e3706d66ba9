"""Quantization method configs: versioned, frozen, validated dataclasses with an allow-listed dict round trip.

One method = one ``QuantConfig`` subclass + one handler registered for it in ``qvggt.quant.api`` (the handler
lives in the method's own module, e.g. ``qvggt.quant.rtn``; ``HANDLER_MODULE`` names it so ``quantize_`` can
import it on first use). This module imports only torch-free format code: a config can be built, validated and
serialised (params.yaml, a checkpoint's metadata) without touching ``torch.nn``.

Serialisation (``to_dict`` / ``config_from_dict``)::

    {"_type": "RTNConfig", "_module": "qvggt.quant.config", "version": 1,
     "weight": "int4-sym-group128", "activation": "int8-sym-token", "coverage": "default",
     "layer_overrides": {"aggregator.global_blocks.23.*": "int8-sym-channel"}, "clip_search": false}

Formats are stored by their canonical name (``QuantFormat.name``, which ``parse_format`` reads back exactly),
enums by value. ``config_from_dict`` only instantiates ``QuantConfig`` subclasses defined in a module of
``ALLOWED_CONFIG_MODULES``: a dict from an untrusted file cannot name an arbitrary class.

Subclass contract: ``@dataclass(frozen=True, kw_only=True, eq=False)`` (equality and hashing come from the
base, by ``to_dict``), every field JSON-encodable by ``to_dict`` and accepted back by ``__init__`` in its encoded
form (coerce in ``__post_init__``, see ``coerce_format``), and ``super().__post_init__()`` called first.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from qvggt.quant.formats import FormatKind, Granularity, QuantFormat, coerce_enum, parse_format

__all__ = [
    "ACTIVATION_GRANULARITIES",
    "ALLOWED_CONFIG_MODULES",
    "INT8_PER_CHANNEL",
    "INT8_PER_TOKEN",
    "WEIGHT_GRANULARITIES",
    "Coverage",
    "QuantConfig",
    "RTNConfig",
    "coerce_format",
    "config_from_dict",
    "weight_activation_formats",
]

# Modules whose QuantConfig subclasses config_from_dict may instantiate. Methods added later put their configs
# in one of these (a missing module is simply skipped when resolving).
ALLOWED_CONFIG_MODULES: tuple[str, ...] = (
    "qvggt.quant.config",
    "qvggt.quant.rtn",
    "qvggt.quant.smooth",
    "qvggt.quant.gptq",
    "qvggt.quant.dsfq",
    "qvggt.quant.quarot",
)

# Weights [N, K]: one scale per output channel, per group of K, or per tensor. "token" would mean per row of a
# weight, i.e. "channel" under another name (and nonsense for a conv kernel), so it is refused to avoid doubt.
WEIGHT_GRANULARITIES = frozenset({Granularity.CHANNEL, Granularity.GROUP, Granularity.TENSOR})
# Dynamic activation scales [..., K]: per token, per group of a token, or per tensor. "channel" (dim 0 of an
# activation, i.e. the batch) is meaningless dynamically; static per-channel scales need calibration.
ACTIVATION_GRANULARITIES = frozenset({Granularity.TOKEN, Granularity.GROUP, Granularity.TENSOR})


# Defaults of RTNConfig (QuantFormat is frozen, so sharing one instance is safe).
INT8_PER_CHANNEL = QuantFormat(bits=8, granularity=Granularity.CHANNEL)
INT8_PER_TOKEN = QuantFormat(bits=8, granularity=Granularity.TOKEN)


class Coverage(str, Enum):
    """Which layers a method quantizes (see ``qvggt.quant.coverage.select_linears``).

    default: the qkv / proj / fc1 / fc2 Linears of the aggregator's frame and global blocks (192 for vggt-1b),
        as the published QuantVGGT code does; encoder, heads, norms and attention matmuls stay full precision.
    full: every nn.Linear, nn.Conv2d and nn.ConvTranspose2d of the model.
    """

    DEFAULT = "default"
    FULL = "full"


def coerce_format(value: Any, where: str) -> QuantFormat:
    """A ``QuantFormat`` from a format, its canonical name (``"int4-sym-group128"``) or its ``to_dict`` dict.

    Raises:
        ValueError: naming ``where`` (e.g. ``"RTNConfig.weight"``) on anything else.
    """
    if isinstance(value, QuantFormat):
        return value
    if isinstance(value, str):
        return parse_format(value)
    if isinstance(value, dict):
        return QuantFormat.from_dict(value)
    raise ValueError(f"{where} must be a QuantFormat, a format name or a dict, got {type(value).__name__}")


def _check_granularity(fmt: QuantFormat, allowed: frozenset[Granularity], where: str) -> None:
    if fmt.granularity not in allowed:
        options = ", ".join(sorted(g.value for g in allowed))
        raise ValueError(f"{where}={fmt.name}: granularity {fmt.granularity.value!r} is not one of {options}")


def _encode(value: Any) -> Any:
    """JSON-friendly encoding of a config field (inverse: the config's own coercion in ``__post_init__``)."""
    if isinstance(value, QuantFormat):
        return value.name
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise a config field of type {type(value).__name__}")


@dataclass(frozen=True, kw_only=True, eq=False)
class QuantConfig:
    """Base of every quantization method config.

    Attributes:
        version: schema version of the config class; ``SUPPORTED_VERSIONS`` lists what this code reads.
    """

    SUPPORTED_VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    # Module whose import registers this config's handler (quantize_ imports it on first use).
    HANDLER_MODULE: ClassVar[str | None] = None
    # Fields added after checkpoints were written, with the value those checkpoints were made with: a stored config
    # missing one reads back as what produced it, not as today's default (``config_from_dict``).
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {}

    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ValueError(f"{type(self).__name__}.version must be an int, got {self.version!r}")  # noqa: TRY004
        if self.version not in self.SUPPORTED_VERSIONS:
            raise ValueError(
                f"{type(self).__name__}.version={self.version} is not supported by this qvggt "
                f"(supported: {list(self.SUPPORTED_VERSIONS)}); was the config written by a newer version?"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly dict with ``_type`` and ``_module``; inverse of ``config_from_dict``."""
        out: dict[str, Any] = {"_type": type(self).__name__, "_module": type(self).__module__}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    # Equality and hashing by content (to_dict), so dict fields (layer_overrides) neither break hash() nor compare
    # by identity. Configs are frozen; treat dict fields as read-only too.
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _resolve_config_class(name: str, module: str | None) -> type[QuantConfig]:
    if module is not None and module not in ALLOWED_CONFIG_MODULES:
        raise ValueError(
            f"refusing config class {module}.{name}: configs are only loaded from {list(ALLOWED_CONFIG_MODULES)}"
        )
    candidates = [module] if module is not None else list(ALLOWED_CONFIG_MODULES)
    for mod_name in candidates:
        try:
            found = importlib.util.find_spec(mod_name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        obj = getattr(importlib.import_module(mod_name), name, None)
        # Only a QuantConfig subclass *defined* in an allowed module, never another attribute (an imported
        # torch class, a function) that happens to carry the name.
        if (
            isinstance(obj, type)
            and issubclass(obj, QuantConfig)
            and obj is not QuantConfig
            and obj.__module__ in ALLOWED_CONFIG_MODULES
        ):
            return obj
    where = module if module is not None else f"any of {list(ALLOWED_CONFIG_MODULES)}"
    raise ValueError(f"refusing config type {name!r}: it is not a QuantConfig subclass defined in {where}")


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Rebuild a config from ``QuantConfig.to_dict`` output, resolving ``_type`` only in the allow-list.

    Raises:
        ValueError: on a missing/refused ``_type`` or ``_module``, unknown fields (a typo must not silently
            default), an unsupported version, or any invalid field value.
    """
    if not isinstance(data, dict):
        raise ValueError(f"config_from_dict expects a dict, got {type(data).__name__}")  # noqa: TRY004
    name = data.get("_type")
    if not isinstance(name, str):
        raise ValueError(f"config dict has no '_type' naming its config class (keys: {sorted(data)})")  # noqa: TRY004
    module = data.get("_module")
    if module is not None and not isinstance(module, str):
        raise ValueError(f"config dict '_module' must be a string, got {module!r}")
    cls = _resolve_config_class(name, module)
    kwargs = {**cls.LEGACY_DEFAULTS, **{k: v for k, v in data.items() if k not in ("_type", "_module")}}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown {name} fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**kwargs)


@dataclass(frozen=True, kw_only=True, eq=False)
class RTNConfig(QuantConfig):
    """Round-to-nearest weight quantization with dynamic activation quantization (no calibration data).

    Attributes:
        weight: weight format; granularity channel (one scale per output channel), group (along in_features)
            or tensor. Default int8 per-channel symmetric.
        activation: dynamic input format of every quantized Linear, granularity token / group / tensor, or None
            for weight-only. Default int8 per-token symmetric. Convolutions are always weight-only.
        coverage: which layers (``Coverage``): "default" (192 aggregator-block Linears for vggt-1b) or "full".
        layer_overrides: per-layer weight formats (mixed precision). Keys are module names
            (``"aggregator.global_blocks.23.mlp.fc2"``) or fnmatch patterns (``"aggregator.*_blocks.0.*"``);
            values a ``QuantFormat``, a format name, an int (``weight`` with that many bits) or None (keep that
            layer in full precision). An exact name beats patterns; among patterns the first matching key (dict
            order) wins. A key matching no selected layer raises ValueError when the config is applied.
        clip_search: choose each weight scale group's clipping ratio by min-MSE search (``mse_clip_search``)
            instead of plain min/max.

    Raises:
        ValueError: on any invalid field, naming it.
    """

    HANDLER_MODULE: ClassVar[str | None] = "qvggt.quant.rtn"

    weight: QuantFormat = INT8_PER_CHANNEL
    activation: QuantFormat | None = INT8_PER_TOKEN
    coverage: Coverage = Coverage.DEFAULT
    layer_overrides: dict[str, QuantFormat | None] = field(default_factory=dict)
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        weight = coerce_format(self.weight, "RTNConfig.weight")
        _check_granularity(weight, WEIGHT_GRANULARITIES, "RTNConfig.weight")
        object.__setattr__(self, "weight", weight)
        if self.activation is not None:
            act = coerce_format(self.activation, "RTNConfig.activation")
            _check_granularity(act, ACTIVATION_GRANULARITIES, "RTNConfig.activation")
            object.__setattr__(self, "activation", act)
        object.__setattr__(self, "coverage", coerce_enum(Coverage, self.coverage, "RTNConfig.coverage"))
        if not isinstance(self.clip_search, bool):
            raise ValueError(f"RTNConfig.clip_search must be a bool, got {self.clip_search!r}")  # noqa: TRY004
        if not isinstance(self.layer_overrides, dict):
            raise ValueError(  # noqa: TRY004
                f"RTNConfig.layer_overrides must be a dict of layer name/pattern -> format, "
                f"got {type(self.layer_overrides).__name__}"
            )
        overrides: dict[str, QuantFormat | None] = {}
        for key, value in self.layer_overrides.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"RTNConfig.layer_overrides keys must be non-empty strings, got {key!r}")
            overrides[key] = self._override_format(key, value, weight)
        # A private copy: mutating the caller's dict later must not change a frozen config.
        object.__setattr__(self, "layer_overrides", overrides)

    @staticmethod
    def _override_format(key: str, value: Any, weight: QuantFormat) -> QuantFormat | None:
        where = f"RTNConfig.layer_overrides[{key!r}]"
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            try:  # bit override of the base weight format: same kind, symmetry and granularity
                fmt = dataclasses.replace(weight, bits=value)
            except ValueError as exc:
                raise ValueError(f"{where}={value}: {exc}") from None
        else:
            fmt = coerce_format(value, where)
        _check_granularity(fmt, WEIGHT_GRANULARITIES, where)
        return fmt


def weight_activation_formats(
    wbits: int, abits: int | None, group_size: int | None = None, fp8: bool = False
) -> tuple[QuantFormat, QuantFormat | None]:
    """Typical W{wbits}A{abits} formats: symmetric weights per output channel (or per group of ``group_size``
    input channels), symmetric dynamic per-token activations (``abits=None``: weight-only).

    ``fp8=True`` gives fp8 e4m3 for both (W8A8 only): per-channel (or per-group) weights, per-token activations.
    Whether ``group_size`` divides each layer's in_features is checked when the config is applied to a model.

    Examples:
        ``weight_activation_formats(4, 4)`` -> (int4-sym-channel, int4-sym-token)
        ``weight_activation_formats(4, None, group_size=128)`` -> (int4-sym-group128, None)

    Raises:
        ValueError: on bits out of range, fp8 with anything but 8 bits, or a non-positive group size.
    """
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    w_gran = Granularity.GROUP if group_size is not None else Granularity.CHANNEL
    if fp8:
        if wbits != 8 or abits not in (8, None):
            raise ValueError(
                f"fp8 e4m3 is an 8-bit format: W{wbits}A{abits} is impossible with fp8=True (use W8A8, W8 or int)"
            )
        kind = FormatKind.FP8_E4M3
    else:
        kind = FormatKind.INT
    weight = QuantFormat(kind=kind, bits=wbits, granularity=w_gran, group_size=group_size)
    act = None if abits is None else QuantFormat(kind=kind, bits=abits, granularity=Granularity.TOKEN)
    return weight, act
