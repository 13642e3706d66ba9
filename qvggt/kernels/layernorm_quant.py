"""Fused LayerNorm -> dynamic per-token quantization (int8 or fp8 e4m3) in one Triton kernel.

Reads each row of ``x`` once and writes 1-byte codes plus one float32 scale per row, instead of LayerNorm writing
a float32 activation that a separate quantization kernel reads back (the two-kernel recipe measured slower than
bf16 on Hopper). Twins: ``qvggt.kernels.reference.layernorm_quant_ref`` / ``token_quant_ref``.

Shape legend:
    M        rows (tokens), one program each
    K        row width (channels), K <= ``MAX_K``; held in one block of ``BLOCK_K = next_power_of_2(K)`` lanes,
             lanes >= K masked
    q        [M, K] int8 (codes in [-127, 127]) or float8_e4m3fn (values in [-448, 448])
    scale    [M, 1] float32, ``x_norm ~= q * scale``

Bit-exactness with the twin (given the same normalized row; LayerNorm itself differs from ``F.layer_norm`` by a
few ulps because the reductions sum in a different order):
    * scale and ``x_norm / scale`` use IEEE round-to-nearest division (``tl.math.div_rn``), as torch does;
      Triton's plain ``/`` on GPU is an approximate division.
    * int8 rounds half to even like ``torch.round`` with the fp32 "magic number" trick
      ``(y + 1.5 * 2^23) - 1.5 * 2^23``, exact for |y| < 2^22 (here |y| <= 127 after the clamp): the addition
      leaves no fraction bits, so the fp32 adder's own round-to-nearest-even does the rounding. libdevice ``rint``
      would do the same on GPU but does not exist in the interpreter.
    * fp8 rounds to the e4m3 grid in fp32 with the same trick at the value's e4m3 ulp
      (``2^(max(exponent, -6) - 3)``), so the final ``.to(tl.float8e4nv)`` only converts exactly representable
      values. That makes GPU and interpreter agree (the interpreter's fp8 cast rounds half away from zero, not to
      even) and matches torch's round-to-nearest-even ``float8_e4m3fn`` cast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qvggt.kernels import has_triton
from qvggt.kernels.reference import TokenQuantFormat, layernorm_quant_ref, token_format, token_quant_ref

__all__ = ["FALLBACK_CALLS", "KERNEL_CALLS", "MAX_K", "kernel_is_interpreted", "layernorm_quant", "token_quant"]

MAX_K = 8192  # one row in registers; wider rows would need a looped two-pass kernel (not needed: VGGT K <= 4096)

# Which path each launcher took, by launcher name: proof for engines/tests that the kernel (not the twin) ran.
KERNEL_CALLS: dict[str, int] = {"layernorm_quant": 0, "token_quant": 0}
FALLBACK_CALLS: dict[str, int] = {"layernorm_quant": 0, "token_quant": 0}

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TINY = torch.finfo(torch.float32).tiny

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _layernorm_quant_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        q_ptr,
        scale_ptr,
        stride_xm,
        stride_qm,
        K,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        APPLY_NORM: tl.constexpr,
        IS_FP8: tl.constexpr,
        QMAX: tl.constexpr,
        TINY: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One program per row m: ``q[m, :], scale[m] = quant(layer_norm(x[m, :]))``.

        Contract: x [M, K] (fp32/bf16/fp16, unit stride along K, row stride ``stride_xm``); w, b [K] contiguous
        (read only if HAS_W / HAS_B); q [M, K] int8 or fp8e4nv with row stride ``stride_qm``; scale [M] float32;
        BLOCK_K a power of two >= K. APPLY_NORM=False skips the LayerNorm (plain per-token quantization).
        """
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        if APPLY_NORM:
            mean = tl.sum(x, axis=0) / K
            diff = tl.where(mask, x - mean, 0.0)  # padded lanes must not enter the variance
            var = tl.sum(diff * diff, axis=0) / K
            rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
            y = diff * rstd
            if HAS_W:
                y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            y = x
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, QMAX), TINY)
        v = tl.math.div_rn(y, scale)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)  # saturate first; rounding commutes with integer/448 bounds
        if IS_FP8:
            # Round |v| to the e4m3 grid: ulp = 2^(max(e, -6) - 3) (-6: smallest normal exponent, below it the
            # subnormal ulp 2^-9); adding c = 1.5 * 2^23 * ulp leaves no bits below ulp, the fp32 add rounds to even.
            a = tl.abs(v)
            e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            e = tl.maximum(e, -6)
            c = ((e - 3 + 23 + 127) << 23) | 0x400000
            c = c.to(tl.float32, bitcast=True)
            r = (a + c) - c
            r = tl.where(v < 0, -r, r)
            tl.store(q_ptr + row * stride_qm + offs, r.to(tl.float8e4nv), mask=mask)
        else:
            r = (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: round half to even, exact for |v| < 2^22
            tl.store(q_ptr + row * stride_qm + offs, r.to(tl.int8), mask=mask)
        tl.store(scale_ptr + row, scale)


def kernel_is_interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter.

    Needs ``TRITON_INTERPRET=1`` both when triton was first imported (its ``tl.sum`` & co. are jit functions too)
    and when this module was imported; a mix (kernel interpreted, triton compiled) cannot run and counts as False.
    """
    if not has_triton():
        return False
    return all(type(f).__name__ == "InterpretedFunction" for f in (_layernorm_quant_kernel, tl.sum))


def _check_inputs(x: Any, weight: Any, bias: Any, fmt: str) -> int:
    """Validate the launcher arguments; returns K."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten leading dims first), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    m, k = x.shape
    if m == 0 or k == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous (strides {x.stride()} for shape {tuple(x.shape)}); call .contiguous()")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor or None, got {getattr(t, 'dtype', type(t))}")
        if t.shape != (k,):
            raise ValueError(f"{name} must have shape [K] = [{k}] to match x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    token_format(fmt)  # raises on an unknown fmt
    return k


def _use_kernel(x: Tensor, k: int) -> bool:
    return has_triton() and k <= MAX_K and (x.is_cuda or kernel_is_interpreted())


def _launch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, fmt: str, apply_norm: bool
) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    qf = token_format(fmt)
    q = torch.empty((m, k), dtype=qf.storage_dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    w = weight.contiguous() if weight is not None else x  # dummy pointer, never read (HAS_W=False)
    b = bias.contiguous() if bias is not None else x
    block_k = triton.next_power_of_2(k)
    _layernorm_quant_kernel[(m,)](
        x,
        w,
        b,
        q,
        scale,
        x.stride(0),
        q.stride(0),
        k,
        float(eps),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        APPLY_NORM=apply_norm,
        IS_FP8=qf.is_float,
        QMAX=float(qf.qmax),
        TINY=_TINY,
        BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8,
    )
    return q, scale


def layernorm_quant(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    fmt: TokenQuantFormat = "int8",
) -> tuple[Tensor, Tensor]:
    """Fused ``LayerNorm(x)`` (float32 math) followed by dynamic symmetric per-token quantization.

    Runs the Triton kernel for CUDA tensors and under the Triton interpreter; otherwise (CPU without
    ``TRITON_INTERPRET=1``, no triton, K > ``MAX_K``) runs the torch twin. ``KERNEL_CALLS["layernorm_quant"]`` or
    ``FALLBACK_CALLS["layernorm_quant"]`` counts which one ran.

    Args:
        x: [M, K] float32, bfloat16 or float16, contiguous.
        weight, bias: [K] LayerNorm affine (any float dtype, read as float32), or None.
        eps: LayerNorm epsilon (VGGT uses 1e-6 in its blocks).
        fmt: "int8" (codes in [-127, 127]) or "fp8_e4m3" (values in [-448, 448]).

    Returns:
        q: [M, K] int8 or float8_e4m3fn; scale: [M, 1] float32; ``q.float() * scale ~= layer_norm(x)``.

    Raises:
        TypeError / ValueError: on a non-tensor, non-2-D, empty, non-contiguous or non-float x, a weight or bias
            not of shape [K] or on another device, or an unknown fmt.
    """
    k = _check_inputs(x, weight, bias, fmt)
    if not _use_kernel(x, k):
        FALLBACK_CALLS["layernorm_quant"] += 1
        return layernorm_quant_ref(x, weight, bias, eps, fmt)
    KERNEL_CALLS["layernorm_quant"] += 1
    return _launch(x, weight, bias, eps, fmt, apply_norm=True)


def token_quant(x: Tensor, fmt: TokenQuantFormat = "int8") -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization of x [M, K] (the same kernel without the LayerNorm).

    Same paths, counters (key ``"token_quant"``), arguments and returns as ``layernorm_quant``; twin
    ``token_quant_ref``. Bit-exact with the twin, so it also pins down the quantization half of ``layernorm_quant``.
    """
    k = _check_inputs(x, None, None, fmt)
    if not _use_kernel(x, k):
        FALLBACK_CALLS["token_quant"] += 1
        return token_quant_ref(x, fmt)
    KERNEL_CALLS["token_quant"] += 1
    return _launch(x, None, None, 0.0, fmt, apply_norm=False)
