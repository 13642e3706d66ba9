"""QuantFormat validation, value ranges, storage dtypes, names and (de)serialisation."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from qvggt.quant.formats import FP8_E4M3_MAX, FormatKind, Granularity, QuantFormat, parse_format


def all_formats() -> list[QuantFormat]:
    grans = [("tensor", None), ("channel", None), ("token", None), ("group", 32), ("group", 128)]
    out = [
        QuantFormat(kind="int", bits=b, symmetric=s, granularity=g, group_size=gs)
        for b, s, (g, gs) in itertools.product(range(2, 9), (True, False), grans)
    ]
    out += [QuantFormat(kind="fp8_e4m3", granularity=g, group_size=gs) for g, gs in grans]
    return out


@pytest.mark.parametrize(
    ("bits", "symmetric", "qmin", "qmax", "dtype"),
    [
        (2, True, -1, 1, torch.int8),
        (4, True, -7, 7, torch.int8),
        (8, True, -127, 127, torch.int8),
        (2, False, 0, 3, torch.uint8),
        (4, False, 0, 15, torch.uint8),
        (8, False, 0, 255, torch.uint8),
    ],
)
def test_int_ranges_and_storage(bits: int, symmetric: bool, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    fmt = QuantFormat(kind="int", bits=bits, symmetric=symmetric)
    assert (fmt.qmin, fmt.qmax, fmt.storage_dtype) == (qmin, qmax, dtype)
    assert isinstance(fmt.qmin, int) and isinstance(fmt.qmax, int)
    assert not fmt.is_float


def test_fp8_range_and_storage() -> None:
    fmt = QuantFormat(kind="fp8_e4m3", granularity="token")
    assert (fmt.qmin, fmt.qmax) == (-448.0, 448.0) == (-FP8_E4M3_MAX, FP8_E4M3_MAX)
    assert FP8_E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max
    assert fmt.storage_dtype is torch.float8_e4m3fn and fmt.is_float and fmt.bits == 8 and fmt.symmetric


def test_strings_are_coerced_to_enums_and_equal() -> None:
    a = QuantFormat(kind="int", bits=4, granularity="group", group_size=128)
    b = QuantFormat(kind=FormatKind.INT, bits=4, granularity=Granularity.GROUP, group_size=128)
    assert a == b and hash(a) == hash(b)
    assert a.kind is FormatKind.INT and a.granularity is Granularity.GROUP
    assert a.granularity == "group"  # str-Enum compares with its value
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.bits = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("int4-sym-group128", QuantFormat(bits=4, granularity="group", group_size=128)),
        ("int8-asym-token", QuantFormat(bits=8, symmetric=False, granularity="token")),
        ("int8-sym-channel", QuantFormat(bits=8, granularity="channel")),
        ("int3-asym-tensor", QuantFormat(bits=3, symmetric=False)),
        ("fp8_e4m3-token", QuantFormat(kind="fp8_e4m3", granularity="token")),
        ("fp8_e4m3-sym-group64", QuantFormat(kind="fp8_e4m3", granularity="group", group_size=64)),
        (" INT2-SYM-CHANNEL ", QuantFormat(bits=2, granularity="channel")),
    ],
)
def test_parse_known_names(name: str, expected: QuantFormat) -> None:
    assert parse_format(name) == expected


@pytest.mark.parametrize("fmt", all_formats(), ids=str)
def test_name_and_dict_round_trip(fmt: QuantFormat) -> None:
    assert parse_format(fmt.name) == fmt
    assert str(fmt) == fmt.name
    d = fmt.to_dict()
    assert all(isinstance(v, (str, int, bool, type(None))) for v in d.values())  # JSON/YAML friendly
    assert QuantFormat.from_dict(d) == fmt


def test_canonical_names() -> None:
    assert QuantFormat(bits=4, granularity="group", group_size=128).name == "int4-sym-group128"
    assert QuantFormat(kind="fp8_e4m3", granularity="token").name == "fp8_e4m3-token"
    assert QuantFormat(bits=8, symmetric=False, granularity="channel").name == "int8-asym-channel"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "fp8_e4m3", "bits": 3}, r"bits=3 is invalid for fp8_e4m3.*8-bit format"),
        ({"kind": "fp8_e4m3", "symmetric": False}, "symmetric only"),
        ({"bits": 1}, r"bits=1 is out of range for int: expected 2\.\.8"),
        ({"bits": 9}, r"bits=9 is out of range"),
        ({"bits": 0}, r"out of range"),
        ({"bits": True}, "must be an int"),
        ({"bits": 4.0}, "must be an int"),
        ({"symmetric": 1}, "must be a bool"),
        ({"granularity": "row"}, r"granularity='row' is not one of 'tensor', 'channel', 'token', 'group'"),
        ({"kind": "nf4"}, r"kind='nf4' is not one of 'int', 'fp8_e4m3'"),
        ({"granularity": "group"}, "group_size is required"),
        ({"granularity": "group", "group_size": 0}, "positive int"),
        ({"granularity": "group", "group_size": -4}, "positive int"),
        ({"granularity": "channel", "group_size": 128}, "only meaningful with granularity='group'"),
    ],
)
def test_invalid_formats_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantFormat(**kwargs)


@pytest.mark.parametrize(
    "name", ["int4", "int4-sym", "int4-sym-row", "int4-half-tensor", "fp4-tensor", "", "int4-sym-group"]
)
def test_parse_rejects_malformed_names(name: str) -> None:
    with pytest.raises(ValueError, match="cannot parse quantization format"):
        parse_format(name)


@pytest.mark.parametrize(("name", "match"), [("int9-sym-tensor", "out of range"), ("int4-sym-group0", "positive")])
def test_parse_rejects_invalid_formats(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_format(name)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown QuantFormat keys \['group'\]"):
        QuantFormat.from_dict({"bits": 4, "group": 128})
    with pytest.raises(ValueError, match="expects a dict"):
        QuantFormat.from_dict("int4-sym-tensor")  # type: ignore[arg-type]
