"""Fused LayerNorm -> (block Hadamard) -> dynamic per-token quantization (int8, fp8 e4m3, int4 grid) in one kernel.

Reads each row of ``x`` once and writes 1-byte codes plus one float32 scale per row, instead of LayerNorm writing
a float32 activation that a separate quantization kernel reads back (the two-kernel recipe measured slower than
bf16 on Hopper). Twins: ``qvggt.kernels.reference.layernorm_quant_ref`` / ``token_quant_ref``.

Optional rotation stage (``hadamard=b``): between the LayerNorm and the quantization, each consecutive block of b
channels of the normalized row is multiplied by the orthonormal Sylvester Hadamard H_b / sqrt(b), exactly what
``QuantLinear.input_hadamard = b`` does before quantizing (``qvggt.quant.hadamard.block_hadamard_transform``;
quarot, and quantvggt's ``norm_input_rotation``, put it on qkv's and fc1's LayerNorm outputs). It runs as a fast
Walsh-Hadamard transform on the row in registers: log2(b) butterfly stages (a, b) -> (a + b, a - b) over lanes i
and i + h (h = 1, 2, ..., b / 2), the same stages in the same order as the twin's ``_fwht_last``, then one IEEE
division by float32(sqrt(b)): the rotated row is bit-identical to the twin's. Each stage regroups the row as
[BLOCK_K / 2h, 2, h] and splits the size-2 axis (``tl.split`` / ``tl.join``): no gathers, no matrix in memory.

Special-token rows (``special_period`` P, ``special_count`` c; VGGT's camera + register tokens): row r is special
iff ``r % P < c``, r the program's row of the flattened [M, K] input. With ``fmt="int4"`` a special row is quantized
on the int8 grid (qmax 127 instead of 7) into the same int8 codes tensor, with its own scale: the GEMM that reads
the codes is unchanged. P and c are runtime arguments (never specialised: a new image size does not recompile);
only "special rows on or off" is a compile-time flag. "int8" and "fp8_e4m3" ignore them (already 8-bit).

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

import math
from typing import Any

import torch
from torch import Tensor

from qvggt.kernels import check_fallback_allowed, has_triton
from qvggt.kernels.reference import (
    SPECIAL_ROW_FORMAT,
    TokenQuantFormat,
    check_special_rows,
    layernorm_quant_ref,
    token_format,
    token_quant_ref,
)

__all__ = [
    "FALLBACK_CALLS",
    "KERNEL_CALLS",
    "MAX_K",
    "check_hadamard_block",
    "kernel_is_interpreted",
    "layernorm_quant",
    "token_quant",
]

MAX_K = 8192  # one row in registers; wider rows would need a looped two-pass kernel (not needed: VGGT K <= 4096)

# Which path each launcher took, by launcher name: proof for engines/tests that the kernel (not the twin) ran.
# Calls with a rotation stage count under their own "..._hadamard_..." names, so a test can see that stage ran.
_NAMES = ("layernorm_quant", "token_quant", "layernorm_hadamard_quant", "token_hadamard_quant")
KERNEL_CALLS: dict[str, int] = dict.fromkeys(_NAMES, 0)
FALLBACK_CALLS: dict[str, int] = dict.fromkeys(_NAMES, 0)

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TINY = torch.finfo(torch.float32).tiny

if has_triton():
    import triton
    import triton.language as tl

    from qvggt.kernels.rounding import round_to_fp8_grid, round_to_int_grid

    @triton.jit
    def _fwht_blocks(y, BLOCK_K: tl.constexpr, LOG2_HAD: tl.constexpr):
        """Unnormalised FWHT of each 2^LOG2_HAD-lane block of the row y [BLOCK_K] (float32): y -> y @ H.

        Stage s pairs lanes i and i + 2^s (bit s of i clear) as (a, b) -> (a + b, a - b), s = 0, 1, ...: the twin's
        stage order, so every float32 sum is the same. Blocks are aligned, so no pair crosses a block boundary.
        """
        for s in tl.static_range(LOG2_HAD):
            pairs = tl.permute(tl.reshape(y, (BLOCK_K >> (s + 1), 2, 1 << s)), (0, 2, 1))  # [.., h, 2]: (a, b)
            a, b = tl.split(pairs)
            y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_K,))
        return y

    # Special-row arguments are plain runtime ints: no specialisation on their values (e.g. == 1, % 16), so every
    # image size (P) reuses one compiled kernel.
    @triton.jit(do_not_specialize=["special_period", "special_count"])
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
        special_period,
        special_count,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        APPLY_NORM: tl.constexpr,
        LOG2_HAD: tl.constexpr,  # 0: no rotation; else rotate blocks of 2^LOG2_HAD channels
        HAD_NORM: tl.constexpr,  # sqrt(2^LOG2_HAD), rounded to float32 when it meets the row
        IS_FP8: tl.constexpr,
        QMAX: tl.constexpr,
        SPECIAL: tl.constexpr,  # rows m % special_period < special_count use SPECIAL_QMAX (special_period > 0)
        SPECIAL_QMAX: tl.constexpr,
        TINY: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One program per row m: ``q[m, :], scale[m] = quant(layer_norm(x[m, :]))``.

        Contract: x [M, K] (fp32/bf16/fp16, unit stride along K, row stride ``stride_xm``); w, b [K] contiguous
        (read only if HAS_W / HAS_B); q [M, K] int8 or fp8e4nv with row stride ``stride_qm``; scale [M] float32;
        BLOCK_K a power of two >= K. APPLY_NORM=False skips the LayerNorm (plain per-token quantization).
        LOG2_HAD > 0 rotates each block of 2^LOG2_HAD channels (a power of two dividing K) by the orthonormal
        Hadamard before quantizing; padded lanes >= K hold zeros and form whole blocks of their own.
        SPECIAL: row m is quantized with SPECIAL_QMAX instead of QMAX when m % special_period < special_count.
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
        if LOG2_HAD > 0:
            y = tl.math.div_rn(_fwht_blocks(y, BLOCK_K, LOG2_HAD), HAD_NORM)
        if SPECIAL:  # a camera/register token: the finer grid, chosen per row at run time
            qmax = tl.where(row % special_period < special_count, SPECIAL_QMAX, QMAX)
        else:
            qmax = QMAX
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, qmax), TINY)
        v = tl.math.div_rn(y, scale)
        v = tl.minimum(tl.maximum(v, -qmax), qmax)  # saturate first; rounding commutes with integer/448 bounds
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


def check_hadamard_block(hadamard: Any, k: int) -> int:
    """Validate a rotation block for rows of width ``k``: 0 (none) or a power of two >= 2 dividing k; returns it."""
    if isinstance(hadamard, bool) or not isinstance(hadamard, int):
        raise TypeError(f"hadamard must be an int block size (0: no rotation), got {hadamard!r}")
    if hadamard and (hadamard < 2 or hadamard & (hadamard - 1) or k % hadamard):
        raise ValueError(
            f"hadamard={hadamard}: the rotation block must be a power of two >= 2 dividing the row width K={k} "
            "(0 for no rotation)"
        )
    return hadamard


def _check_inputs(
    x: Any, weight: Any, bias: Any, fmt: str, hadamard: Any = 0, special_period: Any = 0, special_count: Any = 0
) -> int:
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
    check_hadamard_block(hadamard, k)
    check_special_rows(special_period, special_count)
    return k


def _use_kernel(x: Tensor, k: int) -> bool:
    return has_triton() and k <= MAX_K and (x.is_cuda or kernel_is_interpreted())


def _launch(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fmt: str,
    apply_norm: bool,
    hadamard: int,
    special: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    qf = token_format(fmt)
    period, count = special
    has_special = fmt in SPECIAL_ROW_FORMAT and period > 0 and count > 0
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
        period,
        count,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        APPLY_NORM=apply_norm,
        LOG2_HAD=hadamard.bit_length() - 1 if hadamard else 0,
        HAD_NORM=math.sqrt(hadamard) if hadamard else 1.0,
        IS_FP8=qf.is_float,
        QMAX=float(qf.qmax),
        SPECIAL=has_special,
        SPECIAL_QMAX=float(token_format(SPECIAL_ROW_FORMAT.get(fmt, fmt)).qmax),
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
    hadamard: int = 0,
    special_period: int = 0,
    special_count: int = 0,
) -> tuple[Tensor, Tensor]:
    """Fused ``LayerNorm(x)`` (float32 math), optional block Hadamard, then dynamic symmetric per-token quantization.

    Runs the Triton kernel for CUDA tensors and under the Triton interpreter; otherwise (CPU without
    ``TRITON_INTERPRET=1``, no triton, K > ``MAX_K``) runs the torch twin. ``KERNEL_CALLS[name]`` or
    ``FALLBACK_CALLS[name]`` counts which one ran, name = "layernorm_quant" (or "layernorm_hadamard_quant" with a
    rotation).

    Args:
        x: [M, K] float32, bfloat16 or float16, contiguous.
        weight, bias: [K] LayerNorm affine (any float dtype, read as float32), or None.
        eps: LayerNorm epsilon (VGGT uses 1e-6 in its blocks).
        fmt: "int8" (codes in [-127, 127]), "fp8_e4m3" (values in [-448, 448]) or "int4" (codes in [-7, 7],
            int8 storage).
        hadamard: 0, or b: rotate each block of b channels of the normalized row by H_b / sqrt(b) before
            quantizing (``QuantLinear.input_hadamard``); b a power of two >= 2 dividing K.
        special_period, special_count: ints with 0 <= count <= period; rows m with m % period < count are
            special-token rows, quantized on the int8 grid when fmt is "int4" (module docstring). 0, 0: none.

    Returns:
        q: [M, K] int8 or float8_e4m3fn; scale: [M, 1] float32;
        ``q.float() * scale ~= block_hadamard_transform(layer_norm(x), b)`` (or ``layer_norm(x)`` without b).

    Raises:
        TypeError / ValueError: on a non-tensor, non-2-D, empty, non-contiguous or non-float x, a weight or bias
            not of shape [K] or on another device, an unknown fmt, a rotation block that does not fit K, or
            special-row arguments that are not ints with 0 <= count <= period.
    """
    k = _check_inputs(x, weight, bias, fmt, hadamard, special_period, special_count)
    name = "layernorm_hadamard_quant" if hadamard else "layernorm_quant"
    if not _use_kernel(x, k):
        check_fallback_allowed(name, x)
        FALLBACK_CALLS[name] += 1
        return layernorm_quant_ref(x, weight, bias, eps, fmt, hadamard, special_period, special_count)
    KERNEL_CALLS[name] += 1
    return _launch(x, weight, bias, eps, fmt, True, hadamard, (special_period, special_count))


def token_quant(
    x: Tensor, fmt: TokenQuantFormat = "int8", hadamard: int = 0, special_period: int = 0, special_count: int = 0
) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization of x [M, K] (the same kernel without the LayerNorm), after an
    optional block Hadamard of ``hadamard`` channels (the online input rotation of proj or fc2), with the same
    special-token rows.

    Same paths, counters (key ``"token_quant"``, or ``"token_hadamard_quant"`` with a rotation), arguments and
    returns as ``layernorm_quant``; twin ``token_quant_ref``. Bit-exact with the twin, so it also pins down the
    rotation and quantization stages of ``layernorm_quant``.
    """
    k = _check_inputs(x, None, None, fmt, hadamard, special_period, special_count)
    name = "token_hadamard_quant" if hadamard else "token_quant"
    if not _use_kernel(x, k):
        check_fallback_allowed(name, x)
        FALLBACK_CALLS[name] += 1
        return token_quant_ref(x, fmt, hadamard, special_period, special_count)
    KERNEL_CALLS[name] += 1
    return _launch(x, None, None, 0.0, fmt, False, hadamard, (special_period, special_count))
