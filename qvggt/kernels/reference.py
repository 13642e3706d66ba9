"""Pure-torch twins of the Triton kernels in ``qvggt.kernels``: the specification each kernel is tested against.

Every twin reuses ``qvggt.quant.quantizer`` so kernels inherit exactly the project's quantization semantics:
symmetric int8 on the restricted range [-127, 127] with round half to even, fp8 e4m3 saturated to +-448 before
the cast to ``torch.float8_e4m3fn``, per-token scale ``absmax / qmax`` floored at ``finfo(float32).tiny``.

Shape legend:
    M  rows (tokens; VGGT's [B, S, P, C] activations flattened to [B*S*P, C])
    K  row width (channels; 1024 for VGGT-1B, 64/128 for the tiny presets)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qvggt.quant.formats import QuantFormat
from qvggt.quant.hadamard import block_hadamard_transform
from qvggt.quant.quantizer import compute_scales, quantize

__all__ = [
    "TokenQuantFormat",
    "dequant_ref",
    "layernorm_quant_ref",
    "qk_norm_rope_ref",
    "rope_inv_freq",
    "scaled_gemm_ref",
    "token_format",
    "token_quant_ref",
]

TokenQuantFormat = Literal["int8", "fp8_e4m3", "int4"]
# name -> (kind, bits). "int4" codes live in int8 storage ([-7, 7]): Hopper has no int4 tensor cores, so W4A4
# activations are quantized to the 4-bit grid and multiplied on the int8 units.
_KINDS = {"int8": ("int", 8), "fp8_e4m3": ("fp8_e4m3", 8), "int4": ("int", 4)}


def token_format(fmt: str) -> QuantFormat:
    """The per-token symmetric ``QuantFormat`` named by ``fmt`` ("int8", "fp8_e4m3" or "int4")."""
    if fmt not in _KINDS:
        raise ValueError(f"fmt={fmt!r} is not supported: expected one of {sorted(_KINDS)}")
    kind, bits = _KINDS[fmt]
    return QuantFormat(kind=kind, bits=bits, symmetric=True, granularity="token")


def token_quant_ref(x: Tensor, fmt: TokenQuantFormat, hadamard: int = 0) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization of ``x`` [M, K]: twin of ``token_quant`` (no normalization).

    ``hadamard=b`` (b a power of two dividing K) first rotates each block of b channels by the orthonormal
    Hadamard in float32 (``block_hadamard_transform``, as ``QuantLinear.input_hadamard`` does).

    Returns:
        q: [M, K] int8 codes in [-127, 127] or float8_e4m3fn values in [-448, 448].
        scale: [M, 1] float32, ``max(absmax(row) / qmax, finfo(float32).tiny)``; ``x ~= q * scale``.
    """
    qf = token_format(fmt)
    x32 = x.float()
    if hadamard:
        x32 = block_hadamard_transform(x32, hadamard)
    scale, _ = compute_scales(x32, qf)
    return quantize(x32, qf, scale), scale


def layernorm_quant_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fmt: TokenQuantFormat,
    hadamard: int = 0,
) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim (in float32), an optional block Hadamard, then dynamic per-token quantization:
    twin of ``layernorm_quant``.

    Args:
        x: [M, K] float32, bfloat16 or float16.
        weight, bias: [K] LayerNorm affine (any float dtype, used in float32), or None.
        eps: LayerNorm epsilon.
        fmt: "int8" or "fp8_e4m3".
        hadamard: 0, or the block b of the online rotation (``block_hadamard_transform(y, b)`` in float32).

    Returns:
        q: [M, K] int8 or float8_e4m3fn; scale: [M, 1] float32. ``dequant_ref(q, scale)`` equals
        ``fake_quantize(block_hadamard_transform(F.layer_norm(x.float(), ...), b), QuantFormat(kind, 8, True,
        "token"))`` bit for bit: what ``QuantLinear`` with ``input_hadamard = b`` computes on a LayerNorm output.
    """
    k = x.shape[-1]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (k,), w, b, eps)
    return token_quant_ref(y, fmt, hadamard)


def dequant_ref(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32: q [M, K] (int8 or float8_e4m3fn), scale [M, 1] -> [M, K] float32."""
    return q.float() * scale


