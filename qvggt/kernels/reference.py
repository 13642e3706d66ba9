"""Pure-torch twins of the Triton kernels in ``qvggt.kernels``: the specification each kernel is tested against.

Every twin reuses ``qvggt.quant.quantizer`` so kernels inherit exactly the project's quantization semantics:
symmetric int8 on the restricted range [-127, 127] with round half to even, fp8 e4m3 saturated to +-448 before
the cast to ``torch.float8_e4m3fn``, per-token scale ``absmax / qmax`` floored at ``finfo(float32).tiny``.

Special-token rows (``special_period`` P, ``special_count`` c): row r of the flattened [M, K] activation is special
iff ``r % P < c`` (VGGT's camera + register tokens: c = 5 at the start of each frame's P tokens, in frame and global
blocks alike). With the "int4" format those rows are quantized on the int8 grid (qmax 127) with their own per-token
scales, into the same int8 codes tensor; the "int8" and "fp8_e4m3" formats ignore them (already 8-bit).

Shape legend:
    M  rows (tokens; VGGT's [B, S, P, C] activations flattened to [B*S*P, C])
    K  row width (channels; 1024 for VGGT-1B, 64/128 for the tiny presets)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qvggt.quant.formats import QuantFormat
from qvggt.quant.hadamard import block_hadamard_transform
from qvggt.quant.quantizer import compute_scales, quantize
from qvggt.quant.special_tokens import special_row_mask as quant_row_mask

__all__ = [
    "SPECIAL_ROW_FORMAT",
    "TokenQuantFormat",
    "check_special_rows",
    "dequant_ref",
    "layernorm_quant_ref",
    "qk_norm_rope_ref",
    "rope_inv_freq",
    "scaled_gemm_ref",
    "special_row_mask",
    "token_format",
    "token_quant_ref",
]

TokenQuantFormat = Literal["int8", "fp8_e4m3", "int4"]
# name -> (kind, bits). "int4" codes live in int8 storage ([-7, 7]): Hopper has no int4 tensor cores, so W4A4
# activations are quantized to the 4-bit grid and multiplied on the int8 units.
_KINDS = {"int8": ("int", 8), "fp8_e4m3": ("fp8_e4m3", 8), "int4": ("int", 4)}
# Format of the special-token rows, per row format: only the int4 grid has a finer grid in the same int8 codes.
SPECIAL_ROW_FORMAT: dict[str, str] = {"int4": "int8"}


def token_format(fmt: str) -> QuantFormat:
    """The per-token symmetric ``QuantFormat`` named by ``fmt`` ("int8", "fp8_e4m3" or "int4")."""
    if fmt not in _KINDS:
        raise ValueError(f"fmt={fmt!r} is not supported: expected one of {sorted(_KINDS)}")
    kind, bits = _KINDS[fmt]
    return QuantFormat(kind=kind, bits=bits, symmetric=True, granularity="token")


def check_special_rows(period: Any, count: Any, what: str = "special") -> tuple[int, int]:
    """Validate special-token row arguments: ints (not bools) with ``0 <= count <= period``; returns them.

    ``period = 0`` (tokens per frame unknown) therefore needs ``count = 0``: a layer with special rows and no
    period is an error, never silently quantized as patch rows. ``what`` prefixes the argument names in messages.
    """
    for name, v in ((f"{what}_period", period), (f"{what}_count", count)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if count > period:
        raise ValueError(
            f"{what}_count={count} exceeds {what}_period={period}: rows r with r % period < count are special, so "
            "count must be <= period (period = tokens per frame; 0 with count 0: no special rows)"
        )
    return period, count


def special_row_mask(rows: int, period: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """Bool [rows]: True for the special rows ``r % period < count`` (all False when period or count is 0)."""
    period, count = check_special_rows(period, count)
    if not (period and count):
        return torch.zeros(rows, dtype=torch.bool, device=device)
    return quant_row_mask(rows, period, count, device)  # the one row rule, shared with QuantLinear


def _special_rows(rows: int, period: int, count: int, fmt: str, device: torch.device) -> Tensor | None:
    """The special-row mask where it changes anything (``fmt`` has a special-row format, period and count > 0)."""
    period, count = check_special_rows(period, count)
    if not (period and count) or fmt not in SPECIAL_ROW_FORMAT:
        return None
    return special_row_mask(rows, period, count, device)


def _quant_rows(x32: Tensor, fmt: TokenQuantFormat, special: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-row quantization of x32 [R, K] with ``fmt``; rows flagged in ``special`` [R] with the format's special-row
    format (``SPECIAL_ROW_FORMAT``), if it has one. Rows are independent, so each row's codes and scale are exactly
    those of ``compute_scales`` / ``quantize`` on that row alone."""
    qf = token_format(fmt)
    scale, _ = compute_scales(x32, qf)
    q = quantize(x32, qf, scale)
    if special is not None and bool(special.any()):
        sf = token_format(SPECIAL_ROW_FORMAT[fmt])
        rows = x32[special]
        s_scale, _ = compute_scales(rows, sf)
        q[special] = quantize(rows, sf, s_scale)
        scale[special] = s_scale
    return q, scale


