"""Number formats for quantization: what a quantized tensor's values are and how its scales are shared.

A ``QuantFormat`` is a frozen, validated value object. It says nothing about *how* scales are chosen (RTN,
MSE clipping, GPTQ, ...); methods build on it. Names round-trip through ``parse_format``::

    int4-sym-group128    4-bit signed, symmetric, one scale per 128 consecutive elements of the last dim
    int8-asym-token      8-bit unsigned with zero point, one (scale, zero point) per row of an activation
    int8-sym-channel     8-bit signed, one scale per output channel (row, dim 0) of a weight
    fp8_e4m3-tensor      float8 e4m3 (torch.float8_e4m3fn), one scale for the whole tensor

Granularity legend (x is the tensor being quantized, K its last dim, G the group size):

    tensor   one scale for all of x
    channel  one scale per index of dim 0: per output channel of a weight [N, K] (or [N, C, kh, kw])
    token    one scale per row of an activation [..., K]: dynamic only, tokens change with every input
    group    one scale per G consecutive elements along the last dim: x viewed as [..., K/G, G]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch

__all__ = ["FP8_E4M3_MAX", "FormatKind", "Granularity", "QuantFormat", "parse_format"]

# Largest finite torch.float8_e4m3fn value (1.75 * 2^8). The "fn" variant has no infinities; an
# unsaturated cast of anything larger gives NaN, so quantization always saturates to this first.
FP8_E4M3_MAX = 448.0


class FormatKind(str, Enum):
    """Value type of a quantized tensor."""

    INT = "int"
    FP8_E4M3 = "fp8_e4m3"


class Granularity(str, Enum):
    """How many elements share one scale (see the module docstring for the exact axes)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    TOKEN = "token"
    GROUP = "group"


