"""Special-token rows: VGGT's camera/register tokens on the int8 grid inside int4-activation kernels (CPU).

Row r of the flattened [M, K] activation is special iff ``r % period < count``; with fmt "int4" such a row is
quantized with qmax 127 (own per-token scale, same int8 codes tensor), the other rows with qmax 7. Checked: kernels
(Triton interpreter, exact for int8 / fp8 codes) against their torch twins on awkward shapes (M not a multiple of the
GEMM's BLOCK_M, periods not dividing it, one frame, several frames), the twins against ``fake_quantize`` row by row,
that "int8" / "fp8_e4m3" ignore the arguments, and argument validation. GPU: tests/kernels/test_kernels_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvggt.kernels import has_triton
from qvggt.kernels.reference import (
    dequant_ref,
    layernorm_quant_ref,
    scaled_gemm_ref,
    special_row_mask,
    token_format,
    token_quant_ref,
)
from qvggt.quant.quantizer import fake_quantize

if has_triton():
    import qvggt.kernels.gemm as gm
    import qvggt.kernels.layernorm_quant as lq

pytestmark = pytest.mark.skipif(
    not (has_triton() and lq.kernel_is_interpreted() and gm.kernel_is_interpreted()),
    reason="needs the Triton interpreter, which tests/conftest.py turns on where there is no GPU",
)

EPS = 1e-6
COUNT = 5  # VGGT: 1 camera + 4 register tokens per frame
# Small GEMM tiles so the shapes straddle them: BLOCK_M 16 is divided by neither period below.
TILES = gm.GemmTiles(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1) if has_triton() else None

# (M, K, period): several frames of P=7; one frame of P=86 (VGGT's P at 518 x 112 / 14 + 5 is larger, same rule);
# two frames of P=86 plus 3 rows of a third; a single frame of exactly COUNT tokens (every row special).
SHAPES = [(23, 64, 7), (86, 96, 86), (175, 64, 86), (5, 160, 5)]


def _activation(m: int, k: int, period: int, seed: int) -> torch.Tensor:
    """Rows with per-row spread; the special rows carry massive outlier channels, as VGGT's camera/register tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))
    special = special_row_mask(m, period, COUNT)
    x[special, 3] *= 50.0
    return x


def _check_grids(q: torch.Tensor, special: torch.Tensor) -> None:
    """Special rows use the int8 grid (their largest code is 127), patch rows stay on the int4 grid."""
    amax = q.float().abs().amax(dim=1)
    assert bool((amax[special] == 127).all()), amax[special]
    assert bool((amax[~special] <= 7).all()), amax[~special]


