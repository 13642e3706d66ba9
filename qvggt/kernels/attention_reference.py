"""Pure-torch twin of the fp8 flash-attention kernel (``qvggt.kernels.attention``): its executable specification.

The twin does, in float32 and in the same order, every step whose rounding the kernel's result depends on:

1. **Prep** (``fp8_attention_prep_ref``): optionally rotate q and k by the orthonormal Sylvester Hadamard
   ``H_d / sqrt(d)`` over the head dim (``q H (k H)^T = q k^T``: the rotation spreads an outlier channel over all
   channels, so the per-token / per-block absmax, hence the fp8 step, shrinks); then quantize to fp8 e4m3 with the
   project's symmetric recipe (``token_quant_ref``: ``scale = max(absmax / 448, tiny)``, ``fp8(clamp(x / scale))``):
   q per token, k and v per block of ``block_n`` tokens (one scale for the whole ``block_n x d`` tile, the tile
   the kernel multiplies at once, so it costs one scalar multiply per tile).
2. **Attention**: the kernel's online softmax over key blocks, in the log2 domain. For key block j:
   ``s = (q8 @ k8_j^T) * ((q_scale * sm_scale * log2(e)) * k_scale_j)``, ``m' = max(m, rowmax s)``,
   ``p = exp2(s - (m' - 8))`` (that is, ``256 * exp2(s - m')``), ``l = l * exp2(m - m') + rowsum p``,
   ``P8 = fp8(p)``, ``acc = acc * exp2(m - m') + (P8 @ v8_j) * v_scale_j``; finally ``out = acc / l``.

Why blockwise and not one explicit softmax over the whole row: P is quantized *relative to the running row max*
``m'`` of the blocks seen so far, so the fp8 rounding of an early block differs from what a softmax with the final
max would give. A twin with a single global softmax would differ from the kernel at fp8 precision (~3%), too
loose to catch a bug; this one differs from it only by float32 summation order, exp2 ulps and the rare fp8 code
those flip. ``exact_attention`` is the plain float64 softmax both are judged against.

Fixed P factor 256 = 2^P_SHIFT (not 448): P in [0, 1] maps onto e4m3's normal range [2^-6, 256] just as well
(e4m3 has the same 3 mantissa bits in every binade), and a power of two can be folded into the exponent: the
kernel computes ``exp2(fma(s_raw, coef, 8 - m'))`` with no separate multiply per score, and since l sums the same
scaled p, the factor cancels in ``acc / l`` without ever being divided out.

Shape legend:
    B, H     batch (frames for frame attention, 1 for global attention) and heads
    N, M     query tokens, key/value tokens (self-attention: N = M)
    D        head dim (VGGT: 64)
    NB       key blocks, ``ceil(M / block_n)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qvggt.kernels.reference import token_quant_ref

__all__ = [
    "P_SHIFT",
    "Fp8AttentionInputs",
    "exact_attention",
    "fp8_attention_prep_ref",
    "fp8_attention_ref",
    "hadamard",
]

P_SHIFT = 8.0  # P is quantized as 2^P_SHIFT * softmax probability: [0, 1] -> [0, 256] on e4m3 (see module doc)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Fp8AttentionInputs:
    """Quantized attention operands (logical layout; the kernel stores k and v padded, v transposed).

    q8: [B, H, N, D] float8_e4m3fn; q_scale: [B, H, N] float32 (per token).
    k8, v8: [B, H, M, D] float8_e4m3fn; k_scale, v_scale: [B, H, NB] float32 (per block of ``block_n`` tokens).
    """

    q8: Tensor
    q_scale: Tensor
    k8: Tensor
    k_scale: Tensor
    v8: Tensor
    v_scale: Tensor
    block_n: int


def hadamard(d: int, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal Sylvester Hadamard matrix ``H_d / sqrt(d)``, float32 [d, d], d a power of two.

    Symmetric and its own inverse, so rotating both q and k by it leaves every score ``q . k`` unchanged.
    """
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(torch.float32).to(device)


