"""Scaled GEMM with fused epilogue vs its torch twin, under the Triton interpreter (CPU).

The interpreter proves indexing, masking, tile ordering, int4 unpacking, scale application, the epilogue and the
output quantization for int8 and fp8 operands (its int8 dots are exact, its fp8 dots multiply exactly representable
values). It cannot check bf16 dots (it multiplies bit patterns) or GPU code generation and speed: those run in
``tests/kernels/test_kernels_cuda.py`` on a GPU (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvggt.kernels import has_triton
from qvggt.kernels.reference import scaled_gemm_ref, token_quant_ref

if has_triton():
    import qvggt.kernels.gemm as gm

pytestmark = pytest.mark.skipif(
    not (has_triton() and gm.kernel_is_interpreted()),
    reason="needs the Triton interpreter, which tests/conftest.py turns on where there is no GPU",
)

# Small tiles keep the interpreter fast; shapes below are chosen to straddle them.
TILES = gm.GemmTiles(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1) if has_triton() else None


def _codes(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes of ``kind`` and per-row float32 scales for a [rows, K] operand."""
    x = torch.randn(shape, generator=gen) * (1 + 3 * torch.rand(shape[0], 1, generator=gen))
    return token_quant_ref(x, kind)


def _group_scales(rows: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    return (0.01 + torch.rand(rows, groups, generator=gen)).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("m,n,k", [(1, 32, 32), (37, 45, 96), (16, 70, 32), (50, 33, 64)])
def test_quantized_gemm_matches_twin(kind: str, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    a, sa = _codes(kind, (m, k), gen)
    w, sw = _codes(kind, (n, k), gen)
    calls = gm.KERNEL_CALLS["scaled_gemm"]
    got = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, out_dtype=torch.float32, tiles=TILES)
    assert gm.KERNEL_CALLS["scaled_gemm"] == calls + 1  # the kernel ran, not the twin
    want = scaled_gemm_ref(a, w, a_scale=sa, w_scale=sw, out_dtype=torch.float32, block_k=32, block_n=32)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # int8 dots are exact; fp8 products are exact in fp32 and only the summation order differs.
    assert _rel(got, want) < 1e-6
    # ... and the twin is the plain float matmul of the dequantized operands.
    assert _rel(want, (a.float() * sa) @ (w.float() * sw).T) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_fused_epilogue_matches_twin(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    m, n, k = 41, 70, 64
    a, sa = _codes(kind, (m, k), gen)
    w, sw = _codes(kind, (n, k), gen)
    bias, gamma = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    res = torch.randn(m, n, generator=gen)
    kw = {
        "a_scale": sa,
        "w_scale": sw,
        "bias": bias,
        "gelu": True,
        "gamma": gamma,
        "residual": res,
        "out_dtype": torch.float32,
    }
    got = gm.scaled_gemm(a, w, tiles=TILES, **kw)
    want = scaled_gemm_ref(a, w, block_k=32, block_n=32, **kw)
    assert _rel(got, want) < 1e-6
    plain = (a.float() * sa) @ (w.float() * sw).T
    assert _rel(want, res + gamma * F.gelu(plain + bias)) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_int4_weights_unpacked_in_kernel(kind: str) -> None:
    gen = torch.Generator().manual_seed(11)
    m, n, k = 19, 40, 96
    a, sa = _codes(kind, (m, k), gen)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    packed = gm.pack_int4_blocked(codes, block_k=32)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    for sw in (_group_scales(n, 1, gen), _group_scales(n, k // 32, gen)):  # per channel, then group 32
        got = gm.scaled_gemm(a, packed, a_scale=sa, w_scale=sw, w_int4_k=k, out_dtype=torch.float32, tiles=TILES)
        wf = codes.float().view(n, -1, 32 if sw.shape[1] > 1 else k) * sw[:, :, None]
        want = (a.float() * sa) @ wf.reshape(n, k).T
        assert _rel(got, want) < 1e-6


def test_int4_width_not_multiple_of_block_is_padded() -> None:
    gen = torch.Generator().manual_seed(12)
    m, n, k = 5, 20, 50  # K pads to 64 with zero codes; A's padding is masked
    a, sa = _codes("int8", (m, k), gen)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    packed = gm.pack_int4_blocked(codes, block_k=32)
    assert torch.equal(gm.unpack_int4_blocked(packed, k, block_k=32), codes)
    sw = _group_scales(n, 1, gen)
    got = gm.scaled_gemm(a, packed, a_scale=sa, w_scale=sw, w_int4_k=k, out_dtype=torch.float32, tiles=TILES)
    assert _rel(got, (a.float() * sa) @ (codes.float() * sw).T) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_group_activation_scales(kind: str) -> None:
    """Per token-and-K-group activation scales (the fc1 -> fc2 hand-off) are applied per K step."""
    gen = torch.Generator().manual_seed(13)
    m, n, k = 33, 36, 96
    a, _ = _codes(kind, (m, k), gen)
    sa = _group_scales(m, k // 32, gen)
    w, sw = _codes(kind, (n, k), gen)
    got = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, out_dtype=torch.float32, tiles=TILES)
    want = (a.float().view(m, -1, 32) * sa[:, :, None]).reshape(m, k) @ (w.float() * sw).T
    assert _rel(got, want) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_output_quantized_per_row_tile(kind: str) -> None:
    gen = torch.Generator().manual_seed(17)
    m, n, k = 23, 80, 64  # 80 columns = 2 full tiles of 32 + a partial one
    a, sa = _codes(kind, (m, k), gen)
    w, sw = _codes(kind, (n, k), gen)
    bias = torch.randn(n, generator=gen)
    q, s = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_quant=kind, tiles=TILES)
    qr, sr = scaled_gemm_ref(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_quant=kind, block_k=32,
                             block_n=32)  # fmt: skip
    assert q.dtype == qr.dtype and q.shape == (m, n) and s.shape == (m, 3)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    # Same codes except where summation order moved a value across a rounding boundary (at most one step).
    step = (q.float() - qr.float()).abs() / torch.where(qr.float() == 0, torch.ones_like(qr.float()), qr.float().abs())
    assert (q.float() != qr.float()).float().mean() < 0.01 and (step[q.float() != qr.float()] < 0.2).all()
    # The codes feed the next GEMM directly: dequantized they are the fp32 output within half a step.
    y = scaled_gemm_ref(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_dtype=torch.float32)
    deq = q.float().view(m, -1) * s.repeat_interleave(32, dim=1)[:, :n]
    tol = s.repeat_interleave(32, dim=1)[:, :n] * (0.5 if kind == "int8" else 16.0)
    assert ((deq - y).abs() <= tol + 1e-6).all()


def test_float_weight_only_int4() -> None:
    """bf16 activations with int4 weights (W4A16) run; checked in fp16, whose dot the interpreter computes."""
    gen = torch.Generator().manual_seed(19)
    m, n, k = 9, 34, 64
    a = torch.randn(m, k, generator=gen).half()
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    sw = _group_scales(n, 1, gen)
    got = gm.scaled_gemm(a, gm.pack_int4_blocked(codes, 32), w_scale=sw, w_int4_k=k, out_dtype=torch.float32,
                         tiles=TILES)  # fmt: skip
    assert _rel(got, a.float() @ (codes.float() * sw).T) < 2e-3


def test_bad_arguments_are_named() -> None:
    a = torch.zeros(4, 32, dtype=torch.int8)
    s = torch.ones(4, 1)
    with pytest.raises(ValueError, match="same dtype or int4"):
        gm.scaled_gemm(a, torch.zeros(8, 32, dtype=torch.float8_e4m3fn), a_scale=s, w_scale=torch.ones(8, 1))
    with pytest.raises(ValueError, match="a_scale is required"):
        gm.scaled_gemm(a, torch.zeros(8, 32, dtype=torch.int8), w_scale=torch.ones(8, 1))
    with pytest.raises(ValueError, match="K=32 columns"):
        gm.scaled_gemm(a, torch.zeros(8, 16, dtype=torch.int8), a_scale=s, w_scale=torch.ones(8, 1))
    with pytest.raises(ValueError, match="pack_int4_blocked"):
        gm.scaled_gemm(a, torch.zeros(8, 16, dtype=torch.uint8), a_scale=s, w_scale=torch.ones(8, 1), w_int4_k=32,
                       tiles=gm.GemmTiles(block_k=64))  # fmt: skip
    with pytest.raises(ValueError, match="int4 codes"):
        gm.pack_int4_blocked(torch.full((2, 32), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="residual"):
        gm.scaled_gemm(a, torch.zeros(8, 32, dtype=torch.int8), a_scale=s, w_scale=torch.ones(8, 1),
                       residual=torch.zeros(3, 8))  # fmt: skip


def test_fallback_on_cpu_runs_the_twin_and_strict_mode_only_guards_cuda() -> None:
    """Without the interpreter a CPU call runs the twin; require_kernels never blocks CPU tensors."""
    from qvggt.kernels import require_kernels

    gen = torch.Generator().manual_seed(3)
    a, sa = _codes("int8", (6, 32), gen)
    w, sw = _codes("int8", (5, 32), gen)
    require_kernels(True)
    try:
        out = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, out_dtype=torch.float32, tiles=TILES)
    finally:
        require_kernels(False)
    assert _rel(out, (a.float() * sa) @ (w.float() * sw).T) < 1e-6


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_output_hadamard_then_quantization(kind: str) -> None:
    """fc1 -> fc2 with fc2's online input rotation fused: GELU output rotated per 32-column tile, then quantized."""
    from qvggt.quant.hadamard import block_hadamard_transform

    gen = torch.Generator().manual_seed(23)
    m, n, k = 21, 64, 32
    a, sa = _codes(kind, (m, k), gen)
    w, sw = _codes(kind, (n, k), gen)
    bias = torch.randn(n, generator=gen)
    y = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_hadamard=True,
                       out_dtype=torch.float32, tiles=TILES)  # fmt: skip
    plain = F.gelu((a.float() * sa) @ (w.float() * sw).T + bias)
    assert _rel(y, block_hadamard_transform(plain, 32)) < 1e-5  # tf32x3: near fp32
    q, s = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_hadamard=True, out_quant=kind,
                          tiles=TILES)  # fmt: skip
    qr, sr = scaled_gemm_ref(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_hadamard=True, out_quant=kind,
                             block_k=32, block_n=32)  # fmt: skip
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.float() != qr.float()).float().mean() < 0.02
    with pytest.raises(ValueError, match="not a multiple"):
        gm.scaled_gemm(a, w[:40], a_scale=sa, w_scale=sw[:40], out_hadamard=True, tiles=TILES)
