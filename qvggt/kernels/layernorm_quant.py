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
    * int8 and fp8 codes are rounded by ``qvggt.kernels.rounding`` (ties to even, as torch), so GPU, interpreter
      and twin agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qvggt.kernels import check_fallback_allowed, has_triton
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

    from qvggt.kernels.rounding import round_to_fp8_grid, round_to_int_grid

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
            tl.store(q_ptr + row * stride_qm + offs, round_to_fp8_grid(v).to(tl.float8e4nv), mask=mask)
        else:
            tl.store(q_ptr + row * stride_qm + offs, round_to_int_grid(v).to(tl.int8), mask=mask)
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
        check_fallback_allowed("layernorm_quant", x)
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
        check_fallback_allowed("token_quant", x)
        FALLBACK_CALLS["token_quant"] += 1
        return token_quant_ref(x, fmt)
    KERNEL_CALLS["token_quant"] += 1
    return _launch(x, None, None, 0.0, fmt, apply_norm=False)
