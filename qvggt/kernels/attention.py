"""fp8 (e4m3) flash-attention forward for VGGT's frame and global attention, in Triton (tuned for Hopper).

Two kernels:

* ``_fp8_quant_kernel`` (prep, memory-bound, one launch per operand): reads q, k or v [B, H, T, D] (after qk-norm
  and RoPE, e.g. from ``qvggt.kernels.qk_rope.qk_norm_rope``), optionally rotates q and k by the orthonormal
  Hadamard ``H_D / sqrt(D)`` (incoherent processing: ``q H (k H)^T = q k^T``, and the rotation spreads outlier
  channels so the fp8 step shrinks), and writes fp8 codes plus float32 scales: q per token, k and v per block of
  BLOCK_N tokens. k is written zero-padded to a whole number of blocks and v transposed ([B, H, D, M_pad], tokens
  contiguous), so the attention loop loads both without masks, and v's tile is K-major as Hopper's fp8 wgmma
  requires for its B operand.
* ``_fp8_attn_fwd_kernel``: one program per (BLOCK_M queries, batch*head). Online softmax in float32 in the log2
  domain; ``S = q8 @ k8^T`` on the fp8 tensor cores, scaled by ``q_scale * k_scale * sm_scale * log2(e)``;
  ``P = 256 * exp2(S - m)`` (one FMA and one ex2 per score) quantized to fp8; ``O += P8 @ v8 * v_scale``;
  ``O / l`` stored in q's dtype. Full key blocks run without masks; only the ragged last block masks its columns.

Twin and specification: ``qvggt.kernels.attention_reference`` (module doc there explains the blockwise twin and
the factor 256). Kernel vs twin: equal up to float32 summation order and exp2 ulps (and the rare fp8 code of P
such an ulp flips); the prep alone is bit-exact without the Hadamard (IEEE ``div_rn`` and ties-to-even rounding
as ``qvggt.kernels.rounding`` does for the other kernels).

Tile configs (fixed, no autotune): ``DEFAULT_CONFIG`` = BLOCK_M 128, BLOCK_N 128, 8 warps (two warpgroups, 64
query rows each, the wgmma M), 3 pipeline stages (q 8 KB + 3 x (k 8 KB + v 8 KB) = 56 KB of shared memory).
Compiled ahead of time for sm_90a (tests/kernels/test_fp8_attention.py, no GPU needed): both dots become fp8
``wgmma`` (m64n128k32 for S, m64n64k32 for P v), loads pipeline through cp.async, 166 registers, no spills; the
prep runs 8 warps (tf32x3 Hadamard dot, 122 registers, no spills). ``CANDIDATE_CONFIGS`` lists alternatives.
At head dim 64 the softmax's exp2 throughput, not the tensor cores, bounds this kernel, so larger key blocks
mainly amortize per-block overhead. ``bench_attention`` can time alternative ``AttentionConfig`` s.

Shape legend: B batch (frames for frame attention, 1 for global), H heads, N query tokens, M key tokens,
D head dim (16, 32, 64 or 128; VGGT: 64), NB = ceil(M / BLOCK_N) key blocks, M_pad = NB * BLOCK_N.

Compiled (CUDA) limits: an 8-bit ``tl.dot`` needs a reduction dim K >= 32 on NVIDIA GPUs (Triton's
``min_dot_size``), and the kernel reduces over D (``q8 @ k8^T``) and over BLOCK_N (``P8 @ v8``). So on CUDA the head
dim and ``block_n`` must be >= 32; ``fp8_attention`` refuses D = 16 (the ``tiny`` preset) or block_n = 16 there
with an error naming the fallback (``attention="sdpa"`` or the twin ``fp8_attention_ref``) instead of failing to
compile. The interpreter and the twin accept 16 (the CPU tests use it). Checked ahead of time for sm_90a by
tests/kernels/test_fp8_attention.py (D = 16 and BLOCK_N = 16 do not compile; D = 32 does, with fp8 wgmma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from qvggt.kernels import has_triton
from qvggt.kernels.attention_reference import (
    LOG2E,
    Fp8AttentionInputs,
    fp8_attention_ref,
    hadamard,
)

__all__ = [
    "CANDIDATE_CONFIGS",
    "DEFAULT_CONFIG",
    "FALLBACK_CALLS",
    "KERNEL_CALLS",
    "MIN_CUDA_DOT_K",
    "AttentionConfig",
    "PreppedAttention",
    "bench_attention",
    "check_cuda_shape",
    "fp8_attention",
    "fp8_attention_prep",
    "kernel_is_interpreted",
]

# Which path each launcher took: proof for engines and tests that the Triton kernels (not the twin) ran.
KERNEL_CALLS: dict[str, int] = {"fp8_attention": 0, "fp8_attention_prep": 0}
FALLBACK_CALLS: dict[str, int] = {"fp8_attention": 0}

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16; a power of two for the Hadamard and the register tiles
# Compiled for a GPU, an 8-bit tl.dot needs K >= 32 (module docstring): the head dim (q8 @ k8^T) and BLOCK_N (P8 @ v8).
MIN_CUDA_DOT_K = 32
_TINY = torch.finfo(torch.float32).tiny
_FP8_MAX = 448.0


@dataclass(frozen=True)
class AttentionConfig:
    """Fixed launch parameters of the fp8 attention kernels.

    block_n is also the k/v scale granularity, so it changes the result (slightly): pass the same value to the
    twin (``fp8_attention_ref(..., block_n=...)``) when comparing.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    prep_warps: int = 8  # 4 spills registers in the Hadamard dot (ptxas, sm_90a)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tile), got {val}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.prep_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps / prep_warps must be a power of two <= 16, got {self}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT_CONFIG = AttentionConfig()
