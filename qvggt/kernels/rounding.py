"""Triton helpers that round float32 values onto the int8 / fp8 e4m3 grids exactly as torch does.

Shared by every kernel that writes quantized codes (``layernorm_quant``, the GEMM epilogue), so all of them agree
with ``qvggt.quant.quantizer`` bit for bit:

    * int8 rounds half to even like ``torch.round`` with the fp32 "magic number" trick
      ``(y + 1.5 * 2^23) - 1.5 * 2^23``, exact for |y| < 2^22 (here |y| <= 127 after the clamp): the addition
      leaves no fraction bits, so the fp32 adder's own round-to-nearest-even does the rounding. libdevice ``rint``
      would do the same on GPU but does not exist in the interpreter.
    * fp8 rounds to the e4m3 grid in fp32 with the same trick at the value's e4m3 ulp
      (``2^(max(exponent, -6) - 3)``), so the final ``.to(tl.float8e4nv)`` only converts exactly representable
      values. That makes GPU and interpreter agree (the interpreter's fp8 cast rounds half away from zero, not to
      even) and matches torch's round-to-nearest-even ``float8_e4m3fn`` cast.

Importing this module requires triton; kernel modules import it only behind ``has_triton()``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to_fp8_grid", "round_to_int_grid"]


@triton.jit
def round_to_int_grid(v):
    """Round fp32 ``v`` (already clamped to |v| < 2^22) half to even; returns fp32 integers."""
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2^23


@triton.jit
def round_to_fp8_grid(v):
    """Round fp32 ``v`` (already clamped to [-448, 448]) to the nearest e4m3 value, ties to even; returns fp32."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # -6: smallest normal exponent; below it the subnormal ulp 2^-9
    c = ((e - 3 + 23 + 127) << 23) | 0x400000  # 1.5 * 2^23 * ulp
    c = c.to(tl.float32, bitcast=True)
    r = (a + c) - c
    return tl.where(v < 0, -r, r)