def _fake_quant_rows(y: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """What QuantLinear computes: per-token fake quantization, int8 on special rows and int4 on the others."""
    out = torch.empty_like(y)
    out[special] = fake_quantize(y[special], token_format("int8"))
    out[~special] = fake_quantize(y[~special], token_format("int4"))
    return out


@pytest.mark.parametrize("hadamard", [0, 32])
@pytest.mark.parametrize(("m", "k", "period"), SHAPES)
def test_token_quant_special_rows_bit_exact_with_twin(m: int, k: int, period: int, hadamard: int) -> None:
    x = _activation(m, k, period, m + k)
    name = "token_hadamard_quant" if hadamard else "token_quant"
    before = lq.KERNEL_CALLS[name]
    q, s = lq.token_quant(x, "int4", hadamard, special_period=period, special_count=COUNT)
    assert lq.KERNEL_CALLS[name] == before + 1  # the kernel ran, not the twin
    qr, sr = token_quant_ref(x, "int4", hadamard, period, COUNT)
    assert q.dtype == torch.int8 and torch.equal(q, qr) and torch.equal(s, sr)
    _check_grids(q, special_row_mask(m, period, COUNT))


@pytest.mark.parametrize(("m", "k", "period"), SHAPES[:3])
def test_layernorm_quant_special_rows_match_twin(m: int, k: int, period: int) -> None:
    x = _activation(m, k, period, 2 * m + k)
    gen = torch.Generator().manual_seed(1)
    w, b = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.1
    for hadamard in (0, 32):
        q, s = lq.layernorm_quant(x, w, b, EPS, "int4", hadamard, period, COUNT)
        qr, sr = layernorm_quant_ref(x, w, b, EPS, "int4", hadamard, period, COUNT)
        # LayerNorm's reductions run in another order than F.layer_norm's: a few ulps (test_layernorm_quant.py).
        torch.testing.assert_close(s, sr, rtol=16 * 2.0**-23, atol=0.0)
        diff = (q.int() - qr.int()).abs()
        assert int(diff.max()) <= 1 and int((diff != 0).sum()) <= max(1, q.numel() // 500)
        _check_grids(q, special_row_mask(m, period, COUNT))


# Rows past M in the last BLOCK_M tile hold GELU(bias) and a floored scale (their amax is masked to 0): their
# x / scale overflows to inf before the clamp. Harmless (never stored), but NumPy warns under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize(("m", "period"), [(37, 7), (43, 86), (175, 86)])
def test_gemm_epilogue_quantizes_special_rows_on_the_int8_grid(m: int, period: int) -> None:
    """fc1 -> fc2 hand-off: every 32-column tile of a special row on the int8 grid; rows cross BLOCK_M = 16 tiles
    at offsets the period does not divide, so the row index must be the global one."""
    gen = torch.Generator().manual_seed(m)
    n, k = 80, 64  # 2 full column tiles of 32 + a partial one
    a, sa = token_quant_ref(torch.randn(m, k, generator=gen), "int8")
    w, sw = token_quant_ref(torch.randn(n, k, generator=gen), "int8")
    bias = torch.randn(n, generator=gen)
    bias[5] = 40.0  # an outlier column, so the int4 and int8 grids differ visibly in every row
    kw = {"a_scale": sa, "w_scale": sw, "bias": bias, "gelu": True, "out_quant": "int4"}
    special = {"out_special_period": period, "out_special_count": COUNT}
    q, s = gm.scaled_gemm(a, w, tiles=TILES, **kw, **special)
    qr, sr = scaled_gemm_ref(a, w, block_k=32, block_n=32, **kw, **special)
    assert q.dtype == torch.int8 and q.shape == (m, n) and s.shape == (m, 3)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    # Int8 dots are exact; GELU and the scales may move a value across a rounding boundary (one code, rarely).
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1 and int((diff != 0).sum()) <= max(1, q.numel() // 200)
    mask = special_row_mask(m, period, COUNT)
    for t in range(3):  # grids per column tile
        _check_grids(q[:, 32 * t : 32 * (t + 1)], mask)
    # The twin is fake quantization per (row, tile): int8 on special rows, int4 elsewhere.
    y = scaled_gemm_ref(a, w, a_scale=sa, w_scale=sw, bias=bias, gelu=True, out_dtype=torch.float32)
    padded = F.pad(y, (0, 96 - n)).view(m, 3, 32)
    want = torch.stack([_fake_quant_rows(padded[:, t], mask) for t in range(3)], dim=1).view(m, 96)[:, :n]
    assert torch.equal(qr.float() * sr.repeat_interleave(32, dim=1)[:, :n], want)


@pytest.mark.parametrize("hadamard", [0, 64])
def test_twins_are_fake_quantize_per_row(hadamard: int) -> None:
    """token_quant_ref / layernorm_quant_ref with special rows: what QuantLinear's row split computes, bit for bit."""
    from qvggt.quant.hadamard import block_hadamard_transform

    m, k, period = 30, 128, 7
    x = _activation(m, k, period, 3)
    mask = special_row_mask(m, period, COUNT)
    rot = (lambda y: block_hadamard_transform(y, hadamard)) if hadamard else (lambda y: y)
    q, s = token_quant_ref(x, "int4", hadamard, period, COUNT)
    assert torch.equal(dequant_ref(q, s), _fake_quant_rows(rot(x), mask))
    q, s = layernorm_quant_ref(x, None, None, EPS, "int4", hadamard, period, COUNT)
    assert torch.equal(dequant_ref(q, s), _fake_quant_rows(rot(F.layer_norm(x, (k,), eps=EPS)), mask))
    # count = 0 (or period = 0 with count = 0): no special rows, the plain int4 path.
    plain = token_quant_ref(x, "int4", hadamard)
    for args in ((period, 0), (0, 0)):
        got = token_quant_ref(x, "int4", hadamard, *args)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_8bit_formats_ignore_special_rows(fmt: str) -> None:
    x = _activation(19, 64, 7, 4)
    for fn in (lq.token_quant, lambda *a, **kw: lq.layernorm_quant(a[0], None, None, EPS, *a[1:], **kw)):
        q0, s0 = fn(x, fmt)
        q1, s1 = fn(x, fmt, special_period=7, special_count=COUNT)
        assert torch.equal(q0.float(), q1.float()) and torch.equal(s0, s1)
    a, sa = token_quant_ref(x, fmt)
    w, sw = token_quant_ref(torch.randn(40, 64), fmt)
    q0, s0 = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, out_quant=fmt, tiles=TILES)
    q1, s1 = gm.scaled_gemm(a, w, a_scale=sa, w_scale=sw, out_quant=fmt, tiles=TILES, out_special_period=7,
                            out_special_count=COUNT)  # fmt: skip
    assert torch.equal(q0.float(), q1.float()) and torch.equal(s0, s1)


@pytest.mark.parametrize(
    ("period", "count", "match"),
    [
        (7, 8, "special_count=8 exceeds special_period=7"),
        (0, 5, "special_count=5 exceeds special_period=0"),
        (-1, 0, "special_period must be an int >= 0"),
        (7, True, "special_count must be an int >= 0"),
        (7.0, 5, "special_period must be an int >= 0"),
    ],
)
def test_bad_special_row_arguments_are_named(period, count, match: str) -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=match):
        lq.token_quant(x, "int4", special_period=period, special_count=count)
    with pytest.raises(ValueError, match=match):
        lq.layernorm_quant(x, fmt="int4", special_period=period, special_count=count)
    with pytest.raises(ValueError, match=match):
        token_quant_ref(x, "int4", 0, period, count)
    a, sa = token_quant_ref(x, "int8")
    with pytest.raises(ValueError, match=match.replace("special_", "out_special_")):
        gm.scaled_gemm(a, a, a_scale=sa, w_scale=sa, out_quant="int4", out_special_period=period,
                       out_special_count=count)  # fmt: skip


def test_gemm_special_rows_need_a_quantized_output() -> None:
    a, sa = token_quant_ref(torch.randn(4, 64), "int8")
    with pytest.raises(ValueError, match="pass out_quant"):
        gm.scaled_gemm(a, a, a_scale=sa, w_scale=sa, out_special_period=4, out_special_count=1)


def test_fallback_off_interpreter_keeps_special_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter (CPU) the launchers run the twins, special rows included."""
    monkeypatch.setattr(lq, "kernel_is_interpreted", lambda: False)
    x = _activation(12, 64, 6, 5)
    before = lq.FALLBACK_CALLS["layernorm_quant"]
    q, s = lq.layernorm_quant(x, None, None, EPS, "int4", special_period=6, special_count=COUNT)
    assert lq.FALLBACK_CALLS["layernorm_quant"] == before + 1
    qr, sr = layernorm_quant_ref(x, None, None, EPS, "int4", 0, 6, COUNT)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    _check_grids(q, special_row_mask(12, 6, COUNT))