def coerce_enum(enum_cls: type[Enum], value: Any, where: str) -> Any:
    """``enum_cls(value)``, or a ValueError naming ``where`` and the valid options."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{where}={value!r} is not one of {options}") from None


@dataclass(frozen=True)
class QuantFormat:
    """A quantization number format plus the granularity at which scales are shared.

    Args:
        kind: ``"int"`` or ``"fp8_e4m3"`` (strings are coerced to ``FormatKind``).
        bits: 2..8 for int; exactly 8 for fp8 (e4m3 is an 8-bit encoding: there is no "3-bit fp8").
        symmetric: int only may be asymmetric (unsigned codes plus an integer zero point); fp8 is always
            symmetric around 0.
        granularity: ``"tensor"``, ``"channel"``, ``"token"`` or ``"group"`` (coerced to ``Granularity``).
        group_size: elements per group along the last dim; required with ``granularity="group"`` and
            forbidden otherwise. Whether it divides the last dim is checked when a tensor is quantized.

    Raises:
        ValueError: on any invalid combination, naming the field and the allowed values.
    """

    kind: FormatKind = FormatKind.INT
    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = Granularity.TENSOR
    group_size: int | None = None

    def __post_init__(self) -> None:
        # frozen dataclass: coerce strings to enums via object.__setattr__ so "int" == FormatKind.INT everywhere.
        object.__setattr__(self, "kind", coerce_enum(FormatKind, self.kind, "QuantFormat.kind"))
        object.__setattr__(self, "granularity", coerce_enum(Granularity, self.granularity, "QuantFormat.granularity"))
        # Every invalid field raises ValueError, wrong types included (as pydantic's ValidationError does), so
        # callers loading params.yaml catch one exception type. bool is an int subclass: True is no bit width.
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantFormat.bits must be an int, got {self.bits!r}")  # noqa: TRY004
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantFormat.symmetric must be a bool, got {self.symmetric!r}")  # noqa: TRY004
        if self.kind is FormatKind.INT:
            if not 2 <= self.bits <= 8:
                raise ValueError(f"QuantFormat.bits={self.bits} is out of range for int: expected 2..8")
        else:
            if self.bits != 8:
                raise ValueError(
                    f"QuantFormat.bits={self.bits} is invalid for {self.kind.value}: fp8 e4m3 is an 8-bit format "
                    "(1 sign, 4 exponent, 3 mantissa bits); use kind='int' for lower bit widths"
                )
            if not self.symmetric:
                raise ValueError(f"QuantFormat.symmetric=False is invalid for {self.kind.value}: fp8 is symmetric only")
        if self.granularity is Granularity.GROUP:
            if self.group_size is None:
                raise ValueError("QuantFormat.group_size is required with granularity='group'")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"QuantFormat.group_size must be a positive int, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantFormat.group_size={self.group_size} is only meaningful with granularity='group' "
                f"(got granularity={self.granularity.value!r})"
            )

    # ------------------------------------------------------------------ value range

    @property
    def is_float(self) -> bool:
        """True for floating-point formats (fp8), whose grid is non-uniform and has no zero point."""
        return self.kind is not FormatKind.INT

    @property
    def qmin(self) -> int | float:
        """Smallest quantized value (code for int, value for fp8).

        Symmetric int uses the *restricted* range ``-(2^(b-1) - 1)``, not ``-2^(b-1)``: the grid is then symmetric
        around 0, so ``quantize(-x) == -quantize(x)`` and a sign flip (Hadamard rotations, negated channels) never
        changes which values clip. It costs one of 2^b codes (noticeable only at 2 bits: {-1, 0, 1}).
        Asymmetric int codes are unsigned ``[0, 2^b - 1]`` with a zero point. fp8 e4m3: ``-448.0``.
        """
        if self.is_float:
            return -FP8_E4M3_MAX
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int | float:
        """Largest quantized value: ``2^(b-1) - 1`` (symmetric int), ``2^b - 1`` (asymmetric int), ``448.0`` (fp8)."""
        if self.is_float:
            return FP8_E4M3_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype that ``quantize`` returns: int8 (symmetric int), uint8 (asymmetric int), float8_e4m3fn (fp8).

        Every int code fits its byte: symmetric codes lie in [-127, 127], asymmetric codes in [0, 255].
        Sub-byte formats are packed separately (``qvggt.quant.packing``).
        """
        if self.is_float:
            return torch.float8_e4m3fn
        return torch.int8 if self.symmetric else torch.uint8

    # ------------------------------------------------------------------ naming and serialisation

    @property
    def name(self) -> str:
        """Canonical short name, e.g. ``"int4-sym-group128"``, ``"int8-asym-token"``, ``"fp8_e4m3-token"``."""
        gran = self.granularity.value + (str(self.group_size) if self.granularity is Granularity.GROUP else "")
        if self.is_float:
            return f"{self.kind.value}-{gran}"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{gran}"

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict (enum values as strings); inverse of ``from_dict``."""
        return {
            "kind": self.kind.value,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.value,
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantFormat:
        """Build from ``to_dict`` output; unknown keys raise ValueError (a typo must not silently default)."""
        if not isinstance(data, dict):
            raise ValueError(f"QuantFormat.from_dict expects a dict, got {type(data).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantFormat keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


_NAME_RE = re.compile(
    r"^(?:int(?P<bits>\d+)-(?P<sym>sym|asym)|(?P<fp8>fp8_e4m3)(?:-sym)?)-(?P<gran>tensor|channel|token|group(?P<gs>\d+))$"
)


def parse_format(name: str) -> QuantFormat:
    """Parse a canonical format name (``QuantFormat.name``) back into a ``QuantFormat``.

    Grammar: ``int<bits>-<sym|asym>-<granularity>`` or ``fp8_e4m3[-sym]-<granularity>``, where granularity is
    ``tensor``, ``channel``, ``token`` or ``group<size>``. Examples: ``int4-sym-group128``, ``fp8_e4m3-token``.

    Raises:
        ValueError: if the name does not match the grammar, or the format it names is invalid.
    """
    m = _NAME_RE.match(name.strip().lower()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"cannot parse quantization format {name!r}: expected 'int<bits>-<sym|asym>-<granularity>' or "
            "'fp8_e4m3-<granularity>' with granularity tensor|channel|token|group<size>, e.g. 'int4-sym-group128'"
        )
    gran = m["gran"]
    group_size = int(m["gs"]) if m["gs"] is not None else None
    if group_size is not None:
        gran = "group"
    if m["fp8"]:
        return QuantFormat(kind=FormatKind.FP8_E4M3, bits=8, symmetric=True, granularity=gran, group_size=group_size)
    return QuantFormat(
        kind=FormatKind.INT, bits=int(m["bits"]), symmetric=m["sym"] == "sym", granularity=gran, group_size=group_size
    )