# Alternatives for bench_attention(configs=...) on a GPU (all compile spill-free for sm_90a): (128, 64) with 4 warps
# uses 251 registers (2 CTAs/SM), (64, 64) with 4 warps 126 registers (4 CTAs/SM).
CANDIDATE_CONFIGS = (
    DEFAULT_CONFIG,
    AttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
)


@dataclass(frozen=True)
class PreppedAttention:
    """Kernel-layout fp8 operands written by ``fp8_attention_prep``.

    q8 [B, H, N, D] fp8, q_scale [B, H, N] f32; k8 [B, H, M_pad, D] fp8 (rows >= M are zero);
    v8t [B, H, D, M_pad] fp8 (v transposed, columns >= M zero); k_scale, v_scale [B, H, NB] f32.
    """

    q8: Tensor
    q_scale: Tensor
    k8: Tensor
    k_scale: Tensor
    v8t: Tensor
    v_scale: Tensor
    m_tokens: int
    block_n: int

    def logical(self) -> Fp8AttentionInputs:
        """The same operands in the twin's layout (unpadded, v untransposed), for comparisons."""
        m = self.m_tokens
        return Fp8AttentionInputs(
            self.q8,
            self.q_scale,
            self.k8[:, :, :m],
            self.k_scale,
            self.v8t[:, :, :, :m].transpose(-1, -2),
            self.v_scale,
            self.block_n,
        )