def _quant_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """fp8-quantize x [B, H, T, D] with one scale per ``block`` consecutive tokens (zero-padded at the end).

    Returns codes [B, H, T, D] float8_e4m3fn and scales [B, H, ceil(T / block)] float32.
    """
    b, h, t, d = x.shape
    nb = -(-t // block)
    padded = torch.zeros(b, h, nb * block, d, dtype=torch.float32, device=x.device)
    padded[:, :, :t] = x.float()  # zero rows never raise an absmax, so padding does not change any scale
    q, s = token_quant_ref(padded.view(b * h * nb, block * d), "fp8_e4m3")
    return q.view(b, h, nb * block, d)[:, :, :t], s.view(b, h, nb)


def fp8_attention_prep_ref(q: Tensor, k: Tensor, v: Tensor, hadamard_qk: bool, block_n: int) -> Fp8AttentionInputs:
    """Twin of the kernel's prep step: optional Hadamard on q and k, then fp8 quantization (see module doc).

    Args:
        q: [B, H, N, D]; k, v: [B, H, M, D]; any float dtype (math in float32).
        hadamard_qk: rotate q and k by ``hadamard(D)`` first.
        block_n: key/value tokens per scale (the kernel's BLOCK_N).
    """
    q32, k32 = q.float(), k.float()
    if hadamard_qk:
        hm = hadamard(q.shape[-1], q.device)
        q32, k32 = q32 @ hm, k32 @ hm
    q8, qs = _quant_blocks(q32, 1)
    k8, ks = _quant_blocks(k32, block_n)
    v8, vs = _quant_blocks(v, block_n)
    return Fp8AttentionInputs(q8, qs, k8, ks, v8, vs, block_n)


def _fp8_round(x: Tensor) -> Tensor:
    """Round float32 x (here in [0, 256 (1 + 2^-20)]) to the nearest e4m3 value, ties to even; returns float32."""
    return x.to(torch.float8_e4m3fn).float()


def fp8_attention_from_quantized_ref(
    qi: Fp8AttentionInputs, sm_scale: float, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """The kernel's online-softmax attention over already quantized operands (see module doc, step 2).

    Returns [B, H, N, D] in ``out_dtype`` (math in float32).
    """
    b, h, n, d = qi.q8.shape
    m_tokens, bn = qi.k8.shape[2], qi.block_n
    q8 = qi.q8.float()
    row_coef = qi.q_scale * (sm_scale * LOG2E)  # [B, H, N]; the kernel folds sm_scale and log2(e) in once
    m_i = torch.full((b, h, n), float("-inf"), device=q8.device)
    l_i = torch.zeros(b, h, n, device=q8.device)
    acc = torch.zeros(b, h, n, d, device=q8.device)
    for j in range(qi.k_scale.shape[2]):
        lo, hi = j * bn, min((j + 1) * bn, m_tokens)
        k8 = qi.k8[:, :, lo:hi].float()
        v8 = qi.v8[:, :, lo:hi].float()
        s = (q8 @ k8.transpose(-1, -2)) * (row_coef * qi.k_scale[:, :, j : j + 1])[..., None]
        m_new = torch.maximum(m_i, s.amax(-1))
        alpha = torch.exp2(m_i - m_new)
        p = torch.exp2(s - (m_new - P_SHIFT)[..., None])  # in [0, 256]
        l_i = l_i * alpha + p.sum(-1)
        p8 = _fp8_round(p)
        acc = acc * alpha[..., None] + (p8 @ v8) * qi.v_scale[:, :, j, None, None]
        m_i = m_new
    return (acc / l_i[..., None]).to(out_dtype)


def fp8_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    hadamard: bool = False,
    sm_scale: float | None = None,
    block_n: int = 128,
) -> Tensor:
    """Twin of ``qvggt.kernels.attention.fp8_attention``: same quantization, same online softmax, in torch.

    Args:
        q: [B, H, N, D]; k, v: [B, H, M, D]; float32, bfloat16 or float16.
        hadamard: rotate q and k by the orthonormal Hadamard before quantizing (incoherent processing).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        block_n: the kernel's BLOCK_N (k/v scale granularity and key-block size; it changes the rounding).

    Returns:
        [B, H, N, D] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    qi = fp8_attention_prep_ref(q, k, v, hadamard, block_n)
    return fp8_attention_from_quantized_ref(qi, scale, q.dtype)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, sm_scale: float | None = None) -> Tensor:
    """Unquantized ``softmax(q k^T * sm_scale) v`` in float64: the accuracy yardstick. Returns float64."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v.double()