def _dequant_groups(codes: Tensor, scale: Tensor | None, block_k: int) -> Tensor:
    """codes [R, K] (any dtype) times scale [R, 1] or [R, K / block_k] -> float32 [R, K]."""
    x = codes.float()
    if scale is None:
        return x
    if scale.shape[1] == 1:
        return x * scale
    return (x.view(x.shape[0], scale.shape[1], block_k) * scale[:, :, None]).reshape(x.shape)


def scaled_gemm_ref(
    a: Tensor,
    w: Tensor,
    *,
    a_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    bias: Tensor | None = None,
    gelu: bool = False,
    gamma: Tensor | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    out_quant: TokenQuantFormat | None = None,
    out_hadamard: bool = False,
    w_int4_k: int | None = None,
    block_k: int = 128,
    block_n: int = 128,
) -> Tensor | tuple[Tensor, Tensor]:
    """Twin of ``qvggt.kernels.gemm.scaled_gemm`` (same arguments; ``block_k`` / ``block_n`` are the kernel's
    K-group and output-tile widths): dequantize both operands in float32, multiply, apply the epilogue in float32.

    With ``out_quant`` the output is quantized per row and per ``block_n`` columns, as the kernel does.
    """
    from qvggt.kernels.gemm import unpack_int4_blocked  # the packing helpers need no triton

    k = a.shape[1]
    if w_int4_k is not None:
        w = unpack_int4_blocked(w, w_int4_k, block_k)
    a32 = _dequant_groups(a, a_scale, block_k)
    w32 = _dequant_groups(w, w_scale, block_k)
    y = a32 @ w32[:, :k].T
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y)
    if gamma is not None:
        y = y * gamma.float()
    if residual is not None:
        y = y + residual.float()
    if out_hadamard:
        y = block_hadamard_transform(y, block_n)
    if out_quant is None:
        return y.to(out_dtype)
    m, n = y.shape
    tiles = -(-n // block_n)
    padded = F.pad(y, (0, tiles * block_n - n)).view(m * tiles, block_n)
    q, scale = token_quant_ref(padded, out_quant)
    return q.view(m, tiles * block_n)[:, :n].contiguous(), scale.view(m, tiles)


def rope_inv_freq(head_dim: int, base: float) -> Tensor:
    """VGGT's 2-D RoPE inverse frequencies ``base^(-k / (d/2))``, k = 0, 2, ..., d/2 - 2: float32 [d/4]."""
    half = head_dim // 2
    return 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float32) / half)


def _rope_half(x: Tensor, pos: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate-half RoPE of x [B, h, N, d/2] by integer positions pos [B, N], angles in float32."""
    angle = pos.float()[:, None, :, None] * inv_freq.repeat(2)  # [B, 1, N, d/2]
    x1, x2 = x.chunk(2, dim=-1)
    return x * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()


def qk_norm_rope_ref(
    qkv: Tensor,
    batch: int,
    heads: int,
    q_norm: tuple[Tensor, Tensor, float] | None,
    k_norm: tuple[Tensor, Tensor, float] | None,
    yx: Tensor | None,
    inv_freq: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of ``qvggt.kernels.qk_rope.qk_norm_rope``: float32 math, outputs [B, h, N, d] in qkv's dtype."""
    t, c3 = qkv.shape
    n, d = t // batch, c3 // (3 * heads)
    q, k, v = qkv.float().view(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    outs = []
    for x, norm in ((q, q_norm), (k, k_norm)):
        if norm is not None:
            w, b, eps = norm
            x = F.layer_norm(x, (d,), w.float(), b.float(), eps)
        if yx is not None:
            y_part, x_part = x.chunk(2, dim=-1)
            x = torch.cat(
                [
                    _rope_half(y_part, yx[..., 0], inv_freq.to(x.device)),
                    _rope_half(x_part, yx[..., 1], inv_freq.to(x.device)),
                ],
                dim=-1,
            )
        outs.append(x.to(qkv.dtype).contiguous())
    return outs[0], outs[1], v.to(qkv.dtype).contiguous()
