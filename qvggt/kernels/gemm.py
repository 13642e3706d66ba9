"""Scaled GEMM with a fused epilogue: bf16, int8 and fp8 operands, int4 weights unpacked in-kernel.

One Triton kernel computes every linear layer of the engine's transformer blocks::

    y[m, n] = sum_g  (A[m, k in g] . W[n, k in g]) * a_scale[m, g] * w_scale[n, g]      (g: K groups, or all K)
    y = y + bias[n];  y = gelu(y) (exact erf);  y = y * gamma[n];  y = residual[m, n] + y
    out = y in out_dtype,  or  (codes, scales) quantized per row and per BLOCK_N-column tile (int8 / fp8 / int4 grid)

so that the LayerScale, residual add, GELU and the quantization of the next GEMM's input never make an extra
pass over memory (the separate-kernel recipe measured slower than bf16 on Hopper, HOPPER_MEASUREMENTS.md).

Operand kinds (``A`` is [M, K] row-major; ``W`` is [N, K] row-major as ``nn.Linear`` stores it, read as K-major
tiles, the layout Hopper's fp8 tensor cores want):

    a kind   A dtype          a_scale          W                         w_scale           dot
    float    bf16 / fp16      none             same dtype                none              bf16/fp16 -> fp32
    int8     int8 codes       [M, 1] | [M, G]  int8 codes or int4       [N, 1] | [N, G]   int8 -> int32
    fp8      float8_e4m3fn    [M, 1] | [M, G]  float8_e4m3fn or int4    [N, 1] | [N, G]   fp8 -> fp32

int4 weights use the kernel layout of ``pack_int4_blocked``: within each BLOCK_K slice of K, byte j holds the code
of k = j in its low nibble and k = j + BLOCK_K / 2 in its high nibble, so one packed tile unpacks into two
contiguous half-tiles and the kernel issues two tensor-core dots against the matching halves of A (no register
shuffles). Hopper has no int4 tensor cores: codes (-8..7) become int8 or fp8 in registers; 4 bits buy memory.

Group scales (``[*, G]``, G = K / group) need ``group == BLOCK_K``: each K step's partial dot is scaled in fp32
and accumulated, as DeepSeek-V3's fine-grained fp8 GEMM does. The output quantization writes one scale per
(row, BLOCK_N columns) so its codes can feed the next GEMM with group == BLOCK_N.

Special-token rows of the quantized output (``out_special_period`` P, ``out_special_count`` c: VGGT's camera and
register tokens, for fc2's input): global row m is special iff ``m % P < c``, computed in the epilogue from the
tile's row offsets; with ``out_quant="int4"`` every column tile of a special row is quantized on the int8 grid
(qmax 127 instead of 7) into the same int8 codes. P and c are runtime arguments (not specialised: one compiled
kernel for every image size); only "special rows on or off" is a compile-time flag.

Twin: ``qvggt.kernels.reference.scaled_gemm_ref``. Shape legend: M tokens, K input width, N output width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qvggt.kernels import check_fallback_allowed, has_triton
from qvggt.kernels.reference import SPECIAL_ROW_FORMAT, check_special_rows, scaled_gemm_ref

__all__ = [
    "FALLBACK_CALLS",
    "KERNEL_CALLS",
    "GemmTiles",
    "pack_int4_blocked",
    "scaled_gemm",
    "unpack_int4_blocked",
]

KERNEL_CALLS: dict[str, int] = {"scaled_gemm": 0}
FALLBACK_CALLS: dict[str, int] = {"scaled_gemm": 0}

OutQuant = Literal["int8", "fp8_e4m3", "int4"]  # "int4": 4-bit grid in int8 codes
_TINY = torch.finfo(torch.float32).tiny
_OUT_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "int4": 7.0}


@dataclass(frozen=True)
class GemmTiles:
    """Fixed tile configuration (no autotune sweep: the benchmark must fit a short GPU lease).

    Defaults are Hopper choices: 128x128 output tiles, K steps of 128 one-byte (64 two-byte) elements, 8 warps
    (two warpgroups for wgmma), 3-stage software pipeline (3 x 32 KB of operand tiles, leaving room for the
    64 KB fp32 accumulator tile the epilogue may stage through shared memory).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_tiles(a_dtype: torch.dtype) -> GemmTiles:
    """Tiles for an A operand of ``a_dtype``: 2-byte operands take K steps of 64 to keep 32 KB per stage."""
    if a_dtype in (torch.bfloat16, torch.float16):
        return GemmTiles(block_k=64)
    return GemmTiles()


