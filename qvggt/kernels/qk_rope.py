"""Fused qk-norm + 2-D RoPE + head split: the packed qkv GEMM output -> q, k, v in [B, h, N, d] in one pass.

VGGT's attention takes ``qkv`` [B*N, 3C], splits heads, LayerNorms q and k over each head's d channels, and rotates
them with 2-D RoPE (first half of d by the token's row, second half by its column, rotate-half pairing inside each
half). In PyTorch that is about twenty elementwise launches per block, each a full pass over q or k (about 20% of
the published model's GPU time is such work, HOPPER_MEASUREMENTS.md). Here one program reads a tile of tokens of
one head once and writes q, k and v where attention wants them.

Angles are computed in float32 (``pos * inv_freq``, then cos/sin): more accurate than the published bf16 tables,
identical to them in fp32. Twin: ``qvggt.kernels.reference.qk_norm_rope_ref``.

Shape legend: T = B*N token rows, C = h*d channels, d = head dim (power of two, divisible by 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvggt.kernels import check_fallback_allowed, has_triton
from qvggt.kernels.reference import qk_norm_rope_ref

__all__ = ["FALLBACK_CALLS", "KERNEL_CALLS", "kernel_is_interpreted", "qk_norm_rope"]

KERNEL_CALLS: dict[str, int] = {"qk_norm_rope": 0}
FALLBACK_CALLS: dict[str, int] = {"qk_norm_rope": 0}

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _qk_norm_rope_kernel(
        qkv_ptr,
        yx_ptr,
        inv_freq_ptr,
        qw_ptr,
        qb_ptr,
        kw_ptr,
        kb_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        T,
        N,
        H,
        eps,
        HAS_NORM: tl.constexpr,
        HAS_ROPE: tl.constexpr,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Program (token block, head): q, k, v [B, H, N, D] from qkv [T, 3 * H * D] (contiguous)."""
        pid_t = tl.program_id(0)
        head = tl.program_id(1)
        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tl.arange(0, D)
        mask = (rows < T)[:, None]
        C = H * D
        src = qkv_ptr + rows[:, None] * (3 * C) + head * D
        b = rows // N
        n = rows % N
        dst = ((b * H + head) * N + n)[:, None] * D + cols[None, :]

        HALF: tl.constexpr = D // 2
        QUARTER: tl.constexpr = D // 4
        # Rotate-half partner inside each half of d: j <-> j +- d/4, with sign - for the first quarter of a half.
        in_half = cols % HALF
        partner = cols - in_half + (in_half + QUARTER) % HALF
        sign = tl.where(in_half < QUARTER, -1.0, 1.0)
        if HAS_ROPE:
            pos = tl.load(yx_ptr + rows[:, None] * 2 + (cols >= HALF).to(tl.int64)[None, :], mask=mask, other=0)
            angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + (in_half % QUARTER))[None, :]
            cos = tl.cos(angle)
            sin = tl.sin(angle)

        for which in tl.static_range(2):  # 0: q, 1: k
            x = tl.load(src + which * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(src + which * C + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                w_ptr = qw_ptr if which == 0 else kw_ptr
                bias_ptr = qb_ptr if which == 0 else kb_ptr
                mean = tl.sum(x, axis=1) / D
                diff = x - mean[:, None]
                var = tl.sum(diff * diff, axis=1) / D
                rstd = 1.0 / tl.sqrt(var + eps)
                x = diff * rstd[:, None] * tl.load(w_ptr + cols)[None, :] + tl.load(bias_ptr + cols)[None, :]
                xp = (xp - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + partner)[None, :] + tl.load(
                    bias_ptr + partner
                )[None, :]
            if HAS_ROPE:
                x = x * cos + sign[None, :] * xp * sin
            out_ptr = q_ptr if which == 0 else k_ptr
            tl.store(out_ptr + dst, x.to(out_ptr.dtype.element_ty), mask=mask)
        v = tl.load(src + 2 * C + cols[None, :], mask=mask, other=0.0)
        tl.store(v_ptr + dst, v, mask=mask)


def kernel_is_interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (see ``layernorm_quant.kernel_is_interpreted``)."""
    if not has_triton():
        return False
    return all(type(f).__name__ == "InterpretedFunction" for f in (_qk_norm_rope_kernel, tl.sum))


def qk_norm_rope(
    qkv: Tensor,
    batch: int,
    heads: int,
    q_norm: tuple[Tensor, Tensor, float] | None = None,
    k_norm: tuple[Tensor, Tensor, float] | None = None,
    yx: Tensor | None = None,
    inv_freq: Tensor | None = None,
    block_t: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``qkv`` [B*N, 3*h*d] into q, k, v [B, h, N, d]; LayerNorm q and k per head; rotate them by 2-D RoPE.

    Args:
        qkv: [B*N, 3*h*d], contiguous, any float dtype (outputs keep it).
        batch, heads: B and h.
        q_norm, k_norm: (weight [d], bias [d], eps) of the per-head LayerNorms, both or neither.
        yx: integer token positions [B, N, 2] (row, column), with ``inv_freq`` [d/4] float32, or neither (no RoPE).
        block_t: tokens per program.

    Returns:
        q, k, v: [B, h, N, d] contiguous.

    Raises:
        ValueError: on inconsistent shapes, naming them.
        RuntimeError: when the kernel cannot run on CUDA and ``require_kernels`` is on.
    """
    if qkv.ndim != 2 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"qkv must be [B*N, 3*h*d] with h={heads}, got {tuple(qkv.shape)}")
    t = qkv.shape[0]
    if t % batch:
        raise ValueError(f"{t} token rows do not split into batch {batch}")
    n, d = t // batch, qkv.shape[1] // (3 * heads)
    if d % 4 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two (RoPE pairs quarters of it)")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("pass both q_norm and k_norm, or neither")
    if q_norm is not None and q_norm[2] != k_norm[2]:  # type: ignore[index]
        raise ValueError(f"q_norm and k_norm must share eps, got {q_norm[2]} and {k_norm[2]}")  # type: ignore[index]
    if (yx is None) != (inv_freq is None):
        raise ValueError("pass both yx and inv_freq for RoPE, or neither")
    if yx is not None and (yx.shape != (batch, n, 2) or inv_freq.shape != (d // 4,)):  # type: ignore[union-attr]
        raise ValueError(
            f"yx must be [{batch}, {n}, 2] and inv_freq [{d // 4}], got {tuple(yx.shape)} and {tuple(inv_freq.shape)}"  # type: ignore[union-attr]
        )
    if not qkv.is_contiguous():
        raise ValueError("qkv must be contiguous")
    # The interpreter truncates bf16 casts: bf16 on CPU always takes the twin.
    if not (has_triton() and (qkv.is_cuda or (kernel_is_interpreted() and qkv.dtype != torch.bfloat16))):
        check_fallback_allowed("qk_norm_rope", qkv)
        FALLBACK_CALLS["qk_norm_rope"] += 1
        return qk_norm_rope_ref(qkv, batch, heads, q_norm, k_norm, yx, inv_freq)
    KERNEL_CALLS["qk_norm_rope"] += 1
    q = torch.empty((batch, heads, n, d), dtype=qkv.dtype, device=qkv.device)
    k, v = torch.empty_like(q), torch.empty_like(q)
    qw, qb, eps = q_norm if q_norm is not None else (qkv, qkv, 0.0)
    kw, kb, _ = k_norm if k_norm is not None else (qkv, qkv, 0.0)
    grid = (triton.cdiv(t, block_t), heads)
    _qk_norm_rope_kernel[grid](
        qkv,
        yx.contiguous() if yx is not None else qkv,
        inv_freq.float().contiguous() if inv_freq is not None else qkv,
        qw.float().contiguous(),
        qb.float().contiguous(),
        kw.float().contiguous(),
        kb.float().contiguous(),
        q,
        k,
        v,
        t,
        n,
        heads,
        float(eps),
        HAS_NORM=q_norm is not None,
        HAS_ROPE=yx is not None,
        D=d,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return q, k, v