if has_triton():
    import triton
    import triton.language as tl

    from qvggt.kernels.rounding import round_to_fp8_grid

    @triton.jit
    def _fp8_quant_kernel(
        x_ptr,
        h_ptr,
        out_ptr,
        scale_ptr,
        stride_xb,
        stride_xh,
        stride_xt,
        stride_ot,
        stride_od,
        H,
        T,
        T_OUT,
        out_bh_stride,
        scale_bh_stride,
        PER_ROW: tl.constexpr,
        HADAMARD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Program (token block, b*H + h): fp8 codes and scales of x[b, h, block, :].

        Contract: x [B, H, T, D] with unit stride along D and strides (b, h, t) given; h_ptr a contiguous float32
        [D, D] orthonormal Hadamard (read only when HADAMARD); out element (bh, t, d) at
        ``bh * out_bh_stride + t * stride_ot + d * stride_od`` for t < T_OUT (tokens in [T, T_OUT) get zeros:
        the padding of k and v); PER_ROW: one scale per token at ``scale[bh * scale_bh_stride + t]``, else one
        per block at ``scale[bh * scale_bh_stride + block]``.
        """
        pid_t = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, D)
        in_rows = rows < T
        src = x_ptr + b * stride_xb + h * stride_xh + rows.to(tl.int64)[:, None] * stride_xt + cols[None, :]
        x = tl.load(src, mask=in_rows[:, None], other=0.0).to(tl.float32)
        if HADAMARD:
            hm = tl.load(h_ptr + cols[:, None] * D + cols[None, :])
            # tf32x3 (three tensor-core passes, ~fp32 accurate): plain tf32 would round x to 10 mantissa bits
            # before the fp8 rounding (the twin is fp32), and "ieee" FMA dots spill registers at 128 x 64 (ptxas).
            x = tl.dot(x, hm, input_precision="tf32x3")
        ax = tl.abs(x)
        if PER_ROW:
            amax = tl.max(ax, axis=1)  # [BLOCK_T]
            scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)
            y = tl.math.div_rn(x, scale[:, None])
        else:
            amax = tl.max(tl.max(ax, axis=1), axis=0)  # scalar: one scale for the block
            scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)
            y = tl.math.div_rn(x, scale)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        codes = round_to_fp8_grid(y).to(tl.float8e4nv)  # exact cast: ties to even on GPU and interpreter alike
        dst = out_ptr + bh.to(tl.int64) * out_bh_stride + rows.to(tl.int64)[:, None] * stride_ot
        dst += cols[None, :] * stride_od
        tl.store(dst, codes, mask=(rows < T_OUT)[:, None])
        if PER_ROW:
            tl.store(scale_ptr + bh.to(tl.int64) * scale_bh_stride + rows, scale, mask=in_rows)
        else:
            tl.store(scale_ptr + bh.to(tl.int64) * scale_bh_stride + pid_t, scale)

    @triton.jit
    def _attn_block(
        q,
        row_coef,
        m_i,
        l_i,
        acc,
        k_base,
        v_base,
        ks_base,
        vs_base,
        j,
        M,
        M_pad,
        offs_n,
        offs_d,
        MASKED: tl.constexpr,
        SOFT_ROUND: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One key block j of the online softmax; returns the updated (m_i, l_i, acc).

        k8 and v8t are zero-padded to M_pad tokens, so loads need no mask; MASKED (the ragged last block only)
        sends the scores of tokens >= M to -inf after scaling (a zero scale times -inf would be NaN).
        """
        start = j * BLOCK_N
        kt = tl.load(k_base + (start + offs_n)[None, :] * D + offs_d[:, None])  # [D, BLOCK_N] = k^T tile
        v = tl.load(v_base + offs_d[None, :] * M_pad + (start + offs_n)[:, None])  # [BLOCK_N, D], K-major
        coef = row_coef * tl.load(ks_base + j)  # [BLOCK_M]: q_scale * sm_scale * log2(e) * k_scale
        s_raw = tl.dot(q, kt)
        if MASKED:
            s = tl.where((start + offs_n)[None, :] < M, s_raw * coef[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        else:
            # rowmax(s_raw * coef) == rowmax(s_raw) * coef exactly (coef >= 0 and rounding is monotone): the
            # scaling then folds into the exp2 argument's FMA below instead of costing a multiply per score.
            m_new = tl.maximum(m_i, tl.max(s_raw, axis=1) * coef)
        alpha = tl.exp2(m_i - m_new)
        m_shift = m_new - 8.0  # P_SHIFT: p = 256 * exp2(s - m_new), [0, 1] -> e4m3's range (attention_reference doc)
        if MASKED:
            p = tl.exp2(s - m_shift[:, None])
        else:
            p = tl.exp2(s_raw * coef[:, None] - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SOFT_ROUND:
            # The interpreter's fp8 cast rounds half away from zero; GPU's cvt.rn.satfinite is already ties-to-even.
            p = round_to_fp8_grid(p)
        p8 = p.to(tl.float8e4nv)
        acc = acc * alpha[:, None] + tl.dot(p8, v) * tl.load(vs_base + j)
        return m_new, l_i, acc

    @triton.jit
    def _fp8_attn_fwd_kernel(
        q_ptr,
        qs_ptr,
        k_ptr,
        ks_ptr,
        v_ptr,
        vs_ptr,
        o_ptr,
        H,
        N,
        M,
        M_pad,
        NB,
        stride_ob,
        stride_oh,
        stride_on,
        qk_coef,
        SOFT_ROUND: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Program (query block, b*H + h): o[b, h, block, :] = softmax(q k^T * sm_scale) v from fp8 operands.

        Contract: q8 [B*H, N, D] and q_scale [B*H, N] contiguous; k8 [B*H, M_pad, D], v8t [B*H, D, M_pad],
        k/v scales [B*H, NB] contiguous, padded with zeros beyond M; o [B, H, N, D] with unit stride along D and
        strides (b, h, n) given; ``qk_coef = sm_scale * log2(e)`` (> 0).
        """
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        bh64 = bh.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        in_m = offs_m < N
        q = tl.load(q_ptr + bh64 * N * D + offs_m[:, None] * D + offs_d[None, :], mask=in_m[:, None], other=0.0)
        # Rows past N read scale 0: their scores are 0, finite, and never stored.
        row_coef = tl.load(qs_ptr + bh64 * N + offs_m, mask=in_m, other=0.0) * qk_coef
        k_base = k_ptr + bh64 * M_pad * D
        v_base = v_ptr + bh64 * D * M_pad
        ks_base = ks_ptr + bh64 * NB
        vs_base = vs_ptr + bh64 * NB

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = M // BLOCK_N
        for j in range(n_full):
            m_i, l_i, acc = _attn_block(
                q, row_coef, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, j, M, M_pad, offs_n, offs_d,
                False, SOFT_ROUND, D, BLOCK_N,
            )  # fmt: skip
        if n_full < NB:
            m_i, l_i, acc = _attn_block(
                q, row_coef, m_i, l_i, acc, k_base, v_base, ks_base, vs_base, n_full, M, M_pad, offs_n, offs_d,
                True, SOFT_ROUND, D, BLOCK_N,
            )  # fmt: skip
        out = acc / l_i[:, None]  # the factor 256 is in both acc and l
        b = bh64 // H
        h = bh64 % H
        dst = o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=in_m[:, None])


def kernel_is_interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (see ``layernorm_quant.kernel_is_interpreted``)."""
    if not has_triton():
        return False
    return all(type(f).__name__ == "InterpretedFunction" for f in (_fp8_attn_fwd_kernel, tl.sum))


def _check_inputs(q: Any, k: Any, v: Any, sm_scale: float | None) -> float:
    """Validate the launcher arguments; returns the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, H, tokens, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and head dim (only tokens may differ)"
        )
    if d not in _HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported: expected one of {_HEAD_DIMS}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        # > 0: the kernel takes rowmax of scaled scores as the scaled rowmax, true only for a positive scale.
        raise ValueError(f"sm_scale must be a finite positive float, got {sm_scale!r}")
    return float(scale)


def check_cuda_shape(head_dim: int, config: AttentionConfig = DEFAULT_CONFIG) -> None:
    """Raise ValueError if the compiled kernel cannot be built for ``head_dim`` / ``config.block_n`` on a GPU.

    An 8-bit ``tl.dot`` compiled for an NVIDIA GPU needs its reduction dim K >= 32 (Triton's ``min_dot_size``):
    K is the head dim in ``q8 @ k8^T`` and BLOCK_N in ``P8 @ v8``. The interpreter and the twin have no such limit.
    """
    if head_dim < MIN_CUDA_DOT_K:
        raise ValueError(
            f"fp8_attention: head dim {head_dim} is too small for the compiled fp8 attention kernel on a GPU (an 8-bit "
            f"tl.dot needs K >= {MIN_CUDA_DOT_K}; the kernel reduces over the head dim). Use attention='sdpa' "
            "(EngineOptions / FusedBlock) for this model, or the torch twin "
            "qvggt.kernels.attention_reference.fp8_attention_ref"
        )
    if config.block_n < MIN_CUDA_DOT_K:
        raise ValueError(
            f"fp8_attention: block_n {config.block_n} is too small for the compiled kernel on a GPU (an 8-bit tl.dot "
            f"needs K >= {MIN_CUDA_DOT_K}; P8 @ v8 reduces over block_n): use block_n >= {MIN_CUDA_DOT_K} "
            "(DEFAULT_CONFIG has 128)"
        )


def _use_kernel(q: Tensor) -> bool:
    """Kernel on CUDA (raising if triton is missing); under the interpreter for non-bf16 CPU tensors."""
    if q.is_cuda:
        if not has_triton():
            raise RuntimeError(
                "fp8_attention: q is on CUDA but triton is not importable; the fp8 attention kernel cannot run and "
                "a silent torch fallback on a GPU is refused (install triton, or move the tensors to the CPU)"
            )
        return True
    # The interpreter truncates bf16 casts (so would the output store): bf16 on CPU takes the twin.
    return has_triton() and kernel_is_interpreted() and q.dtype != torch.bfloat16


_HADAMARD_CACHE: dict[tuple[int, torch.device], Tensor] = {}


def _hadamard_on(d: int, device: torch.device) -> Tensor:
    key = (d, device)
    if key not in _HADAMARD_CACHE:
        _HADAMARD_CACHE[key] = hadamard(d, device).contiguous()
    return _HADAMARD_CACHE[key]


def _launch_quant(
    x: Tensor,
    out: Tensor,
    scale: Tensor,
    *,
    per_row: bool,
    transposed: bool,
    had: Tensor | None,
    t_out: int,
    cfg: AttentionConfig,
) -> None:
    """Quantize x [B, H, T, D] into ``out``: [B, H, t_out, D] (q8, k8) or, ``transposed``, [B, H, D, t_out] (v8t)."""
    b, h, t, d = x.shape
    if x.stride(3) != 1:
        x = x.contiguous()
    if transposed:  # v8t [B, H, D, M_pad]: token stride 1, channel stride M_pad
        stride_ot, stride_od = 1, out.stride(2)
    else:
        stride_ot, stride_od = out.stride(2), 1
    grid = (triton.cdiv(t_out, cfg.block_n), b * h)
    _fp8_quant_kernel[grid](
        x,
        had if had is not None else x,  # dummy pointer, never read (HADAMARD=False)
        out,
        scale,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        stride_ot,
        stride_od,
        h,
        t,
        t_out,
        out.stride(1),
        scale.stride(1),
        PER_ROW=per_row,
        HADAMARD=had is not None,
        D=d,
        BLOCK_T=cfg.block_n,
        num_warps=cfg.prep_warps,
    )


def fp8_attention_prep(
    q: Tensor, k: Tensor, v: Tensor, *, hadamard: bool = False, config: AttentionConfig = DEFAULT_CONFIG
) -> PreppedAttention:
    """Run the prep kernel on q, k, v (already validated shapes; kernel path only): fp8 operands in kernel layout.

    Public so tests and engines can check or reuse the quantized operands; ``fp8_attention`` calls it.
    """
    if not (has_triton() and (q.is_cuda or kernel_is_interpreted())):
        raise RuntimeError("fp8_attention_prep needs CUDA tensors or the Triton interpreter (TRITON_INTERPRET=1)")
    KERNEL_CALLS["fp8_attention_prep"] += 1
    b, h, n, d = q.shape
    m = k.shape[2]
    nb = -(-m // config.block_n)
    m_pad = nb * config.block_n
    dev = q.device
    had = _hadamard_on(d, dev) if hadamard else None
    f8 = torch.float8_e4m3fn
    q8 = torch.empty((b, h, n, d), dtype=f8, device=dev)
    q_scale = torch.empty((b, h, n), dtype=torch.float32, device=dev)
    k8 = torch.empty((b, h, m_pad, d), dtype=f8, device=dev)
    v8t = torch.empty((b, h, d, m_pad), dtype=f8, device=dev)
    k_scale = torch.empty((b, h, nb), dtype=torch.float32, device=dev)
    v_scale = torch.empty((b, h, nb), dtype=torch.float32, device=dev)
    _launch_quant(q, q8, q_scale, per_row=True, transposed=False, had=had, t_out=n, cfg=config)
    _launch_quant(k, k8, k_scale, per_row=False, transposed=False, had=had, t_out=m_pad, cfg=config)
    _launch_quant(v, v8t, v_scale, per_row=False, transposed=True, had=None, t_out=m_pad, cfg=config)
    return PreppedAttention(q8, q_scale, k8, k_scale, v8t, v_scale, m, config.block_n)


def _launch_attention(p: PreppedAttention, out: Tensor, sm_scale: float, cfg: AttentionConfig) -> None:
    b, h, n, d = p.q8.shape
    m_pad = p.k8.shape[2]
    grid = (triton.cdiv(n, cfg.block_m), b * h)
    _fp8_attn_fwd_kernel[grid](
        p.q8,
        p.q_scale,
        p.k8,
        p.k_scale,
        p.v8t,
        p.v_scale,
        out,
        h,
        n,
        p.m_tokens,
        m_pad,
        p.k_scale.shape[2],
        out.stride(0),
        out.stride(1),
        out.stride(2),
        sm_scale * LOG2E,
        SOFT_ROUND=kernel_is_interpreted(),
        D=d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    hadamard: bool = False,
    sm_scale: float | None = None,
    config: AttentionConfig | None = None,
) -> Tensor:
    """Non-causal attention ``softmax(q k^T * sm_scale) v`` with fp8 e4m3 operands and fp8 P (flash-attention).

    Runs the Triton kernels for CUDA tensors (a failure there raises; there is no silent fallback on a GPU) and
    under the Triton interpreter for float32/float16 CPU tensors; otherwise (CPU without ``TRITON_INTERPRET=1``,
    or bf16 under the interpreter) its twin ``fp8_attention_ref``. ``KERNEL_CALLS["fp8_attention"]`` or
    ``FALLBACK_CALLS["fp8_attention"]`` counts which one ran.

    Args:
        q: [B, H, N, D]; k, v: [B, H, M, D] (VGGT: M = N, D = 64, after qk-norm and RoPE); float32, bfloat16 or
            float16, all one dtype and device; unit stride along D is best (otherwise copied).
        hadamard: rotate q and k by the orthonormal Hadamard over D before quantizing (helps when q/k have
            outlier channels; scores are unchanged in exact arithmetic).
        sm_scale: softmax scale, default ``1 / sqrt(D)``; must be positive.
        config: tile config (default ``DEFAULT_CONFIG``); its block_n is the k/v scale granularity.

    Returns:
        [B, H, N, D] in q's dtype (contiguous).

    Raises:
        TypeError / ValueError: on non-tensors, wrong ranks, dtypes, devices, mismatched shapes, an unsupported
            head dim (on CUDA also head dim or block_n < 32: ``check_cuda_shape``), or a non-positive sm_scale.
        RuntimeError: for CUDA tensors without triton, or whatever the kernel launch raises.
    """
    scale = _check_inputs(q, k, v, sm_scale)
    cfg = DEFAULT_CONFIG if config is None else config
    if q.is_cuda:
        check_cuda_shape(q.shape[-1], cfg)
    if not _use_kernel(q):
        FALLBACK_CALLS["fp8_attention"] += 1
        return fp8_attention_ref(q, k, v, hadamard=hadamard, sm_scale=scale, block_n=cfg.block_n)
    KERNEL_CALLS["fp8_attention"] += 1
    prepped = fp8_attention_prep(q, k, v, hadamard=hadamard, config=cfg)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_attention(prepped, out, scale, cfg)
    return out


def bench_attention(
    n_tokens_list: list[int] | tuple[int, ...],
    *,
    batch: int = 1,
    heads: int = 16,
    head_dim: int = 64,
    hadamard: bool = False,
    configs: list[AttentionConfig] | None = None,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> list[dict[str, Any]]:
    """Time fp8 attention against torch SDPA in bf16 on the current CUDA device (median of ``do_bench``).

    For each token count N (self-attention, B=``batch``, H=``heads``) and each config: the whole ``fp8_attention``
    call (prep + attention), the attention kernel alone on pre-quantized operands, and bf16
    ``F.scaled_dot_product_attention`` (whatever backend torch picks: flash or cuDNN). TFLOP/s count the two
    matmuls, ``4 * B * H * N^2 * D``. Also reports the fp8 output's relative L2 error against the bf16 SDPA output.

    VGGT sizes at 518x392: frame attention N=1041 with batch = frames; global attention N = 1041 * frames, batch 1.

    Returns:
        One dict per (N, config): n_tokens, batch, heads, head_dim, hadamard, config (dict), fp8_ms,
        fp8_attn_only_ms, prep_ms (difference), sdpa_bf16_ms, fp8_tflops, fp8_attn_only_tflops, sdpa_tflops,
        speedup (sdpa / fp8 total), speedup_attn_only, rel_l2_vs_sdpa, device.
    """
    if not torch.cuda.is_available() or not has_triton():
        raise RuntimeError("bench_attention needs a CUDA GPU and triton")
    import torch.nn.functional as F
    from triton.testing import do_bench

    def time_ms(fn: Any) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    cfgs = list(configs) if configs else [DEFAULT_CONFIG]
    dev = torch.device("cuda")
    sm_scale = 1.0 / math.sqrt(head_dim)
    rows: list[dict[str, Any]] = []
    for n in n_tokens_list:
        gen = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (
            torch.randn(batch, heads, n, head_dim, device=dev, generator=gen, dtype=torch.float32).bfloat16()
            for _ in range(3)
        )
        flops = 4.0 * batch * heads * n * n * head_dim
        ref = F.scaled_dot_product_attention(q, k, v)
        sdpa_ms = time_ms(partial(F.scaled_dot_product_attention, q, k, v))
        for cfg in cfgs:
            out = fp8_attention(q, k, v, hadamard=hadamard, config=cfg)
            rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            total_ms = time_ms(partial(fp8_attention, q, k, v, hadamard=hadamard, config=cfg))
            prepped = fp8_attention_prep(q, k, v, hadamard=hadamard, config=cfg)
            attn_ms = time_ms(partial(_launch_attention, prepped, torch.empty_like(q), sm_scale, cfg))
            rows.append(
                {
                    "n_tokens": n,
                    "batch": batch,
                    "heads": heads,
                    "head_dim": head_dim,
                    "hadamard": hadamard,
                    "config": cfg.__dict__.copy(),
                    "fp8_ms": total_ms,
                    "fp8_attn_only_ms": attn_ms,
                    "prep_ms": total_ms - attn_ms,
                    "sdpa_bf16_ms": sdpa_ms,
                    "fp8_tflops": flops / total_ms * 1e-9,
                    "fp8_attn_only_tflops": flops / attn_ms * 1e-9,
                    "sdpa_tflops": flops / sdpa_ms * 1e-9,
                    "speedup": sdpa_ms / total_ms,
                    "speedup_attn_only": sdpa_ms / attn_ms,
                    "rel_l2_vs_sdpa": rel,
                    "device": torch.cuda.get_device_name(dev),
                }
            )
    return rows