if has_triton():
    import triton
    import triton.language as tl

    from qvggt.kernels.rounding import round_to_fp8_grid, round_to_int_grid

    @triton.jit(do_not_specialize=["out_special_period", "out_special_count"])  # no recompile per image size
    def _scaled_gemm_kernel(
        a_ptr,
        w_ptr,
        a_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        gamma_ptr,
        res_ptr,
        out_ptr,
        out_scale_ptr,
        had_ptr,
        M,
        N,
        K,
        stride_am,
        stride_wn,
        stride_asm,
        stride_wsn,
        stride_rm,
        stride_om,
        stride_osm,
        out_special_period,
        out_special_count,
        A_KIND: tl.constexpr,  # 0 float (bf16/fp16), 1 int8, 2 fp8 e4m3
        W_INT4: tl.constexpr,
        A_SCALE: tl.constexpr,  # 0 none, 1 per row, 2 per row and K group
        W_SCALE: tl.constexpr,  # 0 none, 1 per channel, 2 per channel and K group
        GROUPED: tl.constexpr,  # A_SCALE == 2 or W_SCALE == 2 (a launcher-computed constexpr: the compiler needs it)
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        HAS_GAMMA: tl.constexpr,
        HAS_RES: tl.constexpr,
        OUT_HADAMARD: tl.constexpr,  # rotate each row's BLOCK_N-column tile by H / sqrt(BLOCK_N) before the store
        OUT_QUANT: tl.constexpr,  # 0 float out, 1 int8 codes, 2 fp8 codes (+ scale per row and N tile)
        OUT_QMAX: tl.constexpr,
        OUT_SPECIAL: tl.constexpr,  # rows m % out_special_period < out_special_count quantized with SPECIAL_QMAX
        SPECIAL_QMAX: tl.constexpr,
        TINY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """One program per BLOCK_M x BLOCK_N output tile, in GROUP_M-row bands so W tiles stay in L2.

        Contract: A [M, K] and W [N, K] (int4: [N, K/2] uint8, K a multiple of BLOCK_K) with unit stride along K;
        scales float32 with unit stride along their last dim; bias/gamma [N] contiguous; residual and out
        [M, N] with unit stride along N; out_scale [M, cdiv(N, BLOCK_N)] float32; OUT_SPECIAL needs
        out_special_period > 0.
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        band = GROUP_M * num_n
        first_m = (pid // band) * GROUP_M
        rows_in_band = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % band) % rows_in_band
        pid_n = (pid % band) // rows_in_band

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if A_KIND == 1 and not GROUPED:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        HALF: tl.constexpr = BLOCK_K // 2
        for k0 in range(0, K, BLOCK_K):
            if W_INT4:
                offs_h = tl.arange(0, HALF)
                a_lo = tl.load(
                    a_ptr + offs_m[:, None] * stride_am + (k0 + offs_h)[None, :],
                    mask=mask_m[:, None] & ((k0 + offs_h) < K)[None, :],
                    other=0.0,
                )
                a_hi = tl.load(
                    a_ptr + offs_m[:, None] * stride_am + (k0 + HALF + offs_h)[None, :],
                    mask=mask_m[:, None] & ((k0 + HALF + offs_h) < K)[None, :],
                    other=0.0,
                )
                p = tl.load(
                    w_ptr + offs_n[None, :] * stride_wn + (k0 // 2 + offs_h)[:, None],
                    mask=mask_n[None, :],
                    other=0,
                ).to(tl.int32)
                w_lo = ((p & 0xF) ^ 8) - 8  # sign-extend the nibble: codes -8..7
                w_hi = (((p >> 4) & 0xF) ^ 8) - 8
                if A_KIND == 1:
                    part = tl.dot(a_lo, w_lo.to(tl.int8), out_dtype=tl.int32)
                    part += tl.dot(a_hi, w_hi.to(tl.int8), out_dtype=tl.int32)
                elif A_KIND == 2:
                    part = tl.dot(a_lo, w_lo.to(tl.float16).to(tl.float8e4nv))
                    part += tl.dot(a_hi, w_hi.to(tl.float16).to(tl.float8e4nv))
                else:
                    part = tl.dot(a_lo, w_lo.to(a_ptr.dtype.element_ty))
                    part += tl.dot(a_hi, w_hi.to(a_ptr.dtype.element_ty))
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                a = tl.load(
                    a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0,
                )
                if A_KIND == 1:
                    part = tl.dot(a, w, out_dtype=tl.int32)
                else:
                    part = tl.dot(a, w)
            if GROUPED:
                g = k0 // BLOCK_K
                s = part.to(tl.float32)
                if A_SCALE == 2:
                    s = s * tl.load(a_scale_ptr + offs_m * stride_asm + g, mask=mask_m, other=0.0)[:, None]
                if W_SCALE == 2:
                    s = s * tl.load(w_scale_ptr + offs_n * stride_wsn + g, mask=mask_n, other=0.0)[None, :]
                acc += s
            else:
                acc += part

        y = acc.to(tl.float32)
        if A_SCALE == 1:
            y = y * tl.load(a_scale_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)[:, None]
        if W_SCALE == 1:
            y = y * tl.load(w_scale_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if HAS_GAMMA:
            y = y * tl.load(gamma_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        if OUT_HADAMARD:
            # The next layer's online input rotation (block Hadamard of BLOCK_N channels) on the tile in registers;
            # tf32x3 (hi + lo tf32 parts of each operand) keeps the product near fp32 accuracy.
            offs_h = tl.arange(0, BLOCK_N)
            had = tl.load(had_ptr + offs_h[:, None] * BLOCK_N + offs_h[None, :])
            y = tl.where(mask, y, 0.0)
            y = tl.dot(y, had, input_precision="tf32x3")
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if OUT_QUANT == 0:
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
            if OUT_SPECIAL:  # camera/register tokens: the finer grid for their rows (global row index offs_m)
                qmax = tl.where(offs_m % out_special_period < out_special_count, SPECIAL_QMAX, OUT_QMAX)
                scale = tl.maximum(tl.math.div_rn(amax, qmax), TINY)
                lim = qmax[:, None]
            else:
                scale = tl.maximum(tl.math.div_rn(amax, OUT_QMAX), TINY)
                lim = OUT_QMAX
            v = tl.math.div_rn(y, scale[:, None])
            v = tl.minimum(tl.maximum(v, -lim), lim)
            if OUT_QUANT == 2:
                tl.store(out_ptrs, round_to_fp8_grid(v).to(tl.float8e4nv), mask=mask)
            else:
                tl.store(out_ptrs, round_to_int_grid(v).to(tl.int8), mask=mask)
            tl.store(out_scale_ptr + offs_m * stride_osm + pid_n, scale, mask=mask_m)


def kernel_is_interpreted() -> bool:
    """Whether the GEMM kernel runs under the Triton interpreter (see ``layernorm_quant.kernel_is_interpreted``)."""
    if not has_triton():
        return False
    return all(type(f).__name__ == "InterpretedFunction" for f in (_scaled_gemm_kernel, tl.sum))


def pack_int4_blocked(codes: Tensor, block_k: int = 128) -> Tensor:
    """Pack int4 codes [N, K] (int8 in [-8, 7]) into the kernel layout: uint8 [N, Kp / 2], Kp = K rounded up to
    a multiple of ``block_k`` (zero codes pad it). In each block of ``block_k`` codes, byte j holds code j (low
    nibble) and code j + block_k / 2 (high nibble)."""
    if codes.ndim != 2 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    if block_k % 32:
        raise ValueError(f"block_k must be a multiple of 32, got {block_k}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    n, k = codes.shape
    kp = -(-k // block_k) * block_k
    padded = torch.zeros(n, kp, dtype=torch.int8, device=codes.device)
    padded[:, :k] = codes
    blocks = padded.view(n, kp // block_k, 2, block_k // 2).to(torch.int16) & 0xF
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8).reshape(n, kp // 2)


def unpack_int4_blocked(packed: Tensor, k: int, block_k: int = 128) -> Tensor:
    """Inverse of ``pack_int4_blocked``: uint8 [N, Kp / 2] -> int8 codes [N, k]."""
    n, half = packed.shape
    kp = half * 2
    if kp % block_k or k > kp:
        raise ValueError(f"packed width {half} does not hold K={k} in blocks of {block_k}")
    p = packed.view(n, kp // block_k, 1, block_k // 2).to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.cat([lo, hi], dim=2).reshape(n, kp)
    return ((codes ^ 8) - 8).to(torch.int8)[:, :k]


_HADAMARD: dict[tuple[int, torch.device], Tensor] = {}


def _hadamard_matrix(n: int, device: torch.device) -> Tensor:
    """The orthonormal Hadamard matrix of order n (float32 [n, n], Sylvester), cached per device."""
    key = (n, device)
    if key not in _HADAMARD:
        from qvggt.quant.hadamard import hadamard_transform

        _HADAMARD[key] = hadamard_transform(torch.eye(n, dtype=torch.float32)).to(device).contiguous()
    return _HADAMARD[key]


def _a_kind(a: Tensor) -> int:
    if a.dtype in (torch.bfloat16, torch.float16):
        return 0
    if a.dtype == torch.int8:
        return 1
    if a.dtype == torch.float8_e4m3fn:
        return 2
    raise ValueError(f"A must be bfloat16, float16, int8 or float8_e4m3fn, got {a.dtype}")


def _scale_mode(scale: Tensor | None, rows: int, groups: int, name: str) -> int:
    if scale is None:
        return 0
    if scale.dtype != torch.float32 or scale.ndim != 2 or scale.shape[0] != rows:
        raise ValueError(
            f"{name} must be float32 [{rows}, 1] or [{rows}, {groups}], got {scale.dtype} {tuple(scale.shape)}"
        )
    if scale.shape[1] == 1 and groups != 1:
        return 1
    if scale.shape[1] == groups:
        return 2 if groups > 1 else 1
    raise ValueError(f"{name} has {scale.shape[1]} groups; the kernel's K steps make {groups} (group == block_k)")


def scaled_gemm(
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
    out_quant: OutQuant | None = None,
    out_hadamard: bool = False,
    out_special_period: int = 0,
    out_special_count: int = 0,
    w_int4_k: int | None = None,
    tiles: GemmTiles | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``out = residual + gamma * act(dequant(A) @ dequant(W)^T + bias)`` in one kernel (module docstring).

    Args:
        a: [M, K] bf16/fp16 (unscaled), or int8 / float8_e4m3fn codes with ``a_scale``.
        w: [N, K] in a's dtype (float) or int8 / float8_e4m3fn codes, or, with ``w_int4_k=K``, int4 codes packed
            by ``pack_int4_blocked`` (uint8 [N, Kp / 2]; block_k must equal the tiles' block_k).
        a_scale: float32 [M, 1] per token or [M, K / block_k] per token and K group.
        w_scale: float32 [N, 1] per channel or [N, K / block_k] per channel and K group.
        bias, gamma: [N] (any float dtype); gelu: exact GELU after the bias.
        residual: [M, N] added last (any float dtype).
        out_dtype: dtype of a float output.
        out_quant: None, or "int8" / "fp8_e4m3" / "int4" (4-bit grid, int8 codes): return (codes [M, N], scales
            float32 [M, cdiv(N, block_n)]).
        out_hadamard: rotate the output by the block Hadamard of ``tiles.block_n`` channels (orthonormal) before
            storing or quantizing it: the next layer's online input rotation (``QuantLinear.input_hadamard``),
            fused. Needs N to be a multiple of block_n.
        out_special_period, out_special_count: ints with 0 <= count <= period (only with ``out_quant``): output
            rows m with m % period < count (VGGT's camera/register tokens) are quantized on the int8 grid when
            out_quant is "int4"; "int8" / "fp8_e4m3" ignore them. 0, 0: none.
        w_int4_k: K when ``w`` is int4-packed.
        tiles: tile configuration (``default_tiles(a.dtype)`` by default).

    Returns:
        [M, N] out_dtype, or (codes, scales) with ``out_quant``.

    Raises:
        ValueError: on shapes, dtypes or scale layouts the kernel does not support, naming the fix.
        RuntimeError: when the kernel cannot run and ``qvggt.kernels.require_kernels`` is on.
    """
    tiles = tiles or default_tiles(a.dtype)
    a_kind = _a_kind(a)
    if a.ndim != 2 or w.ndim != 2:
        raise ValueError(f"a and w must be 2-D ([M, K], [N, K]); got {tuple(a.shape)} and {tuple(w.shape)}")
    m, k = a.shape
    n = w.shape[0]
    if w_int4_k is not None:
        if w.dtype != torch.uint8 or w_int4_k != k or w.shape[1] * 2 != -(-k // tiles.block_k) * tiles.block_k:
            raise ValueError(
                f"int4 weights must be uint8 [N, ceil(K / {tiles.block_k}) * {tiles.block_k} / 2] packed by "
                f"pack_int4_blocked(block_k={tiles.block_k}) for K={k}; got {w.dtype} {tuple(w.shape)}"
            )
    elif w.shape[1] != k:
        raise ValueError(f"w {tuple(w.shape)} does not match a {tuple(a.shape)}: both need K={k} columns")
    elif a_kind == 0 and w.dtype != a.dtype:
        raise ValueError(f"float A ({a.dtype}) needs W of the same dtype, got {w.dtype}")
    elif a_kind != 0 and w.dtype != a.dtype:
        raise ValueError(f"{a.dtype} A needs W of the same dtype or int4-packed, got {w.dtype}")
    w_quantized = w_int4_k is not None or a_kind != 0
    if (a_scale is not None) != (a_kind != 0):
        raise ValueError(f"a_scale is required for int8/fp8 A and not allowed for float A ({a.dtype})")
    if (w_scale is not None) != w_quantized:
        raise ValueError("w_scale is required for quantized (int8, fp8, int4) W and not allowed for float W")
    groups = -(-k // tiles.block_k)
    a_mode = _scale_mode(a_scale, m, groups, "a_scale")
    w_mode = _scale_mode(w_scale, n, groups, "w_scale")
    if (a_mode == 2 or w_mode == 2) and k % tiles.block_k:
        raise ValueError(f"group scales need K ({k}) to be a multiple of block_k ({tiles.block_k})")
    for name, t, shape in (("bias", bias, (n,)), ("gamma", gamma, (n,)), ("residual", residual, (m, n))):
        if t is not None and (t.shape != shape or t.device != a.device):
            raise ValueError(f"{name} must have shape {shape} on {a.device}, got {tuple(t.shape)} on {t.device}")
    if out_quant not in (None, *_OUT_QMAX):
        raise ValueError(f"out_quant must be None, 'int8', 'fp8_e4m3' or 'int4', got {out_quant!r}")
    check_special_rows(out_special_period, out_special_count, "out_special")
    if out_special_count and out_quant is None:
        raise ValueError(
            "out_special_period / out_special_count choose the grid of quantized output rows: pass out_quant"
        )
    if out_hadamard and n % tiles.block_n:
        raise ValueError(f"out_hadamard rotates blocks of {tiles.block_n} channels: N={n} is not a multiple")
    for name, t in (("a", a), ("w", w), ("residual", residual)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim; call .contiguous()")

    # The interpreter multiplies bf16 bit patterns (HOPPER_MEASUREMENTS.md): bf16 on CPU always takes the twin.
    use_kernel = has_triton() and (a.is_cuda or (kernel_is_interpreted() and a.dtype != torch.bfloat16))
    if not use_kernel:
        check_fallback_allowed("scaled_gemm", a)
        FALLBACK_CALLS["scaled_gemm"] += 1
        return scaled_gemm_ref(
            a, w, a_scale=a_scale, w_scale=w_scale, bias=bias, gelu=gelu, gamma=gamma, residual=residual,
            out_dtype=out_dtype, out_quant=out_quant, out_hadamard=out_hadamard,
            out_special_period=out_special_period, out_special_count=out_special_count, w_int4_k=w_int4_k,
            block_k=tiles.block_k, block_n=tiles.block_n,
        )  # fmt: skip
    KERNEL_CALLS["scaled_gemm"] += 1
    if out_quant is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
        out_scale = out  # dummy pointer, never written
    else:
        out = torch.empty((m, n), dtype=torch.float8_e4m3fn if out_quant == "fp8_e4m3" else torch.int8, device=a.device)
        out_scale = torch.empty((m, -(-n // tiles.block_n)), dtype=torch.float32, device=a.device)
    dummy = out
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    _scaled_gemm_kernel[grid](
        a,
        w,
        a_scale if a_scale is not None else dummy,
        w_scale if w_scale is not None else dummy,
        bias if bias is not None else dummy,
        gamma if gamma is not None else dummy,
        residual if residual is not None else dummy,
        out,
        out_scale,
        _hadamard_matrix(tiles.block_n, a.device) if out_hadamard else dummy,
        m,
        n,
        k,
        a.stride(0),
        w.stride(0),
        a_scale.stride(0) if a_scale is not None else 0,
        w_scale.stride(0) if w_scale is not None else 0,
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        out_scale.stride(0) if out_quant is not None else 0,
        out_special_period,
        out_special_count,
        A_KIND=a_kind,
        W_INT4=w_int4_k is not None,
        A_SCALE=a_mode,
        W_SCALE=w_mode,
        GROUPED=a_mode == 2 or w_mode == 2,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        HAS_GAMMA=gamma is not None,
        HAS_RES=residual is not None,
        OUT_HADAMARD=out_hadamard,
        OUT_QUANT=0 if out_quant is None else (2 if out_quant == "fp8_e4m3" else 1),
        OUT_QMAX=_OUT_QMAX.get(out_quant, 1.0),
        OUT_SPECIAL=out_quant in SPECIAL_ROW_FORMAT and out_special_period > 0 and out_special_count > 0,
        SPECIAL_QMAX=_OUT_QMAX[SPECIAL_ROW_FORMAT.get(out_quant, "int8")],
        TINY=_TINY,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out if out_quant is None else (out, out_scale)
