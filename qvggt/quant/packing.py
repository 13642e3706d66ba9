"""Sub-byte packing of integer codes into uint8 along the last dim (pure torch, CPU and CUDA).

Bit order (one convention for every width): row ``[..., K]`` is a little-endian bit stream; code ``i`` occupies
stream bits ``[i*b, (i+1)*b)``, least significant bit first, and stream bit ``j`` is bit ``j % 8`` of byte
``j // 8``. For 4 bits this means: **byte ``i`` holds code ``2i`` in its low nibble and code ``2i+1`` in its
high nibble** (the layout of most int4 GEMM kernels before any kernel-specific shuffling). For 2 bits, code ``4i+j``
sits in bits ``[2j, 2j+2)`` of byte ``i``; 3-bit codes straddle bytes. A row whose ``K*b`` is not a multiple of 8
is zero-padded to a whole byte, so ``unpack_*`` needs K back.

Signed codes are stored as b-bit two's complement (int8 in ``[-2^(b-1), 2^(b-1) - 1]``, e.g. [-8, 7] for int4)
and sign-extended on unpack; unsigned codes are uint8 in ``[0, 2^b - 1]`` (e.g. [0, 15]). ``pack_int4`` equals
``pack_bits(q, 4)`` and is the fast path for the common case.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "pack_int4", "packed_size", "unpack_bits", "unpack_int4"]


def packed_size(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes of ``bits`` bits: ``ceil(k * bits / 8)``."""
    return (k * bits + 7) // 8


def _check_codes(q: Tensor, bits: int, check: bool) -> bool:
    """Validate dtype and (optionally) range; return whether the codes are signed."""
    if not isinstance(q, Tensor) or q.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"codes must be an int8 (signed) or uint8 (unsigned) tensor, got {getattr(q, 'dtype', q)}")
    if q.ndim == 0:
        raise ValueError("codes must be at least 1-D: packing runs along the last dim")
    signed = q.dtype == torch.int8
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if check and q.numel():
        qmin, qmax = (int(v) for v in torch.aminmax(q))  # a device sync on CUDA; pass check=False to skip
        if qmin < lo or qmax > hi:
            raise ValueError(
                f"{'signed' if signed else 'unsigned'} {bits}-bit codes must lie in [{lo}, {hi}], "
                f"got values in [{qmin}, {qmax}] (dtype {q.dtype})"
            )
    return signed


def _check_packed(packed: Tensor, k: int, bits: int) -> None:
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', packed)}")
    if packed.ndim == 0:
        raise ValueError("packed must be at least 1-D")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"K must be a non-negative int, got {k!r}")
    if packed.shape[-1] != packed_size(k, bits):
        raise ValueError(
            f"packed last dim is {packed.shape[-1]} bytes, but K={k} codes of {bits} bits need {packed_size(k, bits)}"
        )


def pack_int4(q: Tensor, check: bool = True) -> Tensor:
    """Pack 4-bit codes two per byte along the last dim: low nibble = even index, high nibble = odd index.

    Args:
        q: [..., K] int8 with values in [-8, 7] (two's complement nibbles) or uint8 in [0, 15]. Odd K is padded
            with a zero code.
        check: verify the value range (one device sync on CUDA).

    Returns:
        packed: [..., ceil(K/2)] uint8.

    Raises:
        ValueError: on a wrong dtype, a 0-D tensor or (with ``check``) values out of range.
    """
    _check_codes(q, 4, check)
    u = q.view(torch.uint8) & 0x0F  # two's complement nibble for int8; no-op for valid uint8
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, k: int, signed: bool) -> Tensor:
    """Inverse of ``pack_int4``.

    Args:
        packed: [..., ceil(K/2)] uint8.
        k: number of codes per row (K); needed because odd K was padded.
        signed: True -> int8 codes in [-8, 7] (sign-extended); False -> uint8 codes in [0, 15].

    Returns:
        q: [..., K] int8 (signed) or uint8 (unsigned).
    """
    _check_packed(packed, k, 4)
    lo, hi = packed & 0x0F, packed >> 4
    u = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    if not signed:
        return u.contiguous()
    return (u.view(torch.int8) << 4) >> 4  # arithmetic shift sign-extends the nibble


def _bit_weights(device: torch.device) -> Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(q: Tensor, bits: int, check: bool = True) -> Tensor:
    """Pack ``bits``-bit codes (1..8) densely along the last dim (bit order in the module docstring).

    Expands to one byte per bit internally: memory ~ ``8 * q.numel()`` bytes, meant for offline packing.

    Args:
        q: [..., K] int8 in [-2^(bits-1), 2^(bits-1) - 1] or uint8 in [0, 2^bits - 1].
        bits: code width, 1..8.
        check: verify the value range (one device sync on CUDA).

    Returns:
        packed: [..., ceil(K * bits / 8)] uint8.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    _check_codes(q, bits, check)
    k = q.shape[-1]
    u = q.view(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=q.device)
    stream = ((u.unsqueeze(-1) >> shifts) & 1).reshape(*q.shape[:-1], k * bits)  # [..., K*b] bits, LSB first
    pad = packed_size(k, bits) * 8 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*q.shape[:-1], -1, 8)
    # sum of distinct powers of two < 256: exact in uint8 (sum promotes to int64, cast back).
    return (stream * _bit_weights(q.device)).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, k: int, signed: bool) -> Tensor:
    """Inverse of ``pack_bits``.

    Args:
        packed: [..., ceil(K * bits / 8)] uint8.
        bits: code width, 1..8.
        k: codes per row (K).
        signed: True -> int8, sign-extended from ``bits`` bits; False -> uint8.

    Returns:
        q: [..., K] int8 (signed) or uint8 (unsigned).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    _check_packed(packed, k, bits)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., : k * bits]
    stream = stream.reshape(*packed.shape[:-1], k, bits)
    u = (stream * _bit_weights(packed.device)[:bits]).sum(dim=-1).to(torch.uint8)
    if not signed:
        return u
    return (u.view(torch.int8) << (8 - bits)) >> (8 - bits)
