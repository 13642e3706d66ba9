"""Bit packing: exact round trips (odd K included), the documented bit order, and range errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvggt.quant.formats import parse_format
from qvggt.quant.packing import pack_bits, pack_int4, packed_size, unpack_bits, unpack_int4
from qvggt.quant.quantizer import compute_scales, quantize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_codes(shape: tuple[int, ...], bits: int, signed: bool, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if signed:
        return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g).to(torch.int8).to(device)
    return torch.randint(0, 2**bits, shape, generator=g).to(torch.uint8).to(device)


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(1, 37).map(lambda k: (*lead, k))
)


@settings(max_examples=150, deadline=None)
@given(shapes, st.booleans(), st.integers(0, 2**31 - 1))
def test_int4_round_trip(shape: tuple[int, ...], signed: bool, seed: int) -> None:
    q = random_codes(shape, 4, signed, seed)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(packed, pack_bits(q, 4))  # the fast path follows the general bit order
    out = unpack_int4(packed, shape[-1], signed=signed)
    assert out.dtype == q.dtype and torch.equal(out, q)


@settings(max_examples=150, deadline=None)
@given(shapes, st.integers(1, 8), st.booleans(), st.integers(0, 2**31 - 1))
def test_bits_round_trip(shape: tuple[int, ...], bits: int, signed: bool, seed: int) -> None:
    q = random_codes(shape, bits, signed, seed)
    packed = pack_bits(q, bits)
    assert packed.shape == (*shape[:-1], packed_size(shape[-1], bits))
    assert torch.equal(unpack_bits(packed, bits, shape[-1], signed=signed), q)


def test_documented_bit_order() -> None:
    # int4: low nibble = even index.
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert pack_int4(torch.tensor([-1, 0, -8], dtype=torch.int8)).tolist() == [0x0F, 0x08]  # odd K: zero pad
    # int2: code 4i+j in bits [2j, 2j+2) of byte i.
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]
    # int3: codes straddle bytes, LSB first: 7 | 1<<3 | 5<<6 (low 2 bits of 5) ; then 5>>2 = 1.
    assert pack_bits(torch.tensor([7, 1, 5], dtype=torch.uint8), 3).tolist() == [(7 | 1 << 3 | 5 << 6) & 0xFF, 1]


def test_packs_quantizer_codes() -> None:
    x = torch.randn(8, 33)
    for name in ("int4-sym-channel", "int4-asym-token"):
        fmt = parse_format(name)
        q = quantize(x, fmt, *compute_scales(x, fmt))
        assert torch.equal(unpack_int4(pack_int4(q), 33, signed=fmt.symmetric), q)
    fmt = parse_format("int3-sym-channel")
    q = quantize(x, fmt, *compute_scales(x, fmt))
    assert torch.equal(unpack_bits(pack_bits(q, 3), 3, 33, signed=True), q)


@pytest.mark.parametrize(
    ("q", "match"),
    [
        (torch.tensor([0, 8], dtype=torch.int8), r"signed 4-bit codes must lie in \[-8, 7\], got values in \[0, 8\]"),
        (torch.tensor([-9, 0], dtype=torch.int8), r"\[-8, 7\]"),
        (torch.tensor([16], dtype=torch.uint8), r"unsigned 4-bit codes must lie in \[0, 15\]"),
        (torch.tensor([1, 2], dtype=torch.int32), "int8 .* or uint8"),
        (torch.tensor(3, dtype=torch.int8), "at least 1-D"),
    ],
)
def test_pack_int4_rejects_bad_codes(q: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_int4(q)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unsigned 2-bit codes must lie in \[0, 3\]"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        pack_bits(torch.tensor([0], dtype=torch.uint8), 9)
    packed = pack_int4(torch.zeros(2, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="K=7 codes of 4 bits need 4"):
        unpack_int4(packed, 7, signed=True)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(packed.to(torch.int8), 5, signed=True)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device: str) -> None:
    q = random_codes((16, 129), 4, True, seed=0, device=device)
    packed = pack_int4(q)
    assert packed.device.type == device and torch.equal(unpack_int4(packed, 129, signed=True), q)
    q3 = random_codes((16, 129), 3, False, seed=1, device=device)
    assert torch.equal(unpack_bits(pack_bits(q3, 3), 3, 129, signed=False), q3)