def token_quant_ref(
    x: Tensor, fmt: TokenQuantFormat, hadamard: int = 0, special_period: int = 0, special_count: int = 0
) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization of ``x`` [M, K]: twin of ``token_quant`` (no normalization).

    ``hadamard=b`` (b a power of two dividing K) first rotates each block of b channels by the orthonormal
    Hadamard in float32 (``block_hadamard_transform``, as ``QuantLinear.input_hadamard`` does).
    ``special_period`` / ``special_count``: rows ``r % period < count`` of an "int4" x are quantized on the int8
    grid (module docstring); other formats ignore them.

    Returns:
        q: [M, K] int8 codes in [-127, 127] ([-7, 7] for "int4" rows that are not special) or float8_e4m3fn values
            in [-448, 448].
        scale: [M, 1] float32, ``max(absmax(row) / qmax, finfo(float32).tiny)``; ``x ~= q * scale``.
    """
    x32 = x.float()
    special = _special_rows(x.shape[0], special_period, special_count, fmt, x.device)
    if hadamard:
        x32 = block_hadamard_transform(x32, hadamard)
    return _quant_rows(x32, fmt, special)


def layernorm_quant_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fmt: TokenQuantFormat,
    hadamard: int = 0,
    special_period: int = 0,
    special_count: int = 0,
) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim (in float32), an optional block Hadamard, then dynamic per-token quantization:
    twin of ``layernorm_quant``.

    Args:
        x: [M, K] float32, bfloat16 or float16.
        weight, bias: [K] LayerNorm affine (any float dtype, used in float32), or None.
        eps: LayerNorm epsilon.
        fmt: "int8", "fp8_e4m3" or "int4".
        hadamard: 0, or the block b of the online rotation (``block_hadamard_transform(y, b)`` in float32).
        special_period, special_count: special-token rows (int8 grid for "int4"; see ``token_quant_ref``).

    Returns:
        q: [M, K] int8 or float8_e4m3fn; scale: [M, 1] float32. ``dequant_ref(q, scale)`` equals
        ``fake_quantize(block_hadamard_transform(F.layer_norm(x.float(), ...), b), QuantFormat(kind, 8, True,
        "token"))`` bit for bit: what ``QuantLinear`` with ``input_hadamard = b`` computes on a LayerNorm output.
    """
    k = x.shape[-1]
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (k,), w, b, eps)
    return token_quant_ref(y, fmt, hadamard, special_period, special_count)


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
    out_special_period: int = 0,
    out_special_count: int = 0,
    w_int4_k: int | None = None,
    block_k: int = 128,
    block_n: int = 128,
) -> Tensor | tuple[Tensor, Tensor]:
    """Twin of ``qvggt.kernels.gemm.scaled_gemm`` (same arguments; ``block_k`` / ``block_n`` are the kernel's
    K-group and output-tile widths): dequantize both operands in float32, multiply, apply the epilogue in float32.

    With ``out_quant`` the output is quantized per row and per ``block_n`` columns, as the kernel does; with
    ``out_quant="int4"``, every tile of a special row (``r % out_special_period < out_special_count``) on the int8
    grid.
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
    special = _special_rows(m, out_special_period, out_special_count, out_quant, y.device)
    q, scale = _quant_rows(padded, out_quant, None if special is None else special.repeat_interleave(tiles))
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
